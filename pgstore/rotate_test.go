package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

func putMany(t testing.TB, s *pgstore.Store, projects, perProject int) {
	t.Helper()
	ctx := context.Background()
	for p := range projects {
		for n := range perProject {
			if err := s.Put(ctx, fmt.Sprintf("p%d", p), fmt.Sprintf("s%d", n), fmt.Appendf(nil, "v%d-%d", p, n)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func checkMany(t testing.TB, s *pgstore.Store, projects, perProject int) {
	t.Helper()
	ctx := context.Background()
	for p := range projects {
		for n := range perProject {
			got, err := s.Get(ctx, fmt.Sprintf("p%d", p), fmt.Sprintf("s%d", n))
			if want := fmt.Sprintf("v%d-%d", p, n); err != nil || string(got) != want {
				t.Fatalf("p%d/s%d: %q, %v; want %q", p, n, got, err, want)
			}
		}
	}
}

func TestRotateRewrapRetire(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{DirectKEK: true, Actor: "tester"})
	s := e.store
	putMany(t, s, 5, 3)
	old, err := s.PrimaryVersion(ctx)
	if err != nil || old.Version != "1" {
		t.Fatalf("primary: %v, %v", old, err)
	}
	secretsBefore := snapshotSecrets(t, e)
	v2, err := s.RotateKEK(ctx)
	if err != nil || v2.Version != "2" {
		t.Fatalf("rotate: %v, %v", v2, err)
	}
	// Retiring the old version is refused while data keys use it.
	err = s.RetireKEK(ctx, old)
	var inUse *pgstore.InUseError
	if !errors.Is(err, pgstore.ErrRetiredVersionInUse) || !errors.As(err, &inUse) || inUse.DataKeys != 5 {
		t.Fatalf("retire in use: %v", err)
	}
	if err := s.RetireKEK(ctx, v2); !errors.Is(err, pgstore.ErrPrimaryVersion) {
		t.Fatalf("retire primary: %v", err)
	}
	if err := s.RetireKEK(ctx, pgstore.KEKVersion{Provider: "local", KeyID: "test", Version: "99"}); !errors.Is(err, pgstore.ErrUnknownVersion) {
		t.Fatalf("retire unknown: %v", err)
	}
	// Dry run: counts, changes nothing.
	before := snapshot(t, e.pool)
	res, err := s.Rewrap(ctx, pgstore.RewrapOptions{DryRun: true})
	if err != nil || len(res.Pending) != 1 || res.Pending[0].DataKeys != 5 || res.Pending[0].Version != "1" || res.Rewrapped != 0 {
		t.Fatalf("dry run: %+v, %v", res, err)
	}
	if snapshot(t, e.pool) != before {
		t.Fatal("dry run changed the database")
	}
	var progress []pgstore.RewrapProgress
	res, err = s.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: 2, Progress: func(p pgstore.RewrapProgress) { progress = append(progress, p) }})
	if err != nil || res.Rewrapped != 5 || res.Primary != v2 {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	if len(progress) != 3 || progress[2] != (pgstore.RewrapProgress{Done: 5, Total: 5}) {
		t.Fatalf("progress: %+v", progress)
	}
	// Only data_keys changed.
	if snapshotSecrets(t, e) != secretsBefore {
		t.Fatal("rewrap touched encrypted_secrets")
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys d JOIN keybroker.kek k ON k.id = d.kek_id WHERE k.key_version <> '2'`); n != 0 {
		t.Fatalf("%d data keys not under version 2", n)
	}
	if n := count(t, e.pool, `SELECT coalesce(sum(count), 0) FROM keybroker.key_events WHERE event = 'kek.rewrap' AND actor = 'tester'`); n != 5 {
		t.Fatalf("rewrap events count %d", n)
	}
	// Nothing left: a second run does nothing.
	if res, err := s.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil || res.Rewrapped != 0 || len(res.Pending) != 0 {
		t.Fatalf("second rewrap: %+v, %v", res, err)
	}
	if err := s.RetireKEK(ctx, old); err != nil {
		t.Fatalf("retire: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.kek WHERE key_version = '1' AND retired_at IS NOT NULL`); n != 1 {
		t.Fatal("kek row not marked retired")
	}
	// The provider no longer holds version 1, and everything still decrypts
	// with a fresh cache.
	st, _ := e.kek.Describe(ctx)
	for _, v := range st.Versions {
		if v == "1" {
			t.Fatal("provider still has version 1")
		}
	}
	checkMany(t, newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: e.kek}), 5, 3)
	// The kek row cannot be deleted while referenced, nor a data key.
	if _, err := e.pool.Exec(ctx, `DELETE FROM keybroker.kek WHERE key_version = '2'`); err == nil {
		t.Fatal("deleted a referenced kek row")
	}
	if _, err := e.pool.Exec(ctx, `DELETE FROM keybroker.data_keys`); err == nil {
		t.Fatal("deleted referenced data keys")
	}
}

