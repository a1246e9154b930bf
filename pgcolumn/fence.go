package pgcolumn

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/pgstore"
)

// installLock serialises Installs of one database (pg_advisory_xact_lock):
// CREATE OR REPLACE FUNCTION and CREATE TRIGGER racing each other fail
// with "tuple concurrently updated" rather than wait.
const installLock = 0x6b62636f6c756d6e // "kbcolumn"

// Install declares col in the registry (keybroker's columns table) and
// attaches its fence trigger to the application table, in one transaction.
// It runs DDL: call it as the role that migrates keybroker's schema (which
// then owns the trigger function) with the TRIGGER privilege on the table.
// It is idempotent: installing a declared column again regenerates its
// trigger function and trigger. A column already declared with other
// project or key columns is refused (its values are bound to them).
//
// Install checks col against the catalog, failing with ErrInvalidArgument
// naming the problem: the table exists; Value is a bytea column; Project
// and Key are NOT NULL columns, together exactly the columns of a unique
// index (a primary key or unique constraint will do) without predicate,
// expressions or included columns, so that no two rows share a context.
//
// The trigger (docs/STORAGE.md, "The fence trigger") runs BEFORE INSERT OR
// UPDATE OF the value column and accepts a NULL value, an unchanged value,
// a sealed value whose data key is of the row's project and the column's
// scope and not retired (read FOR KEY SHARE, so that Reencrypt's FOR
// UPDATE retirement fences writers in the database), and an unsealed value
// only while the column accepts legacy values.
func Install(ctx context.Context, store *pgstore.Store, col Column) error {
	ks, err := layered(store)
	if err != nil {
		return err
	}
	if err := col.check(); err != nil {
		return err
	}
	schema := ks.Schema()
	q := pgx.Identifier{schema}.Sanitize()
	err = pgx.BeginFunc(ctx, ks.Pool(), func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(installLock)); err != nil {
			return err
		}
		if _, _, err := columnTypes(ctx, tx, col); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+q+`.columns (table_name, column_name, project_column, key_columns)
VALUES ($1, $2, $3, $4) ON CONFLICT (table_name, column_name) DO NOTHING`, col.Table, col.Value, col.Project, col.Key); err != nil {
			return err
		}
		var (
			id      int64
			project string
			key     []string
		)
		if err := tx.QueryRow(ctx, `SELECT id, project_column, key_columns FROM `+q+`.columns WHERE table_name = $1 AND column_name = $2`,
			col.Table, col.Value).Scan(&id, &project, &key); err != nil {
			return err
		}
		if project != col.Project || !slices.Equal(key, col.Key) {
			return fmt.Errorf("%w: %s.%s is already installed with project column %q and key columns %q (its values are bound to them)",
				ErrInvalidArgument, col.Table, col.Value, project, key)
		}
		fn := q + "." + pgx.Identifier{fenceFunction(id)}.Sanitize()
		trigger := triggerPrefix(schema) + strconv.FormatInt(id, 10)
		if len(trigger) > maxIdentLen {
			return fmt.Errorf("%w: schema name %q too long for the trigger name %q", ErrInvalidArgument, schema, trigger)
		}
		for _, stmt := range []string{
			fenceSQL(q, fn, id, col),
			`REVOKE ALL ON FUNCTION ` + fn + `() FROM PUBLIC`,
			`DROP TRIGGER IF EXISTS ` + pgx.Identifier{trigger}.Sanitize() + ` ON ` + quoteTable(col),
			`CREATE TRIGGER ` + pgx.Identifier{trigger}.Sanitize() + ` BEFORE INSERT OR UPDATE OF ` + pgx.Identifier{col.Value}.Sanitize() +
				` ON ` + quoteTable(col) + ` FOR EACH ROW EXECUTE FUNCTION ` + fn + `()`,
		} {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return err
			}
		}
		return ks.Event(ctx, tx, "column.install", "", nil, 1, map[string]any{"column": col.Scope()})
	})
	if err != nil {
		if errors.Is(err, ErrInvalidArgument) {
			return err
		}
		return fmt.Errorf("pgcolumn: install %s.%s: %w", col.Table, col.Value, err)
	}
	return nil
}

// fenceFunction is the name of column id's trigger function, in
// keybroker's schema.
func fenceFunction(id int64) string { return "column_fence_" + strconv.FormatInt(id, 10) }

// triggerPrefix starts the name of a column's trigger (then its registry
// id). The schema is part of it so that two keybroker schemas declaring
// one table do not replace each other's trigger.
func triggerPrefix(schema string) string { return schema + "_fence_" }

// textLit is s as a SQL expression that does not depend on
// standard_conforming_strings or on any quoting: its UTF-8 bytes in hex.
func textLit(s string) string {
	return "convert_from(decode('" + hex.EncodeToString([]byte(s)) + "', 'hex'), 'UTF8')"
}

