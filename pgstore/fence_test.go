package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// keyringFile writes a fresh keyring (id "test") to a file and returns its
// path.
func keyringFile(t testing.TB) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keyring.json")
	if err := newKEK(t, "test").Save(path); err != nil {
		t.Fatal(err)
	}
	return path
}

func openFile(t testing.TB, path string) *local.Provider {
	t.Helper()
	p, err := local.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// waitForLockWait returns once some backend of the database is waiting for
// a lock (the state the race tests need), polling pg_stat_activity.
func waitForLockWait(t testing.TB, pool *pgxpool.Pool) { t.Helper(); waitForLockWaits(t, pool, 1) }

// waitForLockWaits returns once n backends of the database wait for locks.
func waitForLockWaits(t testing.TB, pool *pgxpool.Pool, n int64) {
	t.Helper()
	for count(t, pool, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`) < n {
		if t.Context().Err() != nil {
			t.Fatalf("fewer than %d backends wait for a lock", n)
		}
	}
}

// Defect 1: a Store whose keyring predates another process's rotate
// --retire must not store a data key under the retired version.
func TestStaleKeyringRefusedUnderRetiredVersion(t *testing.T) {
	ctx := context.Background()
	path := keyringFile(t)
	e := newEnv(t, pgstore.Config{DirectKEK: true, KEK: openFile(t, path)})
	stale := e.store
	if err := stale.Put(ctx, "p0", "s", []byte("v")); err != nil {
		t.Fatal(err)
	}
	// The operator, in another process.
	op := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: openFile(t, path)})
	v1, err := op.PrimaryVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := op.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := op.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := op.RetireKEK(ctx, v1); err != nil {
		t.Fatal(err)
	}
	err = stale.Put(ctx, "p1", "s", []byte("v"))
	// With a keyring that follows its file the retry succeeds under the new
	// version; without, the refusal is ErrRetiredVersion. Never a data key
	// under the retired version, never an acknowledged unreadable write.
	if err != nil && !errors.Is(err, pgstore.ErrRetiredVersion) {
		t.Fatalf("put: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys d JOIN keybroker.kek k ON k.id = d.kek_id WHERE k.retired_at IS NOT NULL`); n != 0 {
		t.Fatalf("%d data keys under a retired version (put: %v)", n, err)
	}
	fresh := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: openFile(t, path)})
	if err == nil {
		if got, gerr := fresh.Get(ctx, "p1", "s"); gerr != nil || string(got) != "v" {
			t.Fatalf("a fresh process reads the acknowledged write: %q, %v", got, gerr)
		}
	} else if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = 'p1'`); n != 0 {
		t.Fatalf("refused put left %d data keys", n)
	}
}

// refreshing is a keyring file provider that sees its file only on
// Refresh: it serves a private copy of the file, which never changes (so
// provider/local's own following of the file cannot pick up the rotation),
// copied again on Refresh. It stands for a process whose keyring is stale
// until the Store refreshes it.
type refreshing struct {
	path, dir string
	mu        sync.Mutex
	p         *local.Provider
	refreshes int
}

func (r *refreshing) snapshot() (*local.Provider, error) {
	data, err := os.ReadFile(r.path)
	if err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(r.dir, "snapshot-*.json") // mode 0600
	if err != nil {
		return nil, err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	return local.OpenFile(f.Name())
}

func (r *refreshing) cur() *local.Provider { r.mu.Lock(); defer r.mu.Unlock(); return r.p }
func (r *refreshing) Ref() provider.KeyRef { return r.cur().Ref() }
func (r *refreshing) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	return r.cur().Wrap(ctx, dek, aad)
}
func (r *refreshing) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	return r.cur().Unwrap(ctx, wk, aad)
}
func (r *refreshing) Refresh(context.Context) error {
	p, err := r.snapshot()
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.p, r.refreshes = p, r.refreshes+1
	r.mu.Unlock()
	return nil
}

// On the database's refusal the Store refreshes its keyring and creates the
// data key again, under the version now primary.
func TestRetiredRefusalRefreshesKeyring(t *testing.T) {
	ctx := context.Background()
	path := keyringFile(t)
	kek := &refreshing{path: path, dir: t.TempDir()}
	var err error
	if kek.p, err = kek.snapshot(); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, pgstore.Config{DirectKEK: true, KEK: kek})
	if err := e.store.Put(ctx, "p0", "s", []byte("v")); err != nil {
		t.Fatal(err)
	}
	op := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: openFile(t, path)})
	v1, _ := op.PrimaryVersion(ctx)
	if _, err := op.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := op.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := op.RetireKEK(ctx, v1); err != nil {
		t.Fatal(err)
	}
	if err := e.store.Put(ctx, "p1", "s", []byte("w")); err != nil {
		t.Fatalf("put after refresh: %v", err)
	}
	if kek.refreshes != 1 {
		t.Fatalf("%d refreshes, want 1", kek.refreshes)
	}
	if v := count(t, e.pool, `SELECT k.key_version::bigint FROM keybroker.data_keys d JOIN keybroker.kek k ON k.id = d.kek_id WHERE d.project_id = 'p1'`); v != 2 {
		t.Fatalf("p1's data key under version %d, want 2", v)
	}
	if got, err := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: openFile(t, path)}).Get(ctx, "p1", "s"); err != nil || string(got) != "w" {
		t.Fatalf("fresh get: %q, %v", got, err)
	}
}

// The trigger fences a data key insert against a concurrent retire, both
// ways round, with two real connections.
func TestRetiredFenceRace(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{DirectKEK: true})
	putMany(t, e.store, 1, 1)
	v1, _ := e.store.PrimaryVersion(ctx)
	if _, err := e.store.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil {
		t.Fatal(err)
	}
	kekID := count(t, e.pool, `SELECT id FROM keybroker.kek WHERE key_version = '1'`)
	insert := func(db interface {
		Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
	}, project string) error {
		_, err := db.Exec(ctx, `INSERT INTO keybroker.data_keys (id, project_id, kek_id, wrapped_dek) VALUES (gen_random_uuid(), $1, $2, '\x01')`, project, kekID)
		return err
	}

	t.Run("create first", func(t *testing.T) {
		tx, err := e.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		if err := insert(tx, "racer"); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- e.store.RetireKEK(ctx, v1) }()
		waitForLockWait(t, e.pool)
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		var inUse *pgstore.InUseError
		if err := <-done; !errors.As(err, &inUse) || inUse.DataKeys != 1 {
			t.Fatalf("retire after a committed create: %v", err)
		}
		if _, err := e.pool.Exec(ctx, `DELETE FROM keybroker.data_keys WHERE project_id = 'racer'`); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("retire first", func(t *testing.T) {
		tx := retiringTx(t, e, kekID)
		done := make(chan error, 1)
		go func() { done <- insert(e.pool, "racer") }()
		waitForLockWait(t, e.pool)
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		var pe *pgconn.PgError
		if err := <-done; !errors.As(err, &pe) || pe.Code != "KB001" {
			t.Fatalf("create after a committed retire: %v", err)
		}
		if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE kek_id = $1`, kekID); n != 0 {
			t.Fatalf("%d data keys under the retired version", n)
		}
		// Rewrapping to a retired version is refused the same way.
		if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET kek_id = $1`, kekID); !errors.As(err, &pe) || pe.Code != "KB001" {
			t.Fatalf("rewrap to a retired version: %v", err)
		}
	})
}

// Defect 3: once Reencrypt's retirement commits, no writer, whatever its
// reservation, stores an envelope under the retired key.
func TestReencryptFencesWriters(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	putMany(t, e.store, 1, 4) // p0: s0..s3
	writer := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
	if err := writer.Put(ctx, "p0", "s0", []byte("w")); err != nil { // reserves the old key
		t.Fatal(err)
	}
	old := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = 'p0'`)
	if old != 1 {
		t.Fatalf("%d data keys", old)
	}
	var lateErr error
	var lateRetired int64 = -1
	res, err := e.store.Reencrypt(ctx, "p0", pgstore.ReencryptOptions{BatchSize: 1, Progress: func(p pgstore.ReencryptProgress) {
		if p.Done != 1 {
			return
		}
		lateErr = writer.Put(ctx, "p0", "late", []byte("l"))
		lateRetired = count(t, e.pool, `SELECT count(*) FROM keybroker.encrypted_secrets s JOIN keybroker.data_keys d ON d.id = s.data_key_id
			WHERE s.project_id = 'p0' AND s.name = 'late' AND d.state = 'retired'`)
	}})
	if err != nil {
		t.Fatal(err)
	}
	if lateErr != nil || lateRetired != 0 {
		t.Fatalf("put during reencrypt: %v; %d envelopes under the retired key", lateErr, lateRetired)
	}
	if res.Reencrypted != 4 || res.RemainingKeys != 0 || res.DestroyedKeys != 1 {
		t.Fatalf("reencrypt: %+v", res)
	}
	if got, err := e.store.Get(ctx, "p0", "late"); err != nil || string(got) != "l" {
		t.Fatalf("late: %q, %v", got, err)
	}
}

