package pgstore

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"regexp"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/tern/v2/migrate"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// DefaultSchema is the schema the tables live in unless Config.Schema says
// otherwise.
const DefaultSchema = "keybroker"

// VersionTable is the table, inside the schema, that records the schema
// version applied (tern's version table).
const VersionTable = "schema_version"

// schemaLock serialises Migrate across processes (a session advisory lock,
// in addition to tern's own) so that creating the schema and tern's version
// table cannot race.
const schemaLock = int64(0x6b62_7067_7374_6f72) // "kbpgstor"

var identRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// checkSchema validates a schema name: lower-case letters, digits and
// underscores, starting with a letter or underscore, at most 63 bytes (so it
// needs no case folding and is never truncated), and not one PostgreSQL
// reserves: pg_* (catalogs, pg_toast, pg_temp) or information_schema, which
// pg_dump leaves out of backups, so secrets stored there would vanish from
// them. public is an ordinary schema and allowed. The error quotes at most
// the first 64 bytes of a bad name.
func checkSchema(name string) error {
	if !identRE.MatchString(name) {
		return fmt.Errorf("%w: schema name %s must match [a-z_][a-z0-9_]{0,62}", ErrInvalidArgument, quoteShort(name))
	}
	if strings.HasPrefix(name, "pg_") || name == "information_schema" {
		return fmt.Errorf("%w: schema name %q is reserved by PostgreSQL (pg_*, information_schema)", ErrInvalidArgument, name)
	}
	return nil
}

// quoteShort quotes s for an error message, cut to its first 64 bytes with
// "…" marking the cut, so a huge argument cannot make a huge error line.
func quoteShort(s string) string {
	const n = 64
	if len(s) <= n {
		return strconv.Quote(s)
	}
	return strconv.Quote(s[:n]) + "…"
}

// SchemaVersion is the schema version this package's migrations produce.
func SchemaVersion() int32 {
	names, err := migrate.FindMigrations(migrationsFS())
	if err != nil {
		panic("pgstore: embedded migrations: " + err.Error()) // build defect, caught by any test
	}
	return int32(len(names))
}

func migrationsFS() fs.FS {
	sub, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		panic("pgstore: embedded migrations: " + err.Error())
	}
	return sub
}

// Migrate creates the schema (default "keybroker") and brings its tables to
// the latest version. It is idempotent and safe to run from several
// processes at once: they serialise on advisory locks and each migration
// runs in its own transaction, recorded in <schema>.schema_version. The
// role needs CREATE on the database (or an existing schema it owns). The
// locks are session-level, so Migrate needs a direct connection: through a
// connection pooler it fails with ErrPooler before changing anything.
func Migrate(ctx context.Context, pool *pgxpool.Pool, schema string) error {
	return migrateTo(ctx, pool, schema, SchemaVersion())
}

// migrateTo is Migrate stopping at version target (tests take a schema to
// an older version this way, to test upgrades from it).
func migrateTo(ctx context.Context, pool *pgxpool.Pool, schema string, target int32) error {
	if schema == "" {
		schema = DefaultSchema
	}
	if err := checkSchema(schema); err != nil {
		return err
	}
	if err := checkDirect(ctx, pool); err != nil {
		return err
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	defer conn.Release()
	c := conn.Conn()
	if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1)", schemaLock); err != nil {
		return fmt.Errorf("pgstore: migrate: lock: %w", err)
	}
	defer func() {
		// A lost connection releases the lock by itself; otherwise unlock
		// with a fresh context so a cancelled ctx cannot leave it held.
		if _, err := c.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", schemaLock); err != nil {
			conn.Conn().Close(context.WithoutCancel(ctx))
		}
	}()
	q := pgx.Identifier{schema}.Sanitize()
	if _, err := c.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+q); err != nil {
		return fmt.Errorf("pgstore: migrate: create schema %s: %w", schema, err)
	}
	m, err := migrate.NewMigratorEx(ctx, c, q+"."+pgx.Identifier{VersionTable}.Sanitize(), &migrate.MigratorOptions{})
	if err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	m.Data["schema"] = q
	if err := m.LoadMigrations(migrationsFS()); err != nil {
		return fmt.Errorf("pgstore: migrate: load: %w", err)
	}
	cur, err := m.GetCurrentVersion(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	if want := int32(len(m.Migrations)); cur > want {
		return fmt.Errorf("%w: database schema %s is at version %d, newer than this build's %d", ErrSchemaVersion, schema, cur, want)
	}
	if cur >= target {
		return nil
	}
	if err := m.MigrateTo(ctx, target); err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	return nil
}

// checkVersion reports ErrSchemaVersion unless the schema is at exactly this
// build's version.
func checkVersion(ctx context.Context, pool *pgxpool.Pool, schema string) error {
	var v int32
	err := pool.QueryRow(ctx, "SELECT version FROM "+pgx.Identifier{schema, VersionTable}.Sanitize()).Scan(&v)
	if err != nil {
		if isUndefinedTable(err) {
			return fmt.Errorf("%w: schema %s is not migrated: run Migrate", ErrSchemaVersion, schema)
		}
		return fmt.Errorf("pgstore: read schema version: %w", err)
	}
	if want := SchemaVersion(); v != want {
		return fmt.Errorf("%w: schema %s is at version %d, this build needs %d: run Migrate", ErrSchemaVersion, schema, v, want)
	}
	return nil
}
