package hierarchy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

func TestMain(m *testing.M) {
	if os.Getenv(workerEnv) != "" {
		os.Exit(worker())
	}
	os.Exit(pgtest.Main(m))
}

// counting is the deployment KEK with a count of its key-service calls.
type counting struct {
	*local.Provider
	wraps, unwraps, rewraps atomic.Int64
}

func (c *counting) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	c.wraps.Add(1)
	return c.Provider.Wrap(ctx, dek, aad)
}

func (c *counting) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	c.unwraps.Add(1)
	return c.Provider.Unwrap(ctx, wk, aad)
}

func (c *counting) Rewrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) (*provider.WrappedKey, error) {
	c.rewraps.Add(1)
	return c.Provider.Rewrap(ctx, wk, aad)
}

func (c *counting) calls() int64 { return c.wraps.Load() + c.unwraps.Load() + c.rewraps.Load() }

func migrated(t *testing.T) (string, *pgxpool.Pool) {
	t.Helper()
	u := pgtest.NewDatabase(t)
	pool := pgtest.PoolFor(t, u)
	if err := pgstore.Migrate(context.Background(), pool, ""); err != nil {
		t.Fatal(err)
	}
	return u, pool
}

func newKEK(t *testing.T) *counting {
	t.Helper()
	p, err := local.Generate("deployment")
	if err != nil {
		t.Fatal(err)
	}
	return &counting{Provider: p}
}