// Concurrent writers, each its own Store, overwrite a project's secrets
// while Reencrypt runs: every row is re-encrypted at most once (none is
// written back under a retired key for Reencrypt to chase), the old key is
// destroyed, and every writer's last value reads back.
func TestReencryptConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{ReserveChunk: 1000})
	const names = 40
	putMany(t, e.store, 1, names)
	const writers = 4
	stop := make(chan struct{})
	last := make([]map[string]string, writers)
	errs := make([]error, writers)
	var started, wg sync.WaitGroup
	for w := range writers {
		s := newStore(t, e.pool, pgstore.Config{KEK: e.kek, ReserveChunk: 1000})
		last[w] = map[string]string{}
		started.Add(1)
		wg.Go(func() {
			for i := 0; ; i++ {
				name := fmt.Sprintf("s%d", (i*writers+w)%names)
				v := fmt.Sprintf("w%d-%d", w, i)
				if err := s.Put(ctx, "p0", name, []byte(v)); err != nil {
					errs[w] = err
					if i == 0 {
						started.Done()
					}
					return
				}
				last[w][name] = v
				if i == 0 {
					started.Done()
				}
				select {
				case <-stop:
					return
				default:
				}
			}
		})
	}
	started.Wait() // every writer holds a reservation on the old key
	res, err := e.store.Reencrypt(ctx, "p0", pgstore.ReencryptOptions{BatchSize: 5, Wait: 10 * time.Second})
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	for w, err := range errs {
		if err != nil {
			t.Fatalf("writer %d: %v", w, err)
		}
	}
	if res.RemainingKeys != 0 || res.DestroyedKeys != 1 || res.Reencrypted > res.Pending {
		t.Fatalf("reencrypt: %+v", res)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE state = 'retired'`); n != 0 {
		t.Fatalf("%d retired data keys left", n)
	}
	// Each name's final value is one some writer wrote last, or the
	// original if no writer touched it.
	for i := range names {
		name := fmt.Sprintf("s%d", i)
		got, err := e.store.Get(ctx, "p0", name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		ok := string(got) == fmt.Sprintf("v0-%d", i)
		for w := range writers {
			ok = ok || last[w][name] == string(got)
		}
		if !ok {
			t.Fatalf("%s = %q: nobody wrote that last", name, got)
		}
	}
}

// Defect 5 and (b): Rewrap skips and reports a corrupt key and a key other
// transactions hold, recounts what remains, and finishes a dead worker's
// rows once its transaction is gone.
func TestRewrapReportsSkippedCorruptRemaining(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{DirectKEK: true})
	putMany(t, e.store, 6, 1)
	if _, err := e.store.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET wrapped_dek = set_byte(wrapped_dek, 20, get_byte(wrapped_dek, 20) # 1) WHERE project_id = 'p0'`); err != nil {
		t.Fatal(err)
	}
	// A worker that died mid-batch: its transaction holds p1's row.
	locker, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer locker.Rollback(ctx)
	if _, err := locker.Exec(ctx, `SELECT id FROM keybroker.data_keys WHERE project_id = 'p1' FOR NO KEY UPDATE`); err != nil {
		t.Fatal(err)
	}
	res, err := e.store.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: 2, LockWait: -1})
	if err != nil {
		t.Fatalf("rewrap: %v", err)
	}
	if res.Rewrapped != 4 || res.Skipped != 1 || res.Remaining != 2 || len(res.Corrupt) != 1 || res.Corrupt[0].Project != "p0" || res.Corrupt[0].Version != "1" {
		t.Fatalf("rewrap: %+v", res)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'dek.corrupt' AND project_id = 'p0'`); n != 1 {
		t.Fatalf("%d dek.corrupt events", n)
	}
	// With a wait, Rewrap waits for the held row; the worker's transaction
	// ends (its connection dropped) and Rewrap does the row itself.
	done := make(chan pgstore.RewrapResult, 1)
	go func() {
		res, err := e.store.Rewrap(ctx, pgstore.RewrapOptions{LockWait: pgstore.DefaultLockWait * 100})
		if err != nil {
			t.Error(err)
		}
		done <- res
	}()
	waitForLockWait(t, e.pool)
	if err := locker.Conn().Close(ctx); err != nil {
		t.Fatal(err)
	}
	res = <-done
	if res.Rewrapped != 1 || res.Skipped != 0 || res.Remaining != 1 || len(res.Corrupt) != 1 {
		t.Fatalf("rewrap after the worker died: %+v", res)
	}
	for p := 1; p < 6; p++ {
		if got, err := e.store.Get(ctx, fmt.Sprintf("p%d", p), "s0"); err != nil || string(got) != fmt.Sprintf("v%d-0", p) {
			t.Fatalf("p%d: %q, %v", p, got, err)
		}
	}
}

// Defect 6: RetireKEK commits the database side first; a key service
// refusal (here a read-only keyring; in the field, a kill) leaves a state
// CheckProviders reports and a rerun finishes without a second kek.retire.
func TestRetireKEKDatabaseFirst(t *testing.T) {
	ctx := context.Background()
	path := keyringFile(t)
	file := openFile(t, path)
	e := newEnv(t, pgstore.Config{DirectKEK: true, KEK: file})
	putMany(t, e.store, 2, 1)
	v1, _ := e.store.PrimaryVersion(ctx)
	if _, err := e.store.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("KB_TEST_KEYRING", string(data))
	ro, err := local.FromEnv("KB_TEST_KEYRING")
	if err != nil {
		t.Fatal(err)
	}
	half := newStore(t, e.pool, pgstore.Config{DirectKEK: true, KEK: ro})
	if err := half.RetireKEK(ctx, v1); err == nil || !errors.Is(err, pgstore.ErrRetireIncomplete) || !errors.Is(err, local.ErrReadOnly) {
		t.Fatalf("retire with a read-only keyring: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.kek WHERE key_version = '1' AND retired_at IS NOT NULL`); n != 1 {
		t.Fatal("the database side did not commit")
	}
	st, err := half.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := half.CheckProviders(ctx, st); err != nil {
		t.Fatal(err)
	}
	if len(st.RetiredLive) != 1 || st.RetiredLive[0] != v1 || len(st.UnrecordedPrimary) != 0 {
		t.Fatalf("half-retired: %+v %+v", st.RetiredLive, st.UnrecordedPrimary)
	}
	// The rerun, with the writable keyring, finishes the key service side.
	if err := e.store.RetireKEK(ctx, v1); err != nil {
		t.Fatal(err)
	}
	if err := e.store.RetireKEK(ctx, v1); err != nil { // and again: nothing to do
		t.Fatal(err)
	}
	events := func(ev string) int64 {
		return count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = $1`, ev)
	}
	if events("kek.retire") != 1 || events("kek.retire.provider") != 1 {
		t.Fatalf("events: kek.retire %d, kek.retire.provider %d", events("kek.retire"), events("kek.retire.provider"))
	}
	st, _ = e.store.Status(ctx)
	if err := e.store.CheckProviders(ctx, st); err != nil || len(st.RetiredLive) != 0 {
		t.Fatalf("after the rerun: %+v, %v", st.RetiredLive, err)
	}
	// A rotation the database has not recorded (a rotate killed after the
	// keyring write) shows too, and recording it audits it.
	if _, err := file.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	st, _ = e.store.Status(ctx)
	if err := e.store.CheckProviders(ctx, st); err != nil || len(st.UnrecordedPrimary) != 1 || st.UnrecordedPrimary[0].Version != "3" {
		t.Fatalf("unrecorded primary: %+v, %v", st.UnrecordedPrimary, err)
	}
	if _, err := e.store.PrimaryVersion(ctx); err != nil {
		t.Fatal(err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events e JOIN keybroker.kek k ON k.id = e.kek_id WHERE e.event = 'kek.record' AND k.key_version = '3'`); n != 1 {
		t.Fatalf("%d kek.record events for version 3", n)
	}
}