// Moving between backends: data keys wrapped by one provider are rewrapped
// to the keyring's new primary, after which the old one is not needed.
func TestRewrapAcrossProviders(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{DirectKEK: true})
	putMany(t, e.store, 4, 2)
	newKEK := newKEK(t, "new-backend")
	s := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: keyring(t, newKEK, e.kek)})
	res, err := s.Rewrap(ctx, pgstore.RewrapOptions{})
	if err != nil || res.Rewrapped != 4 || res.Primary.KeyID != "new-backend" {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	checkMany(t, newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: newKEK}), 4, 2)
}

// Several processes share a rewrap; each data key is rewrapped once.
func TestRewrapConcurrent(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{DirectKEK: true})
	putMany(t, e.store, 40, 1)
	if _, err := e.store.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	done := make([]int64, 3)
	errs := make([]error, 3)
	for i := range done {
		s := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: e.kek})
		wg.Go(func() {
			res, err := s.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: 3, Workers: i + 1})
			done[i], errs[i] = res.Rewrapped, err
		})
	}
	wg.Wait()
	var total int64
	for i := range done {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		total += done[i]
	}
	if total != 40 {
		t.Fatalf("rewrapped %d in all, want 40", total)
	}
	// Each batch's event counts the rows its compare-and-swap changed.
	if n := count(t, e.pool, `SELECT coalesce(sum(count), 0) FROM keybroker.key_events WHERE event = 'kek.rewrap'`); n != 40 {
		t.Fatalf("kek.rewrap events count %d data keys, want 40", n)
	}
	checkMany(t, newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: e.kek}), 40, 1)
}

