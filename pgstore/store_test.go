package pgstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

func TestPutGetDeleteList(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	s := e.store
	if err := s.Put(ctx, "p1", "db-password", []byte("hunter2")); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, "p1", "api-key", []byte{}); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, "p2", "db-password", []byte("other")); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get(ctx, "p1", "db-password")
	if err != nil || string(got) != "hunter2" {
		t.Fatalf("get: %q, %v", got, err)
	}
	if got, err := s.Get(ctx, "p1", "api-key"); err != nil || len(got) != 0 {
		t.Fatalf("get empty: %q, %v", got, err)
	}
	// Overwrite keeps one row and changes the value.
	if err := s.Put(ctx, "p1", "db-password", []byte("hunter3")); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Get(ctx, "p1", "db-password"); string(got) != "hunter3" {
		t.Fatalf("after overwrite: %q", got)
	}
	list, err := s.List(ctx, "p1")
	if err != nil || len(list) != 2 || list[0].Name != "api-key" || list[1].Name != "db-password" {
		t.Fatalf("list: %+v, %v", list, err)
	}
	// The database never holds the plaintext.
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.encrypted_secrets WHERE position('hunter'::bytea in encrypted_data) > 0`); n != 0 {
		t.Fatal("plaintext found in encrypted_data")
	}
	// One data key per project.
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys`); n != 2 {
		t.Fatalf("%d data keys, want 2", n)
	}
	if err := s.Delete(ctx, "p1", "db-password"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "p1", "db-password"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("get deleted: %v", err)
	}
	if err := s.Delete(ctx, "p1", "db-password"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("delete twice: %v", err)
	}
	if got, _ := s.Get(ctx, "p2", "db-password"); string(got) != "other" {
		t.Fatalf("p2: %q", got)
	}
}

func TestInvalidArguments(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	before := snapshot(t, e.pool)
	cases := []struct {
		project, name string
		value         []byte
	}{
		{"", "n", nil},
		{"p", "", nil},
		{strings.Repeat("p", pgstore.MaxProjectLen+1), "n", nil},
		{"p", strings.Repeat("n", pgstore.MaxNameLen+1), nil},
		{"p", "a\x00b", nil},
		{"p", "\xff", nil},
		{"p", "n", make([]byte, pgstore.MaxValueLen+1)},
	}
	for _, c := range cases {
		if err := e.store.Put(ctx, c.project, c.name, c.value); !errors.Is(err, pgstore.ErrInvalidArgument) {
			t.Errorf("put(%.10q, %.10q, %d bytes): %v, want ErrInvalidArgument", c.project, c.name, len(c.value), err)
		}
	}
	if after := snapshot(t, e.pool); after != before {
		t.Fatal("invalid puts changed the database")
	}
	for _, cfg := range []pgstore.Config{
		{},                            // no KEK
		{KEK: e.kek, Budget: -1},      // negative budget
		{KEK: e.kek, Budget: 1 << 40}, // over the GCM limit
		{KEK: e.kek, Budget: 10, ReserveChunk: 11},
		{KEK: e.kek, Schema: "Bad-Name"},
	} {
		if _, err := pgstore.New(ctx, e.pool, cfg); !errors.Is(err, pgstore.ErrInvalidArgument) {
			t.Errorf("New(%+v): %v, want ErrInvalidArgument", cfg, err)
		}
	}
	// Not migrated.
	if _, err := pgstore.New(ctx, e.pool, pgstore.Config{KEK: e.kek, Schema: "elsewhere"}); !errors.Is(err, pgstore.ErrSchemaVersion) {
		t.Errorf("unmigrated schema: %v", err)
	}
}