// Defect 6: each committed import batch has its migrate.plaintext event,
// even when the run dies afterwards.
func TestMigratePlaintextAuditPerBatch(t *testing.T) {
	e := newEnv(t, pgstore.Config{})
	legacy(t, e.pool, "text", 5)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := e.store.MigratePlaintext(ctx, legacySource,
		pgstore.MigrateOptions{BatchSize: 2, Progress: func(pgstore.MigrateProgress) { cancel() }})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("migrate: %v", err)
	}
	migrated := count(t, e.pool, `SELECT count(*) FROM keybroker.encrypted_secrets`)
	if events := count(t, e.pool, `SELECT coalesce(sum(count), 0) FROM keybroker.key_events WHERE event = 'migrate.plaintext'`); migrated != 2 || events != migrated {
		t.Fatalf("%d secrets migrated, migrate.plaintext events count %d", migrated, events)
	}
}

// (c): a reservation whose data key row vanished (foreign keys bypassed)
// gives Put neither pgx's "no rows" nor a lost write: it moves to a fresh
// data key.
func TestPutAfterDataKeyRowVanished(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{CacheEntries: 1})
	s := e.store
	if err := s.Put(ctx, "p", "a", []byte("1")); err != nil { // reserves p's key
		t.Fatal(err)
	}
	if err := s.Put(ctx, "q", "x", []byte("2")); err != nil { // evicts it from the cache
		t.Fatal(err)
	}
	conn, err := e.pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `SET session_replication_role = replica; DELETE FROM keybroker.data_keys WHERE project_id = 'p'; RESET session_replication_role`); err != nil {
		t.Fatal(err)
	}
	conn.Release()
	if err := s.Put(ctx, "p", "b", []byte("3")); err != nil {
		t.Fatalf("put: %v", err)
	}
	if got, err := s.Get(ctx, "p", "b"); err != nil || string(got) != "3" {
		t.Fatalf("get: %q, %v", got, err)
	}
}