// A rewrap that fails part-way (a data key whose provider the keyring
// lacks) keeps the committed batches, rolls back the failing one, and a
// later run finishes once the problem is fixed.
func TestRewrapFailsCleanlyAndResumes(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{DirectKEK: true})
	putMany(t, e.store, 3, 1)
	// A fourth project's key under another provider.
	other := newKEK(t, "other")
	so := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: other})
	if err := so.Put(ctx, "zz", "n", []byte("v")); err != nil {
		t.Fatal(err)
	}
	v2, err := e.store.RotateKEK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before := snapshotSecrets(t, e)
	// Batch size 1 commits the keys ordered before the failing one.
	_, err = e.store.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: 1})
	if !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("rewrap without the other provider: %v", err)
	}
	if snapshotSecrets(t, e) != before {
		t.Fatal("secrets changed")
	}
	n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys d JOIN keybroker.kek k ON k.id = d.kek_id WHERE k.key_version = $1`, v2.Version)
	if n >= 4 {
		t.Fatalf("%d keys under v2 after a failed run", n)
	}
	s := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: keyring(t, e.kek, other)})
	res, err := s.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: 1})
	if err != nil || res.Rewrapped != 4-n {
		t.Fatalf("resumed rewrap: %+v, %v (had %d)", res, err, n)
	}
	checkMany(t, newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: e.kek}), 3, 1)
	if got, err := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: e.kek}).Get(ctx, "zz", "n"); err != nil || string(got) != "v" {
		t.Fatalf("zz: %q, %v", got, err)
	}
}

func TestReencrypt(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	s := e.store
	putMany(t, s, 2, 7)
	var oldKey string
	if err := e.pool.QueryRow(ctx, `SELECT id::text FROM keybroker.data_keys WHERE project_id = 'p0'`).Scan(&oldKey); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, e.pool)
	res, err := s.Reencrypt(ctx, "p0", pgstore.ReencryptOptions{DryRun: true})
	if err != nil || res.Pending != 7 || res.Reencrypted != 0 {
		t.Fatalf("dry run: %+v, %v", res, err)
	}
	if snapshot(t, e.pool) != before {
		t.Fatal("dry run changed the database")
	}
	var progress []pgstore.ReencryptProgress
	res, err = s.Reencrypt(ctx, "p0", pgstore.ReencryptOptions{BatchSize: 3, Progress: func(p pgstore.ReencryptProgress) { progress = append(progress, p) }})
	if err != nil || res.Reencrypted != 7 || res.RetiredKeys != 1 || res.DestroyedKeys != 1 || res.RemainingKeys != 0 {
		t.Fatalf("reencrypt: %+v, %v", res, err)
	}
	if len(progress) != 3 || progress[2] != (pgstore.ReencryptProgress{Done: 7, Total: 7}) {
		t.Fatalf("progress: %+v", progress)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE id::text = $1`, oldKey); n != 0 {
		t.Fatal("old data key not destroyed")
	}
	if n := count(t, e.pool, `SELECT count(DISTINCT data_key_id) FROM keybroker.encrypted_secrets WHERE project_id = 'p0'`); n != 1 {
		t.Fatalf("p0 secrets under %d keys", n)
	}
	// p1 untouched; everything decrypts, also with a fresh cache.
	checkMany(t, s, 2, 7)
	checkMany(t, newStore(t, e.pool, pgstore.Config{KEK: e.kek}), 2, 7)
	// Writes continue under the new key.
	if err := s.Put(ctx, "p0", "after", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'dek.destroy' AND project_id = 'p0'`); n != 1 {
		t.Fatalf("%d dek.destroy events", n)
	}
}

// A secret that does not decrypt stops re-encryption with a clear error;
// no secret changes, no data key is destroyed, and Resume finishes once
// the row is repaired.
func TestReencryptCorruptRow(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	s := e.store
	putMany(t, s, 1, 4)
	var saved []byte
	if err := e.pool.QueryRow(ctx, `SELECT encrypted_data FROM keybroker.encrypted_secrets WHERE name = 's2'`).Scan(&saved); err != nil {
		t.Fatal(err)
	}
	corrupt := append([]byte(nil), saved...)
	corrupt[len(corrupt)-1] ^= 1
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.encrypted_secrets SET encrypted_data = $1 WHERE name = 's2'`, corrupt); err != nil {
		t.Fatal(err)
	}
	before := snapshotSecrets(t, e)
	keys := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys`)
	_, err := s.Reencrypt(ctx, "p0", pgstore.ReencryptOptions{})
	if err == nil || !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("reencrypt with a corrupt row: %v", err)
	}
	if snapshotSecrets(t, e) != before {
		t.Fatal("secrets changed")
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys`); n < keys {
		t.Fatal("a data key was destroyed")
	}
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.encrypted_secrets SET encrypted_data = $1 WHERE name = 's2'`, saved); err != nil {
		t.Fatal(err)
	}
	res, err := s.Reencrypt(ctx, "p0", pgstore.ReencryptOptions{Resume: true})
	if err != nil || res.Reencrypted != 4 || res.DestroyedKeys != 1 {
		t.Fatalf("resume: %+v, %v", res, err)
	}
	checkMany(t, newStore(t, e.pool, pgstore.Config{KEK: e.kek}), 1, 4)
}

func snapshotSecrets(t testing.TB, e *env) string {
	t.Helper()
	var s string
	if err := e.pool.QueryRow(context.Background(), `SELECT coalesce(string_agg(s::text, ',' ORDER BY project_id, name), '') FROM keybroker.encrypted_secrets s`).Scan(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

// A process holding a reservation on a data key that another process's
// Reencrypt destroyed gets a foreign-key refusal on its next Put, and
// retries under the project's new key: no write is lost.
func TestPutAfterConcurrentReencrypt(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	a := e.store
	b := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
	if err := a.Put(ctx, "p", "one", []byte("1")); err != nil { // a reserves a chunk of the key
		t.Fatal(err)
	}
	res, err := b.Reencrypt(ctx, "p", pgstore.ReencryptOptions{})
	if err != nil || res.DestroyedKeys != 1 {
		t.Fatalf("reencrypt: %+v, %v", res, err)
	}
	if err := a.Put(ctx, "p", "two", []byte("2")); err != nil {
		t.Fatalf("put after the key was destroyed: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = 'p'`); n != 1 {
		t.Fatalf("%d data keys", n)
	}
	for name, want := range map[string]string{"one": "1", "two": "2"} {
		if got, err := a.Get(ctx, "p", name); err != nil || string(got) != want {
			t.Fatalf("%s: %q, %v", name, got, err)
		}
	}
}
