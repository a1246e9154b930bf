package pgcolumn

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/internal/keys"
	"github.com/profullstack/keybroker/legacy"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// Bounds on values.
const (
	// MaxValueLen bounds a plaintext value, as pgstore.MaxValueLen bounds
	// a secret.
	MaxValueLen = pgstore.MaxValueLen
	// MaxSealedLen bounds the bytes Open accepts: a sealed value of
	// MaxValueLen plus the envelope's header (40 bytes with a 16-byte key
	// id) and tag (16 bytes).
	MaxSealedLen = MaxValueLen + sealedOverhead
	// maxIdentLen is PostgreSQL's NAMEDATALEN-1.
	maxIdentLen = 63
)

// sealedOverhead is what sealing adds to a value: header (magic 4, version
// 1, algorithm 1, key kind 1, id length 1, id 16, nonce 12, ct-length 4) and
// the 16-byte GCM tag. docs/STORAGE.md, "Encrypted columns".
const sealedOverhead = 40 + 16

// magic starts every sealed value; a value that does not start with it is
// unsealed (legacy plaintext or another scheme's ciphertext).
var magic = []byte("KBEN")

// Column declares an encrypted column of an application table. Every name
// is taken literally (it is quoted in SQL, never case-folded) and bound
// into the values' associated data, so it must not change once values are
// sealed.
type Column struct {
	// Table is the schema-qualified table, "schema.table", e.g.
	// "public.secrets". Neither part may contain a dot.
	Table string
	// Project is the column holding the row's project; its value in
	// PostgreSQL's text form (col::text, e.g. a uuid's lower-case hyphenated
	// form) is the project id of the row's data keys.
	Project string
	// Key lists the columns that identify a row within its project; their
	// values in text form are the Row of the value's Context. Project and
	// Key together must be exactly the columns of a unique index (or
	// primary key or unique constraint) without predicate or expressions,
	// so no two rows share a context.
	Key []string
	// Value is the bytea column holding the sealed values.
	Value string
}

// Scope is the data_keys.scope of the column's data keys.
func (c Column) Scope() string { return c.context(nil).Scope() }

// context is the Context of the value in row key.
func (c Column) context(key []string) Context {
	return Context{Table: c.Table, Column: c.Value, Row: key}
}

// split returns Table's schema and table names.
func (c Column) split() (schema, table string) {
	schema, table, _ = strings.Cut(c.Table, ".")
	return schema, table
}

// check validates the declaration's shape (not the database's tables).
func (c Column) check() error {
	schema, table, ok := strings.Cut(c.Table, ".")
	if !ok || strings.Contains(table, ".") {
		return fmt.Errorf("%w: table %s must be schema-qualified, \"schema.table\"", ErrInvalidArgument, short(c.Table))
	}
	names := append([]string{schema, table, c.Project, c.Value}, c.Key...)
	for _, n := range names {
		if n == "" || len(n) > maxIdentLen || !utf8.ValidString(n) || strings.IndexByte(n, 0) >= 0 {
			return fmt.Errorf("%w: identifier %s must be 1..%d bytes of UTF-8 without NUL", ErrInvalidArgument, short(n), maxIdentLen)
		}
	}
	if len(c.Key) == 0 || len(c.Key) > MaxRowFields {
		return fmt.Errorf("%w: %d key columns, want 1..%d", ErrInvalidArgument, len(c.Key), MaxRowFields)
	}
	cols := append([]string{c.Project, c.Value}, c.Key...)
	for i, n := range cols {
		if slices.Contains(cols[i+1:], n) {
			return fmt.Errorf("%w: column %q named twice in the declaration", ErrInvalidArgument, n)
		}
	}
	return c.context([]string{""}).Check()
}

// short quotes s for an error message, cut to its first 64 bytes.
func short(s string) string {
	if len(s) > 64 {
		s = s[:64] + "…"
	}
	return fmt.Sprintf("%q", s)
}