// The race itself: a Put whose envelope is sealed under the old key
// reaches the database while Reencrypt's retiring transaction is open. It
// waits for it and, once it commits, stores nothing under the retired key
// but redoes the write under the new one. (The retiring transaction is
// held open by a lock on key_events, which it writes last.)
func TestPutDuringReencryptRetire(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	putMany(t, e.store, 1, 2)
	writer := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
	if err := writer.Put(ctx, "p0", "s0", []byte("w")); err != nil { // reserves the old key
		t.Fatal(err)
	}
	hold, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, `LOCK TABLE keybroker.key_events IN SHARE MODE`); err != nil {
		t.Fatal(err)
	}
	reencrypted := make(chan error, 1)
	var res pgstore.ReencryptResult
	go func() {
		var err error
		res, err = e.store.Reencrypt(ctx, "p0", pgstore.ReencryptOptions{})
		reencrypted <- err
	}()
	waitForLockWaits(t, e.pool, 1) // the retire has updated the keys, not committed
	put := make(chan error, 1)
	go func() { put <- writer.Put(ctx, "p0", "inflight", []byte("i")) }()
	waitForLockWaits(t, e.pool, 2) // the Put waits for the retiring transaction
	if err := hold.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-put; err != nil {
		t.Fatalf("put: %v", err)
	}
	if err := <-reencrypted; err != nil {
		t.Fatalf("reencrypt: %v", err)
	}
	if res.RemainingKeys != 0 || res.DestroyedKeys != 1 {
		t.Fatalf("reencrypt: %+v", res)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = 'p0'`); n != 1 {
		t.Fatalf("%d data keys left", n)
	}
	if got, err := e.store.Get(ctx, "p0", "inflight"); err != nil || string(got) != "i" {
		t.Fatalf("inflight: %q, %v", got, err)
	}
}

// Migration 012's statement-level fence, for an UPDATE of many data keys
// (Rewrap's batch) racing RetireKEK of the version it moves them to, both
// ways round, with two real connections.
func TestRetiredFenceRaceBatchUpdate(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{DirectKEK: true})
	putMany(t, e.store, 3, 1)
	v1, _ := e.store.PrimaryVersion(ctx)
	if _, err := e.store.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if res, err := e.store.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil || res.Rewrapped != 3 {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	kekID := count(t, e.pool, `SELECT id FROM keybroker.kek WHERE key_version = '1'`)
	v2ID := count(t, e.pool, `SELECT max(kek_id) FROM keybroker.data_keys`)
	// Moving the rows back under v1 is a change of kek_id the fence checks
	// (the wrapped keys stay v2's: nothing reads them here).
	moveBack := `UPDATE keybroker.data_keys SET kek_id = $1`

	t.Run("update first", func(t *testing.T) {
		tx, err := e.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		if ct, err := tx.Exec(ctx, moveBack, kekID); err != nil || ct.RowsAffected() != 3 {
			t.Fatalf("batch update: %v, %v", ct, err)
		}
		done := make(chan error, 1)
		go func() { done <- e.store.RetireKEK(ctx, v1) }()
		waitForLockWait(t, e.pool) // the retire waits for the fence's FOR SHARE
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		var inUse *pgstore.InUseError
		if err := <-done; !errors.As(err, &inUse) || inUse.DataKeys != 3 {
			t.Fatalf("retire after a committed batch update: %v", err)
		}
		if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET kek_id = $1`, v2ID); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("retire first", func(t *testing.T) {
		tx := retiringTx(t, e, kekID)
		done := make(chan error, 1)
		go func() { _, err := e.pool.Exec(ctx, moveBack, kekID); done <- err }()
		waitForLockWait(t, e.pool) // the update's fence waits for the retire
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		var pe *pgconn.PgError
		if err := <-done; !errors.As(err, &pe) || pe.Code != "KB001" {
			t.Fatalf("batch update after a committed retire: %v, want KB001", err)
		}
		if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE kek_id = $1`, kekID); n != 0 {
			t.Fatalf("%d data keys under the retired version", n)
		}
	})
}

// The statement-level fence checks every changed row of a batch update
// (one bad row refuses the statement), and lets an update that changes no
// kek_id or project_id (a budget reservation) through without a check.
func TestUpdateFenceSetBased(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{DirectKEK: true})
	putMany(t, e.store, 3, 1) // p0..p2, unbound
	v2, err := e.store.RotateKEK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v2ID := count(t, e.pool, `SELECT id FROM keybroker.kek WHERE key_version = $1`, v2.Version)
	// A chain of p9's own, and a kek row of it.
	if _, err := e.pool.Exec(ctx, `INSERT INTO keybroker.tenant_chains VALUES ('tenant-p9', 'p9', 'awskms:///alias/x')`); err != nil {
		t.Fatal(err)
	}
	chainKek := count(t, e.pool, `SELECT keybroker.record_kek('intermediate', 'tenant-p9', '1', NULL)`)
	var pe *pgconn.PgError
	// p1's key under p9's chain, the others' to v2: refused as a whole.
	_, err = e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET kek_id = CASE WHEN project_id = 'p1' THEN $1::bigint ELSE $2::bigint END`, chainKek, v2ID)
	if !errors.As(err, &pe) || pe.Code != "KB006" {
		t.Fatalf("batch update with one key under another project's chain: %v, want KB006", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE kek_id = $1`, v2ID); n != 0 {
		t.Fatalf("%d data keys moved by a refused update", n)
	}
	// Retired target: KB001, whichever row.
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.kek SET retired_at = now() WHERE id = $1`, v2ID); err != nil {
		t.Fatal(err)
	}
	_, err = e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET kek_id = $1 WHERE project_id = 'p2'`, v2ID)
	if !errors.As(err, &pe) || pe.Code != "KB001" {
		t.Fatalf("update to a retired version: %v, want KB001", err)
	}
	// Unchanged kek_id and project_id: no fence, even with the row's
	// binding now wrong for it.
	if _, err := e.pool.Exec(ctx, `INSERT INTO keybroker.project_keks (project_id, chain_id) VALUES ('p0', 'tenant-p9')`); err != nil {
		t.Fatal(err)
	}
	if ct, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET messages = messages + 1`); err != nil || ct.RowsAffected() != 3 {
		t.Fatalf("budget update: %v, %v", ct, err)
	}
	if err := e.store.Put(ctx, "p1", "again", []byte("v")); err != nil {
		t.Fatalf("put after budget updates: %v", err)
	}
}

// retiringTx begins a transaction that does what RetireKEK's does to kek
// row kekID (locks it FOR UPDATE, sets retired_at) and leaves it open for
// the test to commit; it is rolled back when t ends if not.
func retiringTx(t *testing.T, e *env, kekID int64) pgx.Tx {
	t.Helper()
	ctx := context.Background()
	tx, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tx.Rollback(ctx) })
	if _, err := tx.Exec(ctx, `SELECT id FROM keybroker.kek WHERE id = $1 FOR UPDATE`, kekID); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `UPDATE keybroker.kek SET retired_at = now() WHERE id = $1`, kekID); err != nil {
		t.Fatal(err)
	}
	return tx
}
