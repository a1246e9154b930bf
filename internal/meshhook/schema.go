package meshhook

import (
	"context"
	_ "embed"
	"fmt"
	"regexp"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// SchemaSQL is MeshHook's projects and secrets tables, verbatim from its
// migrations (unqualified names: they land in the first schema of the
// search_path).
//
//go:embed schema.sql
var SchemaSQL string

// DB is what the helpers need of a connection: a *pgx.Conn, *pgxpool.Pool
// or pgx.Tx.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	CopyFrom(ctx context.Context, table pgx.Identifier, columns []string, src pgx.CopyFromSource) (int64, error)
}

var identRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

func checkSchema(schema string) error {
	if !identRE.MatchString(schema) {
		return fmt.Errorf("meshhook: schema name %q must match [a-z_][a-z0-9_]{0,62}", schema)
	}
	return nil
}

// CreateSchema creates schema (if it does not exist) and MeshHook's tables
// in it, running SchemaSQL unchanged with the search_path set to schema for
// its transaction only.
func CreateSchema(ctx context.Context, db DB, schema string) error {
	if err := checkSchema(schema); err != nil {
		return err
	}
	q := pgx.Identifier{schema}.Sanitize()
	// One multi-statement string: the simple protocol, one implicit
	// transaction, so SET LOCAL covers the DDL and ends with it.
	sql := "CREATE SCHEMA IF NOT EXISTS " + q + "; SET LOCAL search_path = " + q + ", pg_catalog; " + SchemaSQL
	if _, err := db.Exec(ctx, sql, pgx.QueryExecModeSimpleProtocol); err != nil {
		return fmt.Errorf("meshhook: create schema %s: %w", schema, err)
	}
	return nil
}
