package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/internal/pgserver"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

// The backup drills of docs/OPERATIONS.md ("Backups") and docs/SECURITY.md ("Restoring an old
// backup"), with the PostgreSQL tools an operator uses (pg_dump and pg_restore of the test
// server's version). They are pgstore tests rather than CLI tests because what they check is
// the library's contract on a restored database: which reads succeed, and with which error the
// others fail (errors.Is against envelope.ErrDecrypt), which the CLI only prints.

// pgTool runs one of PostgreSQL's client programs and fails t with its output if it fails.
func pgTool(t *testing.T, name string, args ...string) {
	t.Helper()
	bin, err := pgserver.Tool(name)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", name, err, out)
	}
}

// dump takes a pg_dump (custom format) of the database dbURL names.
func dump(t *testing.T, dbURL string) string {
	t.Helper()
	file := filepath.Join(t.TempDir(), "keybroker.dump")
	pgTool(t, "pg_dump", "--format=custom", "--file="+file, "--dbname="+dbURL)
	return file
}

// restore restores a dump into a new database and returns its URL.
func restore(t *testing.T, file string) string {
	t.Helper()
	u := pgtest.NewDatabase(t)
	pgTool(t, "pg_restore", "--exit-on-error", "--dbname="+u, file)
	return u
}

// restoredStore opens a Store on a restored database, after Migrate (a restored schema is
// current: Migrate does nothing).
func restoredStore(t *testing.T, dbURL string, cfg pgstore.Config) *pgstore.Store {
	t.Helper()
	pool := pgtest.PoolFor(t, dbURL)
	if err := pgstore.Migrate(context.Background(), pool, ""); err != nil {
		t.Fatalf("migrate the restored database: %v", err)
	}
	return newStore(t, pool, cfg)
}