func newProvider(t *testing.T, pool *pgxpool.Pool, kek provider.KEKProvider, cfg hierarchy.Config) *hierarchy.Provider {
	t.Helper()
	cfg.Pool, cfg.KEK = pool, kek
	p, err := hierarchy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func dek(i int) []byte { return bytes.Repeat([]byte{byte(i)}, 32) }
func aad(i int) []byte { return []byte("project-" + strconv.Itoa(i)) }

func count(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// Key-service calls do not grow with the number of data keys: one wrap
// to make the intermediate key, in the process that makes it, and one
// unwrap per other process, for any number of data keys.
func TestCallsIndependentOfDataKeys(t *testing.T) {
	ctx := context.Background()
	_, pool := migrated(t)
	kek := newKEK(t)
	a := newProvider(t, pool, kek, hierarchy.Config{})
	const n = 500
	wks := make([]*provider.WrappedKey, n)
	for i := range n {
		wk, err := a.Wrap(ctx, dek(i), aad(i))
		if err != nil {
			t.Fatal(err)
		}
		if wk.Provider != hierarchy.Scheme || wk.KeyID != hierarchy.DefaultKeyID || wk.Version != "1" || len(wk.Ciphertext) != 61 {
			t.Fatalf("wrapped key %s:%s@%s, %d bytes", wk.Provider, wk.KeyID, wk.Version, len(wk.Ciphertext))
		}
		wks[i] = wk
	}
	if kek.wraps.Load() != 1 || kek.unwraps.Load() != 0 {
		t.Fatalf("%d wraps, %d unwraps at the key service for %d data keys, want 1 and 0", kek.wraps.Load(), kek.unwraps.Load(), n)
	}
	other := newKEK(t)
	other.Provider = kek.Provider
	b := newProvider(t, pool, other, hierarchy.Config{}) // another process
	for i, wk := range wks {
		got, err := b.Unwrap(ctx, wk, aad(i))
		if err != nil || !bytes.Equal(got, dek(i)) {
			t.Fatalf("unwrap %d: %x, %v", i, got, err)
		}
	}
	if other.calls() != 1 {
		t.Fatalf("%d key-service calls to unwrap %d data keys, want 1", other.calls(), n)
	}
	if got := count(t, pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'ik.create'`); got != 1 {
		t.Fatalf("%d ik.create events, want 1", got)
	}
}

// A wrapped data key is bound to its aad, chain and version, and to its
// bytes: any change is ErrInvalidCiphertext, a version the chain lacks is
// ErrKeyNotFound.
func TestUnwrapRefusesAltered(t *testing.T) {
	ctx := context.Background()
	_, pool := migrated(t)
	kek := newKEK(t)
	p := newProvider(t, pool, kek, hierarchy.Config{})
	wk, err := p.Wrap(ctx, dek(1), aad(1))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Unwrap(ctx, wk, aad(2)); !errors.Is(err, provider.ErrInvalidCiphertext) {
		t.Errorf("other aad: %v", err)
	}
	for i := range wk.Ciphertext {
		bad := wk.Clone()
		bad.Ciphertext[i] ^= 1
		if _, err := p.Unwrap(ctx, bad, aad(1)); !errors.Is(err, provider.ErrInvalidCiphertext) {
			t.Fatalf("byte %d flipped: %v", i, err)
		}
	}
	bad := wk.Clone()
	bad.Ciphertext = bad.Ciphertext[:40]
	if _, err := p.Unwrap(ctx, bad, aad(1)); !errors.Is(err, provider.ErrInvalidCiphertext) {
		t.Errorf("truncated: %v", err)
	}
	if _, err := p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	bad = wk.Clone()
	bad.Version = "2" // exists, but is another key
	if _, err := p.Unwrap(ctx, bad, aad(1)); !errors.Is(err, provider.ErrInvalidCiphertext) {
		t.Errorf("relabelled version: %v", err)
	}
	bad.Version = "7"
	if _, err := p.Unwrap(ctx, bad, aad(1)); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Errorf("missing version: %v", err)
	}
	bad = wk.Clone()
	bad.KeyID = "tenant-x"
	if _, err := p.Unwrap(ctx, bad, aad(1)); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Errorf("other chain: %v", err)
	}
	// An intermediate key row altered in the database does not unwrap.
	if _, err := pool.Exec(ctx, `UPDATE keybroker.intermediate_keys SET wrapped_key = set_byte(wrapped_key, 20, get_byte(wrapped_key, 20) # 1) WHERE version = 1`); err != nil {
		t.Fatal(err)
	}
	fresh := newProvider(t, pool, kek, hierarchy.Config{})
	if _, err := fresh.Unwrap(ctx, wk, aad(1)); !errors.Is(err, provider.ErrInvalidCiphertext) {
		t.Errorf("altered intermediate key: %v", err)
	}
}

// Rotation makes the next version current; data keys under the old one
// still unwrap, and Rewrap moves them to the new one without the key
// service.
func TestRotateAndLocalRewrap(t *testing.T) {
	ctx := context.Background()
	_, pool := migrated(t)
	kek := newKEK(t)
	p := newProvider(t, pool, kek, hierarchy.Config{})
	old, err := p.Wrap(ctx, dek(1), aad(1))
	if err != nil {
		t.Fatal(err)
	}
	v, err := p.Rotate(ctx)
	if err != nil || v != "2" {
		t.Fatalf("rotate: %q, %v", v, err)
	}
	if wk, err := p.Wrap(ctx, dek(2), aad(2)); err != nil || wk.Version != "2" {
		t.Fatalf("wrap after rotate: %v, %v", wk, err)
	}
	before := kek.calls()
	nwk, err := p.Rewrap(ctx, old, aad(1))
	if err != nil || nwk.Version != "2" {
		t.Fatalf("rewrap: %v, %v", nwk, err)
	}
	if kek.calls() != before {
		t.Fatalf("rewrap called the key service %d times", kek.calls()-before)
	}
	if got, err := p.Unwrap(ctx, nwk, aad(1)); err != nil || !bytes.Equal(got, dek(1)) {
		t.Fatalf("unwrap rewrapped: %x, %v", got, err)
	}
	st, err := p.Describe(ctx)
	if err != nil || st.PrimaryVersion != "2" || len(st.Versions) != 2 {
		t.Fatalf("describe: %+v, %v", st, err)
	}
	// Retiring: never the current version; an old one is deleted, and what
	// it wrapped no longer unwraps.
	if err := p.Retire(ctx, "2"); err == nil {
		t.Fatal("retired the current version")
	}
	if err := p.Retire(ctx, "1"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Unwrap(ctx, old, aad(1)); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("unwrap under a retired version: %v", err)
	}
	if err := p.Retire(ctx, "1"); err != nil {
		t.Fatalf("retire again: %v", err)
	}
}

// The schedule: a current version older than RotateAfter (by the
// database's clock) is replaced by the next Wrap, once.
func TestScheduledRotation(t *testing.T) {
	ctx := context.Background()
	_, pool := migrated(t)
	kek := newKEK(t)
	p := newProvider(t, pool, kek, hierarchy.Config{RotateAfter: 24 * 3600e9})
	if wk, err := p.Wrap(ctx, dek(1), aad(1)); err != nil || wk.Version != "1" {
		t.Fatalf("wrap: %v, %v", wk, err)
	}
	if _, err := pool.Exec(ctx, `UPDATE keybroker.intermediate_keys SET created_at = now() - interval '25 hours'`); err != nil {
		t.Fatal(err)
	}
	q := newProvider(t, pool, kek, hierarchy.Config{RotateAfter: 24 * 3600e9})
	for _, x := range []*hierarchy.Provider{p, q} {
		if err := x.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		if wk, err := x.Wrap(ctx, dek(2), aad(2)); err != nil || wk.Version != "2" {
			t.Fatalf("wrap after the schedule: %v, %v", wk, err)
		}
	}
	if got := count(t, pool, `SELECT max(version) FROM keybroker.intermediate_keys`); got != 2 {
		t.Fatalf("version %d after both processes saw the schedule, want 2", got)
	}
	never := newProvider(t, pool, kek, hierarchy.Config{RotateAfter: -1})
	if _, err := pool.Exec(ctx, `UPDATE keybroker.intermediate_keys SET created_at = now() - interval '1000 days'`); err != nil {
		t.Fatal(err)
	}
	if wk, err := never.Wrap(ctx, dek(3), aad(3)); err != nil || wk.Version != "2" {
		t.Fatalf("RotateAfter < 0 rotated: %v, %v", wk, err)
	}
}

// KEK rotation: RewrapKEK rewraps each intermediate key once, whatever
// the number of data keys, and everything still unwraps; a retired KEK
// version then holds nothing.
func TestRewrapKEK(t *testing.T) {
	ctx := context.Background()
	_, pool := migrated(t)
	kek := newKEK(t)
	p := newProvider(t, pool, kek, hierarchy.Config{})
	var wks []*provider.WrappedKey
	for i := range 3 {
		wk, err := p.Wrap(ctx, dek(i), aad(i))
		if err != nil {
			t.Fatal(err)
		}
		wks = append(wks, wk)
		if _, err := p.Rotate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := kek.Provider.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	before := kek.calls()
	res, err := p.RewrapKEK(ctx)
	if err != nil || res.Rewrapped != 4 || res.Total != 4 {
		t.Fatalf("rewrap: %+v, %v", res, err)
	}
	if kek.calls()-before != 4 {
		t.Fatalf("%d key-service calls to rewrap 4 intermediate keys", kek.calls()-before)
	}
	if got := count(t, pool, `SELECT count(*) FROM keybroker.intermediate_keys i JOIN keybroker.kek k ON k.id = i.kek_id WHERE k.key_version <> '2'`); got != 0 {
		t.Fatalf("%d intermediate keys not under KEK version 2", got)
	}
	if res, err := p.RewrapKEK(ctx); err != nil || res.Rewrapped != 0 {
		t.Fatalf("second rewrap: %+v, %v", res, err)
	}
	if err := kek.Provider.Retire(ctx, "1"); err != nil {
		t.Fatal(err)
	}
	fresh := newProvider(t, pool, kek, hierarchy.Config{})
	for i, wk := range wks {
		if got, err := fresh.Unwrap(ctx, wk, aad(i)); err != nil || !bytes.Equal(got, dek(i)) {
			t.Fatalf("unwrap %d after KEK rotation: %v", i, err)
		}
	}
	if got := count(t, pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'ik.rewrap'`); got != 4 {
		t.Fatalf("%d ik.rewrap events, want 4", got)
	}
}

// Bad configuration is a clear error.
func TestNewRefusesBadConfig(t *testing.T) {
	_, pool := migrated(t)
	kek := newKEK(t)
	for name, cfg := range map[string]hierarchy.Config{
		"no pool":  {KEK: kek},
		"no kek":   {Pool: pool},
		"long id":  {Pool: pool, KEK: kek, KeyID: string(bytes.Repeat([]byte("x"), hierarchy.MaxKeyIDLen+1))},
		"negative": {Pool: pool, KEK: kek, CacheTTL: -1},
	} {
		if _, err := hierarchy.New(cfg); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

const (
	workerEnv     = "HIERARCHY_TEST_WORKER"
	workerURL     = "HIERARCHY_TEST_URL"
	workerKeyring = "HIERARCHY_TEST_KEYRING"
	workerRotate  = "HIERARCHY_TEST_ROTATIONS"
)

// worker is one process of TestFencesAcrossProcesses: it says "ready",
// waits for its stdin to close (all workers start together), wraps a data
// key (racing the others to create version 1), rotates N times, and
// prints each wrapped key as "version hex".
func worker() int {
	ctx := context.Background()
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "worker:", err); return 1 }
	pool, err := pgxpool.New(ctx, os.Getenv(workerURL))
	if err != nil {
		return fail(err)
	}
	defer pool.Close()
	kek, err := local.OpenFile(os.Getenv(workerKeyring))
	if err != nil {
		return fail(err)
	}
	p, err := hierarchy.New(hierarchy.Config{Pool: pool, KEK: kek})
	if err != nil {
		return fail(err)
	}
	rotations, _ := strconv.Atoi(os.Getenv(workerRotate))
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	for i := range rotations + 1 {
		wk, err := p.Wrap(ctx, dek(i), aad(i))
		if err != nil {
			return fail(err)
		}
		fmt.Printf("%s %x\n", wk.Version, wk.Ciphertext)
		if i < rotations {
			if _, err := p.Rotate(ctx); err != nil {
				return fail(err)
			}
		}
	}
	return 0
}

// Several OS processes creating the first intermediate key and rotating
// at once: exactly one version 1 (one wrap per process was made under it
// or later), each process's Rotate moves its current version forward,
// versions have no gaps, one ik.create event per version, and every data
// key any of them wrapped unwraps.
func TestFencesAcrossProcesses(t *testing.T) {
	ctx := context.Background()
	u, pool := migrated(t)
	kek, err := local.Generate("deployment")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "keyring.json")
	if err := kek.Save(path); err != nil {
		t.Fatal(err)
	}
	const workers, rotations = 6, 5
	type proc struct {
		cmd   *exec.Cmd
		stdin io.WriteCloser
		out   *bufio.Scanner
		lines []string
	}
	procs := make([]*proc, workers)
	for i := range procs {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), workerEnv+"=1", workerURL+"="+u, workerKeyring+"="+path, workerRotate+"="+strconv.Itoa(rotations))
		cmd.Stderr = os.Stderr
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pr := &proc{cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout)}
		procs[i] = pr
		if !pr.out.Scan() || pr.out.Text() != "ready" {
			t.Fatalf("worker %d did not start: %q", i, pr.out.Text())
		}
	}
	for _, pr := range procs {
		pr.stdin.Close()
	}
	var wg sync.WaitGroup
	for _, pr := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for pr.out.Scan() {
				pr.lines = append(pr.lines, pr.out.Text())
			}
		}()
	}
	wg.Wait()
	for i, pr := range procs {
		if err := pr.cmd.Wait(); err != nil {
			t.Fatalf("worker %d: %v", i, err)
		}
		if len(pr.lines) != rotations+1 {
			t.Fatalf("worker %d printed %d keys", i, len(pr.lines))
		}
	}
	want := count(t, pool, `SELECT count(*) FROM keybroker.intermediate_keys`)
	if want < 1+rotations || want > 1+workers*rotations {
		t.Fatalf("%d intermediate keys after %d processes rotated %d times each", want, workers, rotations)
	}
	if got := count(t, pool, `SELECT max(version) FROM keybroker.intermediate_keys`); got != want {
		t.Fatalf("highest version %d, want %d (no gaps)", got, want)
	}
	if got := count(t, pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'ik.create'`); got != want {
		t.Fatalf("%d ik.create events, want %d", got, want)
	}
	p := newProvider(t, pool, kek, hierarchy.Config{})
	for w, pr := range procs {
		last := 0
		for i, line := range pr.lines {
			var version string
			var ct []byte
			if _, err := fmt.Sscanf(line, "%s %x", &version, &ct); err != nil {
				t.Fatal(err)
			}
			n, _ := strconv.Atoi(version)
			if n <= last {
				t.Fatalf("worker %d wrapped under version %d after a rotation from %d", w, n, last)
			}
			last = n
			wk := &provider.WrappedKey{Provider: hierarchy.Scheme, KeyID: hierarchy.DefaultKeyID, Version: version, Ciphertext: ct}
			if got, err := p.Unwrap(ctx, wk, aad(i)); err != nil || !bytes.Equal(got, dek(i)) {
				t.Fatalf("worker %d key %d (version %s): %v", w, i, version, err)
			}
		}
	}
}
