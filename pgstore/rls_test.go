package pgstore_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

// A tenant role (not owner, not superuser) sees and changes only the rows
// of the project its transaction names.
func TestRowLevelSecurity(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	putMany(t, e.store, 2, 3) // p0, p1
	role, roleURL := pgtest.NewRole(t, e.url)
	r := pgx.Identifier{role}.Sanitize()
	if _, err := e.pool.Exec(ctx, `GRANT USAGE ON SCHEMA keybroker TO `+r+`;
		GRANT SELECT ON keybroker.schema_version TO `+r+`;
		GRANT SELECT ON keybroker.kek TO `+r+`;
		GRANT SELECT, INSERT ON keybroker.key_events TO `+r+`;
		GRANT SELECT, INSERT, UPDATE, DELETE ON keybroker.data_keys, keybroker.encrypted_secrets TO `+r+`;
		GRANT EXECUTE ON FUNCTION keybroker.record_kek(text, text, text, text) TO `+r); err != nil {
		t.Fatal(err)
	}
	tenant := pgtest.PoolFor(t, roleURL)

	countIn := func(pool *pgxpool.Pool, project, sql string) (n int64) {
		t.Helper()
		err := pgstore.WithProject(ctx, pool, project, func(tx pgx.Tx) error { return tx.QueryRow(ctx, sql).Scan(&n) })
		if err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		return n
	}
	if n := countIn(tenant, "p0", `SELECT count(*) FROM keybroker.encrypted_secrets`); n != 3 {
		t.Fatalf("tenant in p0 sees %d secrets, want 3", n)
	}
	if n := countIn(tenant, "p0", `SELECT count(*) FROM keybroker.data_keys`); n != 1 {
		t.Fatalf("tenant in p0 sees %d data keys, want 1", n)
	}
	// Without a project, nothing.
	var n int64
	if err := tenant.QueryRow(ctx, `SELECT count(*) FROM keybroker.encrypted_secrets`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("tenant without project sees %d (%v)", n, err)
	}
	before := snapshotSecrets(t, e)
	// Changes to another project's rows touch nothing...
	err := pgstore.WithProject(ctx, tenant, "p0", func(tx pgx.Tx) error {
		for _, sql := range []string{
			`UPDATE keybroker.encrypted_secrets SET updated_at = now() WHERE project_id = 'p1'`,
			`DELETE FROM keybroker.encrypted_secrets WHERE project_id = 'p1'`,
			`DELETE FROM keybroker.data_keys WHERE project_id = 'p1'`,
		} {
			ct, err := tx.Exec(ctx, sql)
			if err != nil {
				return err
			}
			if ct.RowsAffected() != 0 {
				t.Errorf("%s: %d rows", sql, ct.RowsAffected())
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// ...and writing a row for another project is refused (and rolled back).
	err = pgstore.WithProject(ctx, tenant, "p0", func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE keybroker.encrypted_secrets SET project_id = 'p1', name = 'stolen' WHERE name = 's0'`)
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "row-level security") {
		t.Fatalf("moving a row to another project: %v", err)
	}
	if snapshotSecrets(t, e) != before {
		t.Fatal("tenant changed rows")
	}
	// A Store on the tenant role works within each call's project.
	ts := newStore(t, tenant, pgstore.Config{KEK: e.kek})
	if got, err := ts.Get(ctx, "p1", "s2"); err != nil || string(got) != "v1-2" {
		t.Fatalf("tenant store get: %q, %v", got, err)
	}
	if err := ts.Put(ctx, "p2", "fresh", []byte("x")); err != nil { // creates a data key under RLS
		t.Fatalf("tenant store put: %v", err)
	}
	if list, err := ts.List(ctx, "p2"); err != nil || len(list) != 1 {
		t.Fatalf("tenant list: %v, %v", list, err)
	}
	// Key management across projects is for the owner: the tenant sees no
	// data keys without a project.
	if _, err := ts.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil {
		t.Fatalf("tenant rewrap (sees nothing to do): %v", err)
	}
	if err := pgstore.WithProject(ctx, tenant, "", nil); !errors.Is(err, pgstore.ErrInvalidArgument) {
		t.Fatalf("empty project: %v", err)
	}
}

// A tenant role with the documented grants cannot forge or alter kek rows
// (which status, rewrap and retire trust), yet its Store records new KEK
// versions through record_kek and keeps working.
func TestTenantCannotForgeKEK(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	putMany(t, e.store, 1, 1) // kek row for version 1
	role, roleURL := pgtest.NewRole(t, e.url)
	r := pgx.Identifier{role}.Sanitize()
	if _, err := e.pool.Exec(ctx, `GRANT USAGE ON SCHEMA keybroker TO `+r+`;
		GRANT SELECT ON keybroker.schema_version, keybroker.kek TO `+r+`;
		GRANT SELECT, INSERT ON keybroker.key_events TO `+r+`;
		GRANT SELECT, INSERT, UPDATE, DELETE ON keybroker.data_keys, keybroker.encrypted_secrets TO `+r+`;
		GRANT EXECUTE ON FUNCTION keybroker.record_kek(text, text, text, text) TO `+r); err != nil {
		t.Fatal(err)
	}
	tenant := pgtest.PoolFor(t, roleURL)
	before := snapshot(t, e.pool)
	for _, sql := range []string{
		`INSERT INTO keybroker.kek (provider, key_id, key_version, retired_at) VALUES ('local', 'test', '2', now())`,
		`UPDATE keybroker.kek SET retired_at = now()`,
		`UPDATE keybroker.kek SET retired_at = NULL`,
		`DELETE FROM keybroker.kek`,
	} {
		_, err := tenant.Exec(ctx, sql)
		if pe := (*pgconn.PgError)(nil); !errors.As(err, &pe) || pe.Code != "42501" {
			t.Errorf("%s: %v, want permission denied", sql, err)
		}
	}
	if snapshot(t, e.pool) != before {
		t.Fatal("tenant changed the kek table")
	}
	// A new KEK version, recorded by the tenant's Store: through the
	// function, with its audit event, not retired.
	if _, err := e.kek.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	ts := newStore(t, tenant, pgstore.Config{KEK: e.kek, Actor: "tenant"})
	if err := ts.Put(ctx, "p9", "s", []byte("v")); err != nil {
		t.Fatalf("tenant put: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.kek WHERE key_version = '2' AND retired_at IS NULL`); n != 1 {
		t.Fatalf("%d unretired kek rows for version 2", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events e JOIN keybroker.kek k ON k.id = e.kek_id
		WHERE e.event = 'kek.record' AND k.key_version = '2' AND e.actor = 'tenant'`); n != 1 {
		t.Fatalf("%d kek.record events for version 2", n)
	}
	if got, err := ts.Get(ctx, "p9", "s"); err != nil || string(got) != "v" {
		t.Fatalf("tenant get: %q, %v", got, err)
	}
}

// Migration 3 takes back the INSERT on kek that earlier documentation told
// operators to grant tenants. (The schema is taken back to version 2 by
// dropping what migration 3 creates.)
func TestMigrationRevokesTenantKEKWrites(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	role, _ := pgtest.NewRole(t, e.url)
	r := pgx.Identifier{role}.Sanitize()
	if _, err := e.pool.Exec(ctx, `DROP TRIGGER data_keys_kek_fence ON keybroker.data_keys;
		DROP FUNCTION keybroker.data_keys_kek_fence(); DROP FUNCTION keybroker.record_kek(text, text, text, text);
		UPDATE keybroker.schema_version SET version = 2;
		GRANT SELECT, INSERT, UPDATE ON keybroker.kek TO `+r); err != nil {
		t.Fatal(err)
	}
	if err := pgstore.Migrate(ctx, e.pool, ""); err != nil {
		t.Fatal(err)
	}
	var ins, upd, sel bool
	if err := e.pool.QueryRow(ctx, `SELECT has_table_privilege($1, 'keybroker.kek', 'INSERT'), has_table_privilege($1, 'keybroker.kek', 'UPDATE'),
		has_table_privilege($1, 'keybroker.kek', 'SELECT')`, role).Scan(&ins, &upd, &sel); err != nil {
		t.Fatal(err)
	}
	if ins || upd || !sel {
		t.Fatalf("after migration 3: INSERT %v, UPDATE %v, SELECT %v on kek; want false, false, true", ins, upd, sel)
	}
}