// A ciphertext moved to another row, name or project does not decrypt,
// and neither does a row whose nonce column disagrees with its blob.
func TestAADBindsProjectAndName(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	s := e.store
	for _, p := range []string{"a", "b"} {
		for _, n := range []string{"x", "y"} {
			if err := s.Put(ctx, p, n, []byte(p+"/"+n)); err != nil {
				t.Fatal(err)
			}
		}
	}
	exec := func(sql string) {
		t.Helper()
		if _, err := e.pool.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	// Same project, other name: same data key, wrong aad.
	exec(`UPDATE keybroker.encrypted_secrets t SET encrypted_data = f.encrypted_data, nonce = f.nonce
		FROM keybroker.encrypted_secrets f WHERE f.project_id = 'a' AND f.name = 'x' AND t.project_id = 'a' AND t.name = 'y'`)
	if got, err := s.Get(ctx, "a", "y"); !errors.Is(err, envelope.ErrDecrypt) || got != nil {
		t.Fatalf("copied within project: %q, %v", got, err)
	}
	// Other project: the blob names a data key of project a.
	exec(`UPDATE keybroker.encrypted_secrets t SET encrypted_data = f.encrypted_data, nonce = f.nonce
		FROM keybroker.encrypted_secrets f WHERE f.project_id = 'a' AND f.name = 'x' AND t.project_id = 'b' AND t.name = 'x'`)
	if got, err := s.Get(ctx, "b", "x"); !errors.Is(err, envelope.ErrDecrypt) || got != nil {
		t.Fatalf("copied across projects: %q, %v", got, err)
	}
	// The foreign key refuses pointing a secret at another project's key.
	_, err := e.pool.Exec(ctx, `UPDATE keybroker.encrypted_secrets SET data_key_id = (SELECT id FROM keybroker.data_keys WHERE project_id = 'a')
		WHERE project_id = 'b'`)
	if err == nil || !strings.Contains(err.Error(), "foreign key") {
		t.Fatalf("cross-project data key accepted: %v", err)
	}
	// Moving a project's wrapped DEK to another project's row fails to unwrap.
	exec(`UPDATE keybroker.data_keys t SET wrapped_dek = f.wrapped_dek FROM keybroker.data_keys f WHERE f.project_id = 'a' AND t.project_id = 'b'`)
	fresh := newStore(t, e.pool, pgstore.Config{KEK: e.kek}) // empty cache
	if _, err := fresh.Get(ctx, "b", "y"); !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("moved wrapped DEK: %v", err)
	}
	// A nonce column that disagrees with the blob.
	exec(`UPDATE keybroker.encrypted_secrets SET nonce = '\x000000000000000000000000' WHERE project_id = 'a' AND name = 'x'`)
	if _, err := s.Get(ctx, "a", "x"); !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("nonce mismatch: %v", err)
	}
	// Corrupt blobs.
	exec(`UPDATE keybroker.encrypted_secrets SET encrypted_data = '\xdeadbeef' WHERE project_id = 'a' AND name = 'y'`)
	if _, err := s.Get(ctx, "a", "y"); !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("corrupt blob: %v", err)
	}
}

func TestWrongKEK(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	if err := e.store.Put(ctx, "p", "n", []byte("v")); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, e.pool)
	// Same key id, different material.
	wrong := newStore(t, e.pool, pgstore.Config{KEK: newKEK(t, "test")})
	if _, err := wrong.Get(ctx, "p", "n"); !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("wrong key material: %v", err)
	}
	// Another key altogether.
	other := newStore(t, e.pool, pgstore.Config{KEK: newKEK(t, "other")})
	_, err := other.Get(ctx, "p", "n")
	if !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("other key: %v", err)
	}
	if strings.Contains(err.Error(), "\n") {
		t.Fatalf("multi-line error: %q", err)
	}
	if after := snapshot(t, e.pool); after != before {
		t.Fatal("failed reads changed the database")
	}
}

func TestLostConnection(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	px, viaProxy := newProxy(t, e.url)
	pool := pgtest.PoolFor(t, viaProxy)
	s := newStore(t, pool, pgstore.Config{KEK: e.kek})
	if err := s.Put(ctx, "p", "n", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, e.pool)
	px.cut()
	if err := s.Put(ctx, "p", "n", []byte("v2")); err == nil || !strings.HasPrefix(err.Error(), "pgstore: ") {
		t.Fatalf("put over a lost connection: %v", err)
	}
	if _, err := s.Get(ctx, "p", "n"); err == nil {
		t.Fatal("get over a lost connection succeeded")
	}
	if after := snapshot(t, e.pool); after != before {
		t.Fatal("lost connection changed the database")
	}
	if got, err := e.store.Get(ctx, "p", "n"); err != nil || string(got) != "v1" {
		t.Fatalf("after: %q, %v", got, err)
	}
}