// Options configures the handle New returns.
type Options struct {
	// Legacy, when set, makes the handle a reader that accepts legacy
	// values while the column does (until RefuseLegacy): Open and OpenMany
	// decode an unsealed value with it — legacy.NewChain of
	// legacy.Open("meshhook-v1://env/SECRETS_ENCRYPTION_KEY") and
	// legacy.Plaintext(), say — after confirming in the database that the
	// column still accepts legacy values (one query per Open or OpenMany
	// call that meets an unsealed value; none once RefuseLegacy has been
	// seen). Without it an unsealed value is ErrLegacyRefused. The handle
	// does not close it.
	Legacy legacy.Decoder
}

// Encrypted is a declared, installed column: it seals and opens the
// column's values. It is safe for concurrent use.
type Encrypted struct {
	ks  keys.Store
	col Column
	id  int64 // the columns registry row
	// types of the project and key columns (format_type), so statements
	// compare them as they are indexed rather than as text.
	projType string
	keyTypes []string
	// legacy decodes unsealed values (Options.Legacy); legacyOff is set
	// once the registry said the column refuses them (one-way).
	legacy    legacy.Decoder
	legacyOff atomic.Bool
}

// Column returns the declaration.
func (e *Encrypted) Column() Column {
	c := e.col
	c.Key = slices.Clone(c.Key)
	return c
}

// layered returns store's data keys.
func layered(store *pgstore.Store) (keys.Store, error) {
	ks, ok := keys.Of(store)
	if !ok {
		return nil, fmt.Errorf("%w: nil store", ErrInvalidArgument)
	}
	return ks, nil
}

// New returns the handle of col, which must have been installed (Install)
// with the same project and key columns, its fence trigger still in
// place; otherwise it fails with ErrNotDeclared. It runs no DDL: the
// service's role needs SELECT on keybroker's columns table and the
// pg_catalog reads every role has.
func New(ctx context.Context, store *pgstore.Store, col Column, opts Options) (*Encrypted, error) {
	ks, err := layered(store)
	if err != nil {
		return nil, err
	}
	if err := col.check(); err != nil {
		return nil, err
	}
	e := &Encrypted{ks: ks, col: col, legacy: opts.Legacy}
	q := pgx.Identifier{ks.Schema()}.Sanitize()
	var (
		project string
		key     []string
		fence   bool
	)
	err = ks.Pool().QueryRow(ctx, `SELECT c.id, c.project_column, c.key_columns,
  EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = to_regclass($3) AND t.tgname = $4 || c.id AND t.tgenabled <> 'D')
FROM `+q+`.columns c WHERE c.table_name = $1 AND c.column_name = $2`,
		col.Table, col.Value, e.quotedTable(), triggerPrefix(ks.Schema())).Scan(&e.id, &project, &key, &fence)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: %s.%s", ErrNotDeclared, col.Table, col.Value)
	}
	if err != nil {
		return nil, fmt.Errorf("pgcolumn: read column registry: %w", err)
	}
	if project != col.Project || !slices.Equal(key, col.Key) {
		return nil, fmt.Errorf("%w: %s.%s is installed with project column %q and key columns %q, not %q and %q",
			ErrNotDeclared, col.Table, col.Value, project, key, col.Project, col.Key)
	}
	if !fence {
		return nil, fmt.Errorf("%w: %s.%s: its fence trigger is missing or disabled (run install again)", ErrNotDeclared, col.Table, col.Value)
	}
	if e.projType, e.keyTypes, err = columnTypes(ctx, ks.Pool(), col); err != nil {
		return nil, err
	}
	return e, nil
}

// quotedTable is the table's name quoted for SQL.
func (e *Encrypted) quotedTable() string { return quoteTable(e.col) }

func quoteTable(c Column) string {
	schema, table := c.split()
	return pgx.Identifier{schema, table}.Sanitize()
}

// Seal encrypts value for the row key (the key columns' values, in their
// text form, in the declared order) of project, under the project's active
// data key of the column's scope, and returns the bytes to store in the
// column. The application writes them itself, typically in its own
// transaction; the column's fence trigger refuses them (SQLSTATE KB005,
// ErrStaleKey through Refused) if the data key was retired meanwhile — see
// Write for a helper that seals again.
func (e *Encrypted) Seal(ctx context.Context, project string, key []string, value []byte) ([]byte, error) {
	return seal(ctx, e.ks, project, e.col.context(key), value)
}

