package pgstore_test

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

// tenantURL makes a role that row-level security binds (not owner, not
// superuser), with the grants the package doc lists, and returns a URL
// connecting as it.
func tenantURL(t *testing.T, e *env) string {
	t.Helper()
	role, roleURL := pgtest.NewRole(t, e.url)
	r := pgx.Identifier{role}.Sanitize()
	if _, err := e.pool.Exec(context.Background(), pgtest.TenantGrants(r)); err != nil {
		t.Fatal(err)
	}
	return roleURL
}

// A tenant role (not owner, not superuser) sees and changes only the rows
// of the project its transaction names.
func TestRowLevelSecurity(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	putMany(t, e.store, 2, 3) // p0, p1
	tenant := pgtest.PoolFor(t, tenantURL(t, e))

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
	e := newEnv(t, pgstore.Config{DirectKEK: true})
	putMany(t, e.store, 1, 1) // kek row for version 1
	tenant := pgtest.PoolFor(t, tenantURL(t, e))
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
	ts := newStore(t, tenant, pgstore.Config{KEK: e.kek, Actor: "tenant", DirectKEK: true})
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
// operators to grant tenants: a database at version 2 with that grant,
// migrated to the latest version, no longer has it.
func TestMigrationRevokesTenantKEKWrites(t *testing.T) {
	ctx := context.Background()
	u := pgtest.NewDatabase(t)
	pool := pgtest.PoolFor(t, u)
	if err := pgstore.MigrateTo(ctx, pool, "", 2); err != nil {
		t.Fatal(err)
	}
	role, _ := pgtest.NewRole(t, u)
	if _, err := pool.Exec(ctx, `GRANT SELECT, INSERT, UPDATE ON keybroker.kek TO `+pgx.Identifier{role}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	if err := pgstore.Migrate(ctx, pool, ""); err != nil {
		t.Fatal(err)
	}
	e := &env{pool: pool}
	var ins, upd, sel bool
	if err := e.pool.QueryRow(ctx, `SELECT has_table_privilege($1, 'keybroker.kek', 'INSERT'), has_table_privilege($1, 'keybroker.kek', 'UPDATE'),
		has_table_privilege($1, 'keybroker.kek', 'SELECT')`, role).Scan(&ins, &upd, &sel); err != nil {
		t.Fatal(err)
	}
	if ins || upd || !sel {
		t.Fatalf("after migration 3: INSERT %v, UPDATE %v, SELECT %v on kek; want false, false, true", ins, upd, sel)
	}
}

// Whatever a function run by WithProject does to keybroker.project_id for
// the whole session, and however it ends, the next user of the pooled
// connection sees no project and, under row-level security, no rows.
func TestWithProjectLeavesNoProject(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	putMany(t, e.store, 1, 3) // p0
	u, err := url.Parse(tenantURL(t, e))
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("pool_max_conns", "1") // every statement below shares one connection
	u.RawQuery = q.Encode()
	tenant := pgtest.PoolFor(t, u.String())
	errFn := errors.New("fn failed")
	for _, c := range []struct {
		name string
		fn   func(ctx context.Context, cancel func(), tx pgx.Tx) error
	}{
		{"set_config for the session", func(ctx context.Context, _ func(), tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `SELECT set_config('keybroker.project_id', 'p0', false)`)
			return err
		}},
		{"SET, then an error", func(ctx context.Context, _ func(), tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SET keybroker.project_id = 'p0'`); err != nil {
				return err
			}
			return errFn
		}},
		{"its own COMMIT, then SET", func(ctx context.Context, _ func(), tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `COMMIT; SET keybroker.project_id = 'p0'`)
			return err
		}},
		{"its own COMMIT, SET, then an error", func(ctx context.Context, _ func(), tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `COMMIT; SET keybroker.project_id = 'p0'`); err != nil {
				return err
			}
			return errFn
		}},
		{"SET, then ctx cancelled", func(ctx context.Context, cancel func(), tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `SET keybroker.project_id = 'p0'`)
			cancel()
			return err
		}},
		{"its own COMMIT, SET, then a panic", func(ctx context.Context, _ func(), tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `COMMIT; SET keybroker.project_id = 'p0'`); err != nil {
				return err
			}
			panic("fn panicked")
		}},
	} {
		func() {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			defer func() { _ = recover() }()
			_ = pgstore.WithProject(ctx, tenant, "p0", func(tx pgx.Tx) error { return c.fn(ctx, cancel, tx) })
		}()
		var setting string
		var n int64
		if err := tenant.QueryRow(ctx, `SELECT coalesce(current_setting('keybroker.project_id', true), ''), (SELECT count(*) FROM keybroker.encrypted_secrets)`).Scan(&setting, &n); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if setting != "" || n != 0 {
			t.Errorf("%s: the next user of the connection has keybroker.project_id %q and sees %d secrets", c.name, setting, n)
		}
	}
	// WithProject still scopes its own transaction.
	var n int64
	if err := pgstore.WithProject(ctx, tenant, "p0", func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, `SELECT count(*) FROM keybroker.encrypted_secrets`).Scan(&n)
	}); err != nil || n != 3 {
		t.Fatalf("WithProject p0: %d secrets, %v", n, err)
	}
}

// Status under a role row-level security binds refuses, with one line
// saying why, rather than count no project's rows as zeros.
func TestStatusUnderRowSecurity(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	putMany(t, e.store, 2, 5)
	ts := newStore(t, pgtest.PoolFor(t, tenantURL(t, e)), pgstore.Config{KEK: e.kek})
	st, err := ts.Status(ctx)
	if !errors.Is(err, pgstore.ErrRowSecurity) || st != nil {
		t.Fatalf("tenant Status: %+v, %v; want ErrRowSecurity", st, err)
	}
	if err.Error() != "pgstore: counts need a role row-level security does not restrict" {
		t.Fatalf("error %q", err)
	}
	if st, err := e.store.Status(ctx); err != nil || st.Secrets != 10 {
		t.Fatalf("owner Status: %+v, %v", st, err)
	}
}
