package pgcolumn_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/meshhook"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// secretsColumn declares MeshHook's secrets.value_encrypted.
var secretsColumn = pgcolumn.Column{Table: "public.secrets", Project: "project_id", Key: []string{"key"}, Value: "value_encrypted"}

// env is a migrated database with MeshHook's schema (verbatim, in public), a Store over it and
// the installed secrets column.
type env struct {
	url   string
	pool  *pgxpool.Pool
	store *pgstore.Store
	col   *pgcolumn.Encrypted
}

func newEnv(t testing.TB) *env {
	t.Helper()
	kek, err := local.Generate("test")
	if err != nil {
		t.Fatal(err)
	}
	return newEnvKEK(t, kek)
}

// newEnvKEK is newEnv with the Store's KEK given.
func newEnvKEK(t testing.TB, kek provider.KEKProvider) *env {
	t.Helper()
	ctx := context.Background()
	u := pgtest.NewDatabase(t)
	pool := pgtest.PoolFor(t, u)
	if err := pgstore.Migrate(ctx, pool, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, meshhook.SchemaSQL); err != nil {
		t.Fatal(err)
	}
	store, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	if err := pgcolumn.Install(ctx, store, secretsColumn); err != nil {
		t.Fatal(err)
	}
	col, err := pgcolumn.New(ctx, store, secretsColumn, pgcolumn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return &env{url: u, pool: pool, store: store, col: col}
}

// project inserts a MeshHook project and returns its id (text form).
func (e *env) project(t testing.TB) string {
	t.Helper()
	var id string
	if err := e.pool.QueryRow(context.Background(), `INSERT INTO projects (owner, name) VALUES (gen_random_uuid(), 'p') RETURNING id::text`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	return id
}

func count(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// newStoreOn is a second Store over e's database (its own cache and
// reservations, as another process would have), closed when t ends.
func newStoreOn(t testing.TB, e *env) *pgstore.Store {
	t.Helper()
	s, err := pgstore.New(context.Background(), e.pool, pgstore.Config{KEK: e.store.Keyring()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}