// Open decrypts a value stored in the row key of project. Every failure
// about the bytes or their data key (altered, truncated, moved to another
// row, column or project, data key destroyed or not unwrapping) is
// envelope.ErrDecrypt. A value that does not start with the envelope magic
// "KBEN" is unsealed: ErrLegacyRefused. An unreachable key service or
// database is returned as it is.
//
// With Options.Legacy, an unsealed value is decoded with it instead while
// the column accepts legacy values (see Options), and refused
// (ErrLegacyRefused) once RefuseLegacy has switched that off; a claimed
// legacy value that does not decode is envelope.ErrDecrypt.
func (e *Encrypted) Open(ctx context.Context, project string, key []string, stored []byte) ([]byte, error) {
	if !sealed(stored) && e.legacy != nil {
		if err := checkArgs(e.ks, project, e.col.context(key)); err != nil {
			return nil, err
		}
		return e.openLegacy(ctx, stored, false)
	}
	return open(ctx, e.ks, project, e.col.context(key), stored)
}

// SealContext is Seal for a caller that is not a declared column (keybroker
// serve's seal, say): value is sealed for project and c under the data keys
// of c.Scope(). Nothing fences where the bytes are stored; Reencrypt,
// Verify and Status know only declared columns.
func SealContext(ctx context.Context, store *pgstore.Store, project string, c Context, value []byte) ([]byte, error) {
	ks, err := layered(store)
	if err != nil {
		return nil, err
	}
	return seal(ctx, ks, project, c, value)
}

// OpenContext opens what SealContext sealed for project and c, with Open's
// errors.
func OpenContext(ctx context.Context, store *pgstore.Store, project string, c Context, stored []byte) ([]byte, error) {
	ks, err := layered(store)
	if err != nil {
		return nil, err
	}
	return open(ctx, ks, project, c, stored)
}

func checkArgs(ks keys.Store, project string, c Context) error {
	if err := ks.CheckProject(project); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	return c.Check()
}

func seal(ctx context.Context, ks keys.Store, project string, c Context, value []byte) ([]byte, error) {
	if err := checkArgs(ks, project, c); err != nil {
		return nil, err
	}
	if len(value) > MaxValueLen {
		return nil, fmt.Errorf("%w: value is %d bytes, more than %d", ErrInvalidArgument, len(value), MaxValueLen)
	}
	_, blob, err := ks.Seal(ctx, project, c.Scope(), value, c.AAD(project))
	if err != nil {
		return nil, fmt.Errorf("pgcolumn: seal: %w", err)
	}
	return blob, nil
}

// keyID returns the data key id a sealed value names, or ErrDecrypt if
// it is not a well-formed envelope with a 16-byte external key reference.
func keyID(stored []byte) ([16]byte, error) {
	var id [16]byte
	if len(stored) > MaxSealedLen {
		return id, envelope.ErrDecrypt
	}
	h, err := envelope.ParseHeader(stored)
	if err != nil || len(h.KeyID) != len(id) {
		return id, envelope.ErrDecrypt
	}
	copy(id[:], h.KeyID)
	return id, nil
}

// sealed reports whether stored is meant to be a sealed value (starts with
// the envelope magic); anything else is unsealed.
func sealed(stored []byte) bool {
	return len(stored) >= len(magic) && string(stored[:len(magic)]) == string(magic)
}

func open(ctx context.Context, ks keys.Store, project string, c Context, stored []byte) ([]byte, error) {
	if err := checkArgs(ks, project, c); err != nil {
		return nil, err
	}
	if !sealed(stored) {
		return nil, fmt.Errorf("%w: %s.%s", ErrLegacyRefused, c.Table, c.Column)
	}
	id, err := keyID(stored)
	if err != nil {
		return nil, err
	}
	pt, err := ks.Open(ctx, project, id, stored, c.AAD(project))
	if errors.Is(err, envelope.ErrDecrypt) {
		return nil, envelope.ErrDecrypt
	}
	if err != nil {
		return nil, fmt.Errorf("pgcolumn: open: %w", err)
	}
	return pt, nil
}