// TestBackupOfLiveStore: pg_dump of a store while writers keep writing, restored into a new
// database, verifies completely: every secret decrypts, each to a value its writer wrote
// (one acknowledged before the dump began, or later), and the restored store takes writes.
func TestBackupOfLiveStore(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{Budget: 20, ReserveChunk: 5, DirectKEK: true}) // data keys turn over during the dump
	const writers, names = 4, 25
	// acked[w][n] is the last seq of name n of writer w whose Put returned nil; attempted the
	// last tried. The value of seq s is "w<w>-n<n>-<s>".
	var acked, attempted [writers][names]atomic.Int64
	value := func(w, n int, seq int64) []byte { return fmt.Appendf(nil, "w%d-n%d-%d", w, n, seq) }
	project := func(n int) string { return "p" + strconv.Itoa(n%5) }
	name := func(w, n int) string { return fmt.Sprintf("w%d-n%02d", w, n) }
	for w := range writers {
		for n := range names {
			attempted[w][n].Store(1)
			if err := e.store.Put(ctx, project(n), name(w, n), value(w, n, 1)); err != nil {
				t.Fatal(err)
			}
			acked[w][n].Store(1)
		}
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var writeErr atomic.Pointer[error]
	for w := range writers {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				n := i % names
				seq := attempted[w][n].Add(1)
				if err := e.store.Put(ctx, project(n), name(w, n), value(w, n, seq)); err != nil {
					writeErr.CompareAndSwap(nil, &err)
					return
				}
				acked[w][n].Store(seq)
			}
		})
	}
	var before [writers][names]int64
	for w := range writers {
		for n := range names {
			before[w][n] = acked[w][n].Load()
		}
	}
	file := dump(t, e.url)
	var after [writers][names]int64
	for w := range writers {
		for n := range names {
			after[w][n] = attempted[w][n].Load()
		}
	}
	close(stop)
	wg.Wait()
	if p := writeErr.Load(); p != nil {
		t.Fatalf("writer: %v", *p)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'dek.create'`); n < 2*5 {
		t.Fatalf("only %d data keys created: the writers did not turn data keys over during the dump", n)
	}

	r := restore(t, file)
	st := restoredStore(t, r, pgstore.Config{KEK: e.kek, DirectKEK: true})
	var wrote int64
	for w := range writers {
		for n := range names {
			got, err := st.Get(ctx, project(n), name(w, n))
			if err != nil {
				t.Fatalf("restored %s: %v", name(w, n), err)
			}
			seq, err := strconv.ParseInt(string(got[strings.LastIndexByte(string(got), '-')+1:]), 10, 64)
			if err != nil || string(got) != string(value(w, n, seq)) || seq < before[w][n] || seq > after[w][n] {
				t.Fatalf("restored %s holds %q: want the value of a seq in [%d, %d]", name(w, n), got, before[w][n], after[w][n])
			}
			wrote += after[w][n] - before[w][n]
		}
	}
	if wrote == 0 {
		t.Fatal("no write ran during the dump")
	}
	// Every data key the restored secrets use unwraps (no secret points at a data key the dump
	// missed), and the restored store works for new writes.
	if n := count(t, pgtest.PoolFor(t, r), `SELECT count(*) FROM keybroker.encrypted_secrets s
LEFT JOIN keybroker.data_keys d ON d.id = s.data_key_id WHERE d.id IS NULL`); n != 0 {
		t.Fatalf("%d restored secrets without their data key", n)
	}
	if err := st.Put(ctx, "p0", "after-restore", []byte("new")); err != nil {
		t.Fatalf("put into the restored store: %v", err)
	}
	t.Logf("%d writes ran during pg_dump; %d secrets restored and verified", wrote, writers*names)
}

// TestRestoreOldBackup: a backup taken before later rotations, a rewrap, a re-encryption and
// retirements, restored with the keyring as it is now, behaves as docs/SECURITY.md
// ("Restoring an old backup") says: rows open exactly while a KEK version that wraps their
// data key in the backup is still live in the key service; afterwards each fails with
// envelope.ErrDecrypt (the keyring no longer has the version), the same error as tampering.
func TestRestoreOldBackup(t *testing.T) {
	ctx := context.Background()
	path := keyringFile(t)
	kek := openFile(t, path)
	e := newEnv(t, pgstore.Config{KEK: kek, DirectKEK: true})
	s := e.store
	put := func(project, name, value string) {
		t.Helper()
		if err := s.Put(ctx, project, name, []byte(value)); err != nil {
			t.Fatal(err)
		}
	}
	// a and b: data keys under version 1. c: written after the rotation, under version 2.
	for i := range 3 {
		put("a", fmt.Sprint("s", i), fmt.Sprint("a-old-", i))
		put("b", fmt.Sprint("s", i), fmt.Sprint("b-old-", i))
	}
	v1, err := s.PrimaryVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v2, err := s.RotateKEK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		put("c", fmt.Sprint("s", i), fmt.Sprint("c-old-", i))
	}
	backup := dump(t, e.url)
	inBackup := map[string]string{}
	for _, p := range []string{"a", "b", "c"} {
		for i := range 3 {
			inBackup[p+"/s"+strconv.Itoa(i)] = fmt.Sprint(p, "-old-", i)
		}
	}

	// After the backup: every data key rewrapped to version 2, project a re-encrypted (its
	// old data keys deleted), new values in b.
	if res, err := s.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil || res.Remaining != 0 {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	if _, err := s.Reencrypt(ctx, "a", pgstore.ReencryptOptions{}); err != nil {
		t.Fatalf("reencrypt: %v", err)
	}
	put("b", "s0", "b-new-0")

	// checkRestored opens a fresh store (no cached data key) on a restore of the backup and
	// checks which secrets open: those of the projects in opens hold their backed-up value,
	// the others fail with exactly envelope.ErrDecrypt.
	checkRestored := func(when string, opens ...string) {
		t.Helper()
		st := restoredStore(t, restore(t, backup), pgstore.Config{KEK: openFile(t, path), DirectKEK: true})
		for k, want := range inBackup {
			project, name, _ := strings.Cut(k, "/")
			got, err := st.Get(ctx, project, name)
			switch {
			case slices.Contains(opens, project):
				if err != nil || string(got) != want {
					t.Fatalf("%s: restored %s: %q, %v; want the backed-up value", when, k, got, err)
				}
			case !errors.Is(err, envelope.ErrDecrypt) || got != nil:
				t.Fatalf("%s: restored %s: %q, %v; want envelope.ErrDecrypt", when, k, got, err)
			case err.Error() != fmt.Sprintf("pgstore: get %q: %v", name, envelope.ErrDecrypt):
				t.Fatalf("%s: restored %s: error %q, want the one line tampering gives", when, k, err)
			}
		}
	}
	// Version 1 still live: the whole backup opens, project a too although its data keys were
	// deleted from the live database by the re-encryption.
	checkRestored("before any retirement", "a", "b", "c")

	// Version 1 retired (its key bytes destroyed in the keyring): the backup's a and b, whose
	// data keys it wraps there, no longer open; c, under version 2, does.
	if err := s.RetireKEK(ctx, v1); err != nil {
		t.Fatalf("retire %s: %v", v1, err)
	}
	checkRestored("after retiring version 1", "c")

	// Version 2 retired too, after a rotation to 3 and a rewrap: nothing in the backup opens,
	// while the live store still reads everything.
	if _, err := s.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if res, err := s.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil || res.Remaining != 0 {
		t.Fatalf("rewrap to version 3: %+v, %v", res, err)
	}
	if err := s.RetireKEK(ctx, v2); err != nil {
		t.Fatalf("retire %s: %v", v2, err)
	}
	checkRestored("after retiring version 2")
	live := newStore(t, e.pool, pgstore.Config{KEK: openFile(t, path), DirectKEK: true})
	for k, want := range inBackup {
		if k == "b/s0" {
			want = "b-new-0"
		}
		project, name, _ := strings.Cut(k, "/")
		if got, err := live.Get(ctx, project, name); err != nil || string(got) != want {
			t.Fatalf("live %s: %q, %v; want %q", k, got, err, want)
		}
	}

	// Nor does it take writes for those projects: their active data keys do not unwrap.
	st := restoredStore(t, restore(t, backup), pgstore.Config{KEK: openFile(t, path), DirectKEK: true})
	if err := st.Put(ctx, "a", "new", []byte("x")); !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("put into project a of the restored backup: %v, want envelope.ErrDecrypt", err)
	}
	if _, err := st.Get(ctx, "a", "new"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("the refused put left a secret: %v", err)
	}
}
