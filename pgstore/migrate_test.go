package pgstore_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

func TestMigrateConcurrentAndIdempotent(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.Pool(t)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Go(func() { errs[i] = pgstore.Migrate(ctx, pool, "kb_custom") })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("migrate %d: %v", i, err)
		}
	}
	if err := pgstore.Migrate(ctx, pool, "kb_custom"); err != nil {
		t.Fatalf("second migrate: %v", err)
	}
	var v int32
	if err := pool.QueryRow(ctx, `SELECT version FROM kb_custom.schema_version`).Scan(&v); err != nil {
		t.Fatal(err)
	}
	if v != pgstore.SchemaVersion() || v < 2 {
		t.Fatalf("version %d, want %d", v, pgstore.SchemaVersion())
	}
	var tables int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_tables WHERE schemaname = 'kb_custom'
		AND tablename IN ('kek','data_keys','encrypted_secrets','key_events')`).Scan(&tables); err != nil {
		t.Fatal(err)
	}
	if tables != 4 {
		t.Fatalf("%d tables, want 4", tables)
	}
	// Nothing was created in the default schema.
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_namespace WHERE nspname = 'keybroker'`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("default schema exists (%d, %v)", n, err)
	}
}

func TestMigrateRejectsBadSchemaName(t *testing.T) {
	pool := pgtest.Pool(t)
	huge := strings.Repeat("x", 10<<20) + "-"
	for _, name := range []string{`x"; DROP TABLE y; --`, "Upper", "pg_catalog", "pg_temp", "pg_toast", "information_schema", "1abc", "a-b", huge} {
		err := pgstore.Migrate(context.Background(), pool, name)
		if !errors.Is(err, pgstore.ErrInvalidArgument) {
			t.Errorf("schema %.80q: got %.200v, want ErrInvalidArgument", name, err)
			continue
		}
		if msg := err.Error(); len(msg) > 200 || strings.Contains(msg, "\n") {
			t.Errorf("schema %.80q: error of %d bytes: %.200s", name, len(msg), msg)
		}
		if _, err := pgstore.New(context.Background(), pool, pgstore.Config{Schema: name, KEK: newKEK(t, "k")}); !errors.Is(err, pgstore.ErrInvalidArgument) {
			t.Errorf("New with schema %.80q: %.200v, want ErrInvalidArgument", name, err)
		}
	}
	if err := pgstore.Migrate(context.Background(), pool, huge); err.Error() != `pgstore: invalid argument: schema name "`+huge[:64]+`"… must match [a-z_][a-z0-9_]{0,62}` {
		t.Errorf("huge name: %.200s", err)
	}
	// public is an ordinary schema.
	if err := pgstore.Migrate(context.Background(), pool, "public"); err != nil {
		t.Fatalf("public: %v", err)
	}
	newStore(t, pool, pgstore.Config{Schema: "public", KEK: newKEK(t, "k")})
	var n int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_namespace WHERE nspname NOT LIKE 'pg\_%' AND nspname NOT IN ('public','information_schema')`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("schemas created: %d (%v)", n, err)
	}
}

func TestMigrateRefusesNewerSchema(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.Pool(t)
	if err := pgstore.Migrate(ctx, pool, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `UPDATE keybroker.schema_version SET version = version + 1`); err != nil {
		t.Fatal(err)
	}
	if err := pgstore.Migrate(ctx, pool, ""); !errors.Is(err, pgstore.ErrSchemaVersion) {
		t.Fatalf("got %v, want ErrSchemaVersion", err)
	}
}

// Migration 11 adds service_tokens.client_cert_sha256 to a database that
// already has tokens: they keep working unbound (NULL), and the column
// takes only a 32-byte SHA-256.
func TestMigrationTokenClientCert(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.Pool(t)
	if err := pgstore.MigrateTo(ctx, pool, "", 10); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO keybroker.service_tokens (id, name, secret_hash, operations, expires_at)
VALUES (gen_random_uuid(), 'old', decode(repeat('ab', 32), 'hex'), ARRAY['read'], now() + interval '1 hour')`); err != nil {
		t.Fatal(err)
	}
	if err := pgstore.Migrate(ctx, pool, ""); err != nil {
		t.Fatal(err)
	}
	var unbound bool
	if err := pool.QueryRow(ctx, `SELECT client_cert_sha256 IS NULL FROM keybroker.service_tokens WHERE name = 'old'`).Scan(&unbound); err != nil || !unbound {
		t.Fatalf("existing token after migration: unbound %v, %v", unbound, err)
	}
	if _, err := pool.Exec(ctx, `UPDATE keybroker.service_tokens SET client_cert_sha256 = decode(repeat('ab', 31), 'hex')`); err == nil {
		t.Fatal("a 31-byte fingerprint was stored")
	}
	if _, err := pool.Exec(ctx, `UPDATE keybroker.service_tokens SET client_cert_sha256 = decode(repeat('ab', 32), 'hex')`); err != nil {
		t.Fatal(err)
	}
}