// Row is one value for OpenMany: the row's key and the stored bytes.
type Row struct {
	Key    []string
	Stored []byte
}

// OpenMany opens the values of rows, all of project, and returns their
// plaintexts in rows' order. Each distinct data key is looked up once for
// the call (from the cache, or loaded and unwrapped once). It fails as a
// whole, with Open's errors wrapped with the failing row's index, and then
// returns no plaintext. Unsealed values are opened as Open opens them,
// with one registry query for the call.
func (e *Encrypted) OpenMany(ctx context.Context, project string, rows []Row) ([][]byte, error) {
	if err := e.ks.CheckProject(project); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	out := make([][]byte, len(rows))
	fail := func(i int, err error) ([][]byte, error) {
		for _, v := range out {
			provider.Clear(v)
		}
		if errors.Is(err, envelope.ErrDecrypt) {
			return nil, fmt.Errorf("pgcolumn: row %d: %w", i, envelope.ErrDecrypt)
		}
		return nil, fmt.Errorf("pgcolumn: row %d: %w", i, err)
	}
	ids := make([][16]byte, len(rows))
	legacyChecked := false
	for i, r := range rows {
		c := e.col.context(r.Key)
		if err := c.Check(); err != nil {
			return fail(i, err)
		}
		if !sealed(r.Stored) && e.legacy != nil {
			pt, err := e.openLegacy(ctx, r.Stored, legacyChecked)
			if err != nil {
				return fail(i, err)
			}
			legacyChecked = true
			out[i] = pt
			continue
		}
		if !sealed(r.Stored) {
			return fail(i, fmt.Errorf("%w: %s.%s", ErrLegacyRefused, c.Table, c.Column))
		}
		id, err := keyID(r.Stored)
		if err != nil {
			return fail(i, err)
		}
		ids[i] = id
	}
	type lease struct {
		dk      *envelope.DataKey
		release func()
	}
	leases := map[[16]byte]lease{}
	defer func() {
		for _, l := range leases {
			l.release()
		}
	}()
	for i, r := range rows {
		if out[i] != nil || !sealed(r.Stored) { // opened as a legacy value
			continue
		}
		l, ok := leases[ids[i]]
		if !ok {
			dk, release, err := e.ks.DataKey(ctx, project, ids[i])
			if err != nil {
				return fail(i, err)
			}
			l = lease{dk, release}
			leases[ids[i]] = l
		}
		pt, err := envelope.OpenWithKey(l.dk, r.Stored, e.col.context(r.Key).AAD(project))
		if err != nil {
			return fail(i, envelope.ErrDecrypt)
		}
		out[i] = pt
	}
	return out, nil
}

// SQLSTATEs the column fence trigger raises (docs/STORAGE.md). KB001,
// KB002 and KB006 are pgstore's (a retired KEK version, a shredded
// project, a data key outside its project's KEK chain).
const (
	// SQLStateStaleKey: the value names a data key that is retired or
	// gone (re-encryption retired it after the value was sealed). Sealing
	// again gives a value the fence accepts.
	SQLStateStaleKey = "KB005"
	// SQLStateLegacyRefused: the value is not sealed and the column no
	// longer accepts legacy values.
	SQLStateLegacyRefused = "KB003"
	// SQLStateMisdirected: the value starts like an envelope but is not a
	// column envelope, or names a data key of another project or column.
	SQLStateMisdirected = "KB004"
)