// Several stores (processes) writing one project with a small budget never
// exceed it, keep one active data key, and lose no write.
func TestBudgetAcrossProcesses(t *testing.T) {
	ctx := context.Background()
	const budget, chunk = 7, 3
	e := newEnv(t, pgstore.Config{Budget: budget, ReserveChunk: chunk})
	stores := []*pgstore.Store{e.store}
	for range 2 {
		stores = append(stores, newStore(t, e.pool, pgstore.Config{KEK: e.kek, Budget: budget, ReserveChunk: chunk}))
	}
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i, s := range stores {
		wg.Go(func() {
			for j := range 20 {
				if err := s.Put(ctx, "p", fmt.Sprintf("s%d-%d", i, j), []byte{byte(i), byte(j)}); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE messages > $1`, budget); n != 0 {
		t.Fatalf("%d data keys over budget", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE state = 'active'`); n > 1 {
		t.Fatalf("%d active data keys", n)
	}
	// A key is marked spent once its whole budget is reserved, so there may
	// be no active key now. 60 encryptions need at least 60/7 keys.
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys`); n < 9 {
		t.Fatalf("only %d data keys for 60 encryptions under a budget of %d", n, budget)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'dek.create'`); n != count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys`) {
		t.Fatalf("dek.create events do not match data keys")
	}
	fresh := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
	for i := range stores {
		for j := range 20 {
			got, err := fresh.Get(ctx, "p", fmt.Sprintf("s%d-%d", i, j))
			if err != nil || !bytes.Equal(got, []byte{byte(i), byte(j)}) {
				t.Fatalf("s%d-%d: %v, %v", i, j, got, err)
			}
		}
	}
}

// TestBudgetOfCreator: a data key keeps the budget of the Store that
// created it. A Store left at the default budget (an operator's CLI, say)
// must not take a key made by a Store with a small budget past it, and
// the small-budget Store stops at its own budget on a key the other made.
func TestBudgetOfCreator(t *testing.T) {
	ctx := context.Background()
	const small = 5
	e := newEnv(t, pgstore.Config{Budget: small, ReserveChunk: 2})
	big := newStore(t, e.pool, pgstore.Config{KEK: e.kek}) // DefaultBudget, chunk 1024
	if err := e.store.Put(ctx, "p", "a", []byte("1")); err != nil {
		t.Fatal(err)
	}
	for i := range 12 {
		if err := big.Put(ctx, "p", fmt.Sprintf("big%d", i), []byte("2")); err != nil {
			t.Fatal(err)
		}
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE messages > budget`); n != 0 {
		t.Fatalf("%d data keys over their own budget", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE budget = $1 AND messages > $1`, small); n != 0 {
		t.Fatalf("%d data keys of the small-budget store over %d", n, small)
	}
	// The default-budget store now owns the active key; the small one must
	// still stop at its own budget on it.
	for i := range 12 {
		if err := e.store.Put(ctx, "p", fmt.Sprintf("small%d", i), []byte("3")); err != nil {
			t.Fatal(err)
		}
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE budget = $1`, pgstore.DefaultBudget); n == 0 {
		t.Fatal("the default-budget store created no data key of its own")
	}
	var maxSmall int64
	if err := e.pool.QueryRow(ctx, `SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM keybroker.encrypted_secrets WHERE name LIKE 'small%' GROUP BY data_key_id) c`).Scan(&maxSmall); err != nil {
		t.Fatal(err)
	}
	if maxSmall > small {
		t.Fatalf("the small-budget store sealed %d secrets under one key, budget %d", maxSmall, small)
	}
}