// fenceSQL is the CREATE OR REPLACE FUNCTION of column id's fence. The
// envelope offsets are docs/FORMAT.md's, for an external reference of 16
// bytes: magic 1..4, version 5, algorithm 6, kind 7 (2), id length 8 (16),
// key id 9..24 (1-based, as substring counts); the shortest such envelope,
// an empty plaintext, is 56 bytes.
func fenceSQL(q, fn string, id int64, col Column) string {
	v := "NEW." + pgx.Identifier{col.Value}.Sanitize()
	body := `
DECLARE
    v bytea := ` + v + `;
    scope constant text := ` + textLit(col.Scope()) + `;
    project text;
    k record;
BEGIN
    IF v IS NULL OR (TG_OP = 'UPDATE' AND OLD.` + pgx.Identifier{col.Value}.Sanitize() + ` IS NOT DISTINCT FROM v) THEN
        RETURN NEW;
    END IF;
    project := NEW.` + pgx.Identifier{col.Project}.Sanitize() + `::text;
    IF substring(v FROM 1 FOR 4) = 'KBEN'::bytea THEN
        IF length(v) < 56 OR get_byte(v, 4) <> 1 OR get_byte(v, 5) <> 1 OR get_byte(v, 6) <> 2 OR get_byte(v, 7) <> 16 THEN
            RAISE EXCEPTION 'keybroker: %: value starts like an envelope but is not a sealed column value', scope
                USING ERRCODE = 'KB004';
        END IF;
        SELECT d.project_id, d.scope, d.state INTO k FROM ` + q + `.data_keys d
        WHERE d.id = encode(substring(v FROM 9 FOR 16), 'hex')::uuid FOR KEY SHARE;
        IF NOT FOUND OR k.state = 'retired' THEN
            RAISE EXCEPTION 'keybroker: %: the value''s data key is retired or gone; seal the value again', scope
                USING ERRCODE = 'KB005';
        END IF;
        IF k.project_id IS DISTINCT FROM project OR k.scope IS DISTINCT FROM scope THEN
            RAISE EXCEPTION 'keybroker: %: value sealed for another project or column', scope
                USING ERRCODE = 'KB004';
        END IF;
        RETURN NEW;
    END IF;
    -- FOR SHARE: RefuseLegacy's UPDATE of the row waits for writers of
    -- unsealed values in flight, and those after it see its commit.
    PERFORM 1 FROM ` + q + `.columns WHERE id = ` + strconv.FormatInt(id, 10) + ` AND accept_legacy FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'keybroker: %: unsealed value refused (the column no longer accepts legacy values)', scope
            USING ERRCODE = 'KB003';
    END IF;
    RETURN NEW;
END `
	tag := "$fence$"
	for i := 0; strings.Contains(body, tag); i++ {
		tag = "$fence" + strconv.Itoa(i) + "$"
	}
	return `CREATE OR REPLACE FUNCTION ` + fn + `() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS ` + tag + body + tag
}

// queryer runs one query (a pool, a transaction).
type queryer interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// columnTypes checks col against the catalog (see Install) and returns
// the SQL types of its project and key columns.
func columnTypes(ctx context.Context, db queryer, col Column) (projType string, keyTypes []string, err error) {
	var kind string
	if err := db.QueryRow(ctx, `SELECT coalesce((SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)), '')`, quoteTable(col)).Scan(&kind); err != nil {
		return "", nil, fmt.Errorf("pgcolumn: look up table %s: %w", col.Table, err)
	}
	if kind != "r" && kind != "p" {
		return "", nil, fmt.Errorf("%w: table %s does not exist (or is not a table)", ErrInvalidArgument, col.Table)
	}
	names := append([]string{col.Project, col.Value}, col.Key...)
	rows, err := db.Query(ctx, `SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid = 'bytea'::regtype, a.attnotnull
FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = ANY($2::text[])`,
		quoteTable(col), names)
	if err != nil {
		return "", nil, fmt.Errorf("pgcolumn: look up columns of %s: %w", col.Table, err)
	}
	type attr struct {
		typ            string
		bytea, notNull bool
	}
	attrs := map[string]attr{}
	var (
		n string
		a attr
	)
	if _, err := pgx.ForEachRow(rows, []any{&n, &a.typ, &a.bytea, &a.notNull}, func() error { attrs[n] = a; return nil }); err != nil {
		return "", nil, fmt.Errorf("pgcolumn: look up columns of %s: %w", col.Table, err)
	}
	for _, n := range names {
		if _, ok := attrs[n]; !ok {
			return "", nil, fmt.Errorf("%w: table %s has no column %q", ErrInvalidArgument, col.Table, n)
		}
	}
	if !attrs[col.Value].bytea {
		return "", nil, fmt.Errorf("%w: value column %q of %s is %s, not bytea", ErrInvalidArgument, col.Value, col.Table, attrs[col.Value].typ)
	}
	for _, n := range append([]string{col.Project}, col.Key...) {
		if !attrs[n].notNull {
			return "", nil, fmt.Errorf("%w: column %q of %s must be NOT NULL (it is part of every value's context)", ErrInvalidArgument, n, col.Table)
		}
	}
	var unique bool
	err = db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_index i
WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
  AND i.indnatts = i.indnkeyatts
  AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text) FROM unnest(i.indkey::int2[]) k
       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k)
    = (SELECT array_agg(x ORDER BY x) FROM unnest($2::text[]) x))`,
		quoteTable(col), append([]string{col.Project}, col.Key...)).Scan(&unique)
	if err != nil {
		return "", nil, fmt.Errorf("pgcolumn: look up indexes of %s: %w", col.Table, err)
	}
	if !unique {
		return "", nil, fmt.Errorf("%w: %s has no unique index on exactly (%s) without predicate or expressions: a row's context must be unique",
			ErrInvalidArgument, col.Table, strings.Join(append([]string{col.Project}, col.Key...), ", "))
	}
	for _, k := range col.Key {
		keyTypes = append(keyTypes, attrs[k].typ)
	}
	return attrs[col.Project].typ, keyTypes, nil
}