// Refused interprets err, returned by the application's statement that
// wrote stored (as Seal returned it for project) into the column: if the fence trigger
// refused it because its data key was retired meanwhile, Refused drops this
// process's reservation on that key and returns an error matching
// ErrStaleKey — seal the value again and redo the write (in a new
// transaction, or after rolling back to a savepoint: the failed statement
// aborted the transaction). A refusal of a legacy value matches
// ErrLegacyRefused, a misdirected value ErrMisdirected. Any other err is
// returned unchanged, nil as nil.
func (e *Encrypted) Refused(err error, project string, stored []byte) error {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return err
	}
	switch pe.Code {
	case SQLStateStaleKey:
		if id, kerr := keyID(stored); kerr == nil {
			e.ks.Forget(project, e.col.Scope(), id)
		}
		return fmt.Errorf("%w: %s.%s (%v)", ErrStaleKey, e.col.Table, e.col.Value, err)
	case SQLStateLegacyRefused:
		return fmt.Errorf("%w: %s.%s (%v)", ErrLegacyRefused, e.col.Table, e.col.Value, err)
	case SQLStateMisdirected:
		return fmt.Errorf("%w: %s.%s (%v)", ErrMisdirected, e.col.Table, e.col.Value, err)
	}
	return err
}

// maxWriteAttempts bounds how often Write seals again after a refusal.
const maxWriteAttempts = 4

// Write seals value for the row key of project and calls write with the
// sealed bytes inside a savepoint of tx; write runs the application's
// INSERT or UPDATE of the row. When the fence trigger refuses the value
// because its data key was retired meanwhile (ErrStaleKey), Write rolls back
// to the savepoint — tx stays usable, with everything before Write intact
// — seals again under a fresh reservation and calls write again, up to 4
// times in all; then it returns an error matching ErrStaleKey. Any other
// error from write is returned after rolling back to the savepoint.
//
// write must not commit or roll back tx, and should make the value's
// statement its last: under REPEATABLE READ or SERIALIZABLE a data key
// created after tx's snapshot is invisible to the fence, and every attempt
// is refused (use READ COMMITTED, PostgreSQL's default).
func (e *Encrypted) Write(ctx context.Context, tx pgx.Tx, project string, key []string, value []byte,
	write func(ctx context.Context, tx pgx.Tx, sealed []byte) error) error {
	if tx == nil || write == nil {
		return fmt.Errorf("%w: nil transaction or write function", ErrInvalidArgument)
	}
	var last error
	for range maxWriteAttempts {
		stored, err := e.Seal(ctx, project, key, value)
		if err != nil {
			return err
		}
		sp, err := tx.Begin(ctx)
		if err != nil {
			return fmt.Errorf("pgcolumn: write: savepoint: %w", err)
		}
		err = write(ctx, sp, stored)
		if err == nil {
			if err := sp.Commit(ctx); err != nil {
				return fmt.Errorf("pgcolumn: write: release savepoint: %w", err)
			}
			return nil
		}
		if rerr := sp.Rollback(ctx); rerr != nil {
			return fmt.Errorf("pgcolumn: write: %w (rolling back to the savepoint failed: %v)", err, rerr)
		}
		last = e.Refused(err, project, stored)
		if !errors.Is(last, ErrStaleKey) {
			return last
		}
	}
	return fmt.Errorf("%w on each of %d attempts", last, maxWriteAttempts)
}

// Lookup returns the declaration installed for table's value column (the
// registry's project and key columns), or ErrNotDeclared: for tools that
// name a column by table and value column only.
func Lookup(ctx context.Context, store *pgstore.Store, table, value string) (Column, error) {
	ks, err := layered(store)
	if err != nil {
		return Column{}, err
	}
	col := Column{Table: table, Value: value}
	err = ks.Pool().QueryRow(ctx, `SELECT project_column, key_columns FROM `+pgx.Identifier{ks.Schema()}.Sanitize()+`.columns
WHERE table_name = $1 AND column_name = $2`, table, value).Scan(&col.Project, &col.Key)
	if errors.Is(err, pgx.ErrNoRows) {
		return Column{}, fmt.Errorf("%w: %s.%s", ErrNotDeclared, short(table), short(value))
	}
	if err != nil {
		return Column{}, fmt.Errorf("pgcolumn: read column registry: %w", err)
	}
	return col, nil
}
