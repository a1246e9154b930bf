package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/profullstack/keybroker/internal/pgtest"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

// The key hierarchy as pgstore uses it by default. Tests of KEK-version
// semantics with data keys wrapped directly under the KEK (fence_test.go,
// rotate_test.go) use Config.DirectKEK.

func countingKEK(t testing.TB, id string) *slowKEK {
	t.Helper()
	p, err := local.Generate(id)
	if err != nil {
		t.Fatal(err)
	}
	return &slowKEK{Provider: p}
}

func hPut(t testing.TB, s *pgstore.Store, projects int, prefix string) {
	t.Helper()
	for p := range projects {
		if err := s.Put(context.Background(), fmt.Sprintf("%s%d", prefix, p), "s", []byte(prefix+fmt.Sprint(p))); err != nil {
			t.Fatal(err)
		}
	}
}

func hGet(t testing.TB, s *pgstore.Store, projects int, prefix string) {
	t.Helper()
	for p := range projects {
		got, err := s.Get(context.Background(), fmt.Sprintf("%s%d", prefix, p), "s")
		if want := prefix + fmt.Sprint(p); err != nil || string(got) != want {
			t.Fatalf("%s%d: %q, %v; want %q", prefix, p, got, err, want)
		}
	}
}

// A fresh process reads any number of projects with one key-service call:
// the intermediate key's unwrap.
func TestHierarchyOneCallPerProcess(t *testing.T) {
	kek := countingKEK(t, "h")
	e := newEnv(t, pgstore.Config{KEK: kek})
	hPut(t, e.store, 50, "p")
	if n := kek.calls.Load(); n != 1 {
		t.Fatalf("%d key-service calls to create 50 data keys, want 1 (the intermediate key's wrap)", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys d JOIN keybroker.kek k ON k.id = d.kek_id WHERE k.provider = 'intermediate'`); n != 50 {
		t.Fatalf("%d of 50 data keys under the intermediate key", n)
	}
	before := kek.calls.Load()
	hGet(t, newStore(t, e.pool, pgstore.Config{KEK: kek}), 50, "p")
	if n := kek.calls.Load() - before; n != 1 {
		t.Fatalf("a fresh store made %d key-service calls to read 50 projects, want 1", n)
	}
}

// An existing database moves to the hierarchy by Rewrap: data keys only,
// no secret re-encrypted, and back with DirectKEK.
func TestHierarchyMigrateFromDirect(t *testing.T) {
	ctx := context.Background()
	kek := countingKEK(t, "m")
	e := newEnv(t, pgstore.Config{KEK: kek, DirectKEK: true})
	hPut(t, e.store, 10, "p")
	secrets := func() string {
		var s string
		if err := e.pool.QueryRow(ctx, `SELECT string_agg(s::text, ',' ORDER BY project_id, name) FROM keybroker.encrypted_secrets s`).Scan(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	before := secrets()
	h := newStore(t, e.pool, pgstore.Config{KEK: kek})
	hGet(t, h, 10, "p") // direct data keys read through the KEK
	if res, err := h.Rewrap(ctx, pgstore.RewrapOptions{DryRun: true}); err != nil || res.Remaining != 10 {
		t.Fatalf("dry run: %+v, %v", res, err)
	}
	res, err := h.Rewrap(ctx, pgstore.RewrapOptions{})
	if err != nil || res.Rewrapped != 10 || res.Remaining != 0 || res.Primary.Provider != "intermediate" {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	if secrets() != before {
		t.Fatal("moving to the hierarchy changed encrypted_secrets")
	}
	calls := kek.calls.Load()
	hGet(t, newStore(t, e.pool, pgstore.Config{KEK: kek}), 10, "p")
	if n := kek.calls.Load() - calls; n != 1 {
		t.Fatalf("%d key-service calls after the move, want 1", n)
	}
	// Opting out again: the hierarchy's data keys stay readable, and
	// Rewrap moves them back under the KEK.
	d := newStore(t, e.pool, pgstore.Config{KEK: kek, DirectKEK: true})
	hGet(t, d, 10, "p")
	if _, err := d.RotateIntermediate(ctx); !errors.Is(err, pgstore.ErrNotSupported) {
		t.Fatalf("RotateIntermediate with DirectKEK: %v", err)
	}
	if res, err := d.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil || res.Rewrapped != 10 || res.Primary.Provider != "local" {
		t.Fatalf("rewrap back: %+v, %v", res, err)
	}
	hGet(t, newStore(t, e.pool, pgstore.Config{KEK: kek, DirectKEK: true}), 10, "p")
	if secrets() != before {
		t.Fatal("moving back changed encrypted_secrets")
	}
}

// KEK rotation rewraps the intermediate key only; the old KEK version is
// in use (by it) until then, and can be retired after; the current KEK
// version cannot.
func TestHierarchyKEKRotation(t *testing.T) {
	ctx := context.Background()
	kek := countingKEK(t, "r")
	e := newEnv(t, pgstore.Config{KEK: kek})
	hPut(t, e.store, 20, "p")
	old, err := e.store.KEKPrimaryVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	next, err := e.store.RotateKEK(ctx)
	if err != nil || next.Version != "2" || next.Provider != "local" {
		t.Fatalf("rotate: %v, %v", next, err)
	}
	var inUse *pgstore.InUseError
	if err := e.store.RetireKEK(ctx, old); !errors.As(err, &inUse) || inUse.IntermediateKeys != 1 || inUse.DataKeys != 0 {
		t.Fatalf("retire the KEK version under the intermediate key: %v", err)
	}
	calls := kek.calls.Load()
	res, err := e.store.Rewrap(ctx, pgstore.RewrapOptions{})
	if err != nil || res.IntermediateKeys != 1 || res.Rewrapped != 0 || res.Remaining != 0 {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	if n := kek.calls.Load() - calls; n != 1 {
		t.Fatalf("%d key-service calls to rewrap after a KEK rotation over 20 data keys, want 1", n)
	}
	if err := e.store.RetireKEK(ctx, next); !errors.Is(err, pgstore.ErrPrimaryVersion) {
		t.Fatalf("retire the KEK's primary: %v", err)
	}
	if err := e.store.RetireKEK(ctx, old); err != nil {
		t.Fatal(err)
	}
	hGet(t, newStore(t, e.pool, pgstore.Config{KEK: kek}), 20, "p")
	st, err := e.store.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range st.Versions {
		if v.KEKVersion == next && v.IntermediateKeys != 1 {
			t.Fatalf("status: %s wraps %d intermediate keys, want 1", v.KEKVersion, v.IntermediateKeys)
		}
	}
}

// Intermediate key rotation: new data keys go under the new version, and
// Rewrap moves the others locally (no key-service call); the old version
// can then be retired, which deletes it.
func TestHierarchyRotateIntermediate(t *testing.T) {
	ctx := context.Background()
	kek := countingKEK(t, "i")
	e := newEnv(t, pgstore.Config{KEK: kek})
	hPut(t, e.store, 30, "p")
	prev, err := e.store.PrimaryVersion(ctx)
	if err != nil || prev.String() != "intermediate:default@1" {
		t.Fatalf("primary %v, %v", prev, err)
	}
	v, err := e.store.RotateIntermediate(ctx)
	if err != nil || v.String() != "intermediate:default@2" {
		t.Fatalf("rotate: %v, %v", v, err)
	}
	hPut(t, e.store, 3, "q")
	calls := kek.calls.Load()
	res, err := e.store.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: 7})
	if err != nil || res.Rewrapped != 30 || res.Remaining != 0 || res.Primary != v {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	if n := kek.calls.Load() - calls; n != 0 {
		t.Fatalf("rewrap to a new intermediate key made %d key-service calls", n)
	}
	if err := e.store.RetireKEK(ctx, v); !errors.Is(err, pgstore.ErrPrimaryVersion) {
		t.Fatalf("retire the current intermediate key: %v", err)
	}
	if err := e.store.RetireKEK(ctx, prev); err != nil {
		t.Fatal(err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.intermediate_keys`); n != 1 {
		t.Fatalf("%d intermediate keys after retiring version 1, want 1", n)
	}
	hGet(t, newStore(t, e.pool, pgstore.Config{KEK: kek}), 30, "p")
	hGet(t, newStore(t, e.pool, pgstore.Config{KEK: kek}), 3, "q")
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event IN ('ik.create', 'ik.rotate')`); n != 3 {
		t.Fatalf("%d ik.create/ik.rotate events, want 3", n)
	}
}

// Moving between backends: the keyring's new primary wraps the
// intermediate key at the next Rewrap (data keys untouched), after which
// the old backend is not needed.
func TestHierarchyMoveBackends(t *testing.T) {
	ctx := context.Background()
	old := countingKEK(t, "old")
	e := newEnv(t, pgstore.Config{KEK: old})
	hPut(t, e.store, 15, "p")
	nw := countingKEK(t, "new")
	s := newStore(t, e.pool, pgstore.Config{KEK: keyring(t, nw, old)})
	hGet(t, s, 15, "p")
	res, err := s.Rewrap(ctx, pgstore.RewrapOptions{})
	if err != nil || res.IntermediateKeys != 1 || res.Rewrapped != 0 || res.Remaining != 0 {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	hGet(t, newStore(t, e.pool, pgstore.Config{KEK: nw}), 15, "p")
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.intermediate_keys i JOIN keybroker.kek k ON k.id = i.kek_id WHERE k.key_id = 'old'`); n != 0 {
		t.Fatalf("%d intermediate keys still under the old backend", n)
	}
}

