package pgcolumn

import (
	"encoding/binary"
	"fmt"
	"unicode/utf8"
)

// Context is what a sealed value is bound to besides its project: the
// column it lives in and the identity of its row. Seal and Open of a
// declared Column build it from the declaration; SealContext and
// OpenContext take it from callers that are not a declared column (keybroker
// serve's seal/open, say).
type Context struct {
	Table  string   // table name as the application names it, e.g. "public.secrets"
	Column string   // the value column, e.g. "value_encrypted"
	Row    []string // the row's key within its project, e.g. {secret name}
}

// Bounds on a Context.
const (
	MaxNameLen   = 200  // bytes of a scope: "column:", Table, ".", Column
	MaxRowFields = 16   // fields of Row
	MaxRowLen    = 4096 // bytes of all Row fields together
)

// purpose separates column values from every other keybroker ciphertext
// (pgstore's "keybroker/secret/v1" and "keybroker/dek/v1").
const purpose = "keybroker/column/v1"

// Check validates c.
func (c Context) Check() error {
	// The scope bounds the names: data_keys.scope is at most MaxNameLen.
	if c.Table == "" || c.Column == "" || len(c.Scope()) > MaxNameLen ||
		!utf8.ValidString(c.Table) || !utf8.ValidString(c.Column) {
		return fmt.Errorf("%w: table and column must be non-empty UTF-8, %d bytes together at most", ErrInvalidArgument, MaxNameLen-len(scopePrefix)-1)
	}
	if len(c.Row) == 0 || len(c.Row) > MaxRowFields {
		return fmt.Errorf("%w: row key must have 1..%d fields", ErrInvalidArgument, MaxRowFields)
	}
	n := 0
	for _, f := range c.Row {
		if !utf8.ValidString(f) {
			return fmt.Errorf("%w: row key field is not UTF-8", ErrInvalidArgument)
		}
		n += len(f)
	}
	if n > MaxRowLen {
		return fmt.Errorf("%w: row key is %d bytes, more than %d", ErrInvalidArgument, n, MaxRowLen)
	}
	return nil
}

// Scope is the data_keys.scope of the column's data keys: "column:" then
// Table, ".", Column.
func (c Context) Scope() string { return scopePrefix + c.Table + "." + c.Column }

const scopePrefix = "column:"

// AAD is the associated data of a value sealed for project in c: the
// fields purpose, Table, Column, project, then the number of Row fields as
// a decimal string, then each Row field, every field prefixed with its
// length as a u32 big-endian, so that no two contexts encode alike.
// docs/STORAGE.md gives a worked example.
func (c Context) AAD(project string) []byte {
	fields := append([]string{purpose, c.Table, c.Column, project, fmt.Sprint(len(c.Row))}, c.Row...)
	n := 0
	for _, f := range fields {
		n += 4 + len(f)
	}
	b := make([]byte, 0, n)
	for _, f := range fields {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}