// A tenant role with the documented grants makes the first intermediate
// key through add_intermediate_key, and can neither alter nor delete one.
func TestHierarchyTenant(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	tenant := pgtest.PoolFor(t, tenantURL(t, e))
	ts := newStore(t, tenant, pgstore.Config{KEK: e.kek, Actor: "tenant"})
	if err := ts.Put(ctx, "p1", "s", []byte("v")); err != nil {
		t.Fatalf("tenant put: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'ik.create' AND actor = 'tenant'`); n != 1 {
		t.Fatalf("%d ik.create events by the tenant, want 1", n)
	}
	for _, sql := range []string{
		`UPDATE keybroker.intermediate_keys SET wrapped_key = '\x00'`,
		`DELETE FROM keybroker.intermediate_keys`,
		`INSERT INTO keybroker.intermediate_keys (key_id, version, kek_id, wrapped_key) SELECT key_id, version + 1, kek_id, wrapped_key FROM keybroker.intermediate_keys`,
	} {
		_, err := tenant.Exec(ctx, sql)
		if pe := (*pgconn.PgError)(nil); !errors.As(err, &pe) || pe.Code != "42501" {
			t.Errorf("%s: %v, want permission denied", sql, err)
		}
	}
	if got, err := newStore(t, tenant, pgstore.Config{KEK: e.kek}).Get(ctx, "p1", "s"); err != nil || string(got) != "v" {
		t.Fatalf("tenant get: %q, %v", got, err)
	}
}
