package pgstore_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

// putRandom stores n secrets s0..s<n-1> of random values in project and
// returns their names and values.
func putRandom(t testing.TB, s *pgstore.Store, project string, n int) ([]string, map[string][]byte) {
	t.Helper()
	names := make([]string, n)
	values := make(map[string][]byte, n)
	for i := range n {
		names[i] = fmt.Sprint("s", i)
		v := make([]byte, 1+i*37)
		rand.Read(v)
		if err := s.Put(context.Background(), project, names[i], v); err != nil {
			t.Fatal(err)
		}
		values[names[i]] = v
	}
	return names, values
}

func checkValues(t testing.TB, got, want map[string][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d secrets, want %d", len(got), len(want))
	}
	for name, v := range want {
		if g, ok := got[name]; !ok || !bytes.Equal(g, v) {
			t.Errorf("%s: got %x (present %v), want %x", name, g, ok, v)
		}
	}
}

// Ten secrets over several data keys (a budget of 3 encryptions per key),
// read with missing and repeated names, warm and cold cache.
func TestGetMany(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{Budget: 3, ReserveChunk: 1})
	names, want := putRandom(t, e.store, "p", 10)
	if n := count(t, e.pool, `SELECT count(DISTINCT data_key_id) FROM keybroker.encrypted_secrets`); n < 2 {
		t.Fatalf("%d data keys, want 2 or more", n)
	}
	ask := append(append([]string{"missing"}, names...), names[3], names[3], "also-missing")
	for _, s := range []*pgstore.Store{e.store, newStore(t, e.pool, pgstore.Config{KEK: e.kek})} {
		got, err := s.GetMany(ctx, "p", ask)
		if err != nil {
			t.Fatal(err)
		}
		checkValues(t, got, want)
		if _, ok := got["missing"]; ok {
			t.Error("a name that is not set is in the map")
		}
	}
	got, err := e.store.GetMany(ctx, "p", nil)
	if err != nil || got == nil || len(got) != 0 {
		t.Fatalf("no names: %v, %v; want an empty map", got, err)
	}
	// Another project's secrets of the same names are not read.
	got, err = e.store.GetMany(ctx, "other", names)
	if err != nil || len(got) != 0 {
		t.Fatalf("other project: %d secrets, %v; want none", len(got), err)
	}
}

func TestGetManyInvalid(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	tooMany := make([]string, pgstore.MaxGetMany+1)
	for i := range tooMany {
		tooMany[i] = fmt.Sprint("s", i)
	}
	for _, c := range []struct {
		name, project string
		names         []string
	}{
		{"too many", "p", tooMany},
		{"empty name", "p", []string{"a", ""}},
		{"NUL in name", "p", []string{"a\x00b"}},
		{"name too long", "p", []string{strings.Repeat("n", pgstore.MaxNameLen+1)}},
		{"invalid UTF-8", "p", []string{"\xff"}},
		{"empty project", "", []string{"a"}},
	} {
		got, err := e.store.GetMany(ctx, c.project, c.names)
		if !errors.Is(err, pgstore.ErrInvalidArgument) || got != nil {
			t.Errorf("%s: %v, %v; want ErrInvalidArgument", c.name, got, err)
		} else if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: error spans lines: %q", c.name, err)
		}
	}
	if _, err := e.store.GetMany(ctx, "p", tooMany[:pgstore.MaxGetMany]); err != nil {
		t.Errorf("MaxGetMany names: %v", err)
	}
}

// One bad row fails the whole call with the opaque ErrDecrypt: a tampered
// envelope, a missing data key row (cold cache), a secret relabelled to
// another project.
func TestGetManyDecryptFailure(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{Budget: 3, ReserveChunk: 1})
	names, _ := putRandom(t, e.store, "p", 10)
	exec := func(sql string) {
		t.Helper()
		if _, err := e.pool.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	expectDecrypt := func(what string, s *pgstore.Store, project string) {
		t.Helper()
		got, err := s.GetMany(ctx, project, names)
		if !errors.Is(err, envelope.ErrDecrypt) || got != nil {
			t.Errorf("%s: %d values, %v; want ErrDecrypt", what, len(got), err)
		} else if msg := err.Error(); strings.Contains(msg, "s7") || strings.Contains(msg, "s0") {
			t.Errorf("%s: error names a secret: %q", what, msg)
		}
	}
	exec(`CREATE TABLE saved AS SELECT * FROM keybroker.encrypted_secrets`)
	restore := `DELETE FROM keybroker.encrypted_secrets; INSERT INTO keybroker.encrypted_secrets SELECT * FROM saved`

	exec(`UPDATE keybroker.encrypted_secrets SET encrypted_data = set_byte(encrypted_data, length(encrypted_data) - 1, get_byte(encrypted_data, length(encrypted_data) - 1) # 1) WHERE name = 's7'`)
	expectDecrypt("tampered envelope", e.store, "p")
	exec(restore)

	exec(`SET session_replication_role = replica;
		DELETE FROM keybroker.data_keys WHERE id = (SELECT data_key_id FROM keybroker.encrypted_secrets WHERE name = 's7');
		RESET session_replication_role`)
	expectDecrypt("data key row missing", newStore(t, e.pool, pgstore.Config{KEK: e.kek}), "p")

	// s0 relabelled to project q: not read from p, and from q it does
	// not decrypt (its envelope is bound to p).
	exec(`SET session_replication_role = replica;
		UPDATE keybroker.encrypted_secrets SET project_id = 'q' WHERE name = 's0';
		RESET session_replication_role`)
	got, err := e.store.GetMany(ctx, "p", []string{"s0", "s1"})
	if _, ok := got["s0"]; err != nil || ok || len(got) != 1 {
		t.Errorf("relabelled away: %d values (s0 present %v), %v; want s1 only", len(got), ok, err)
	}
	expectDecrypt("relabelled in", e.store, "q")
}

// Under a role row-level security binds, GetMany reads the project's rows.
func TestGetManyRowLevelSecurity(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	names, want := putRandom(t, e.store, "p0", 10)
	putRandom(t, e.store, "p1", 10)
	tenant := newStore(t, pgtest.PoolFor(t, tenantURL(t, e)), pgstore.Config{KEK: e.kek})
	got, err := tenant.GetMany(ctx, "p0", names)
	if err != nil {
		t.Fatal(err)
	}
	checkValues(t, got, want)
}

// batchCounter counts the round trips a pool makes: queries and batches.
type batchCounter struct{ n atomic.Int64 }

func (c *batchCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.n.Add(1)
	return ctx
}
func (c *batchCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (c *batchCounter) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	c.n.Add(1)
	return ctx
}
func (c *batchCounter) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (c *batchCounter) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

// tracedPool is a pool to dbURL (built like pgstore.NewPool's) whose
// round trips the returned counter counts.
func tracedPool(t testing.TB, dbURL string) (*pgxpool.Pool, *batchCounter) {
	t.Helper()
	cfg, err := pgstore.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	tr := &batchCounter{}
	cfg.ConnConfig.Tracer = tr
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool, tr
}

// GetMany of ten secrets is one round trip, with its data keys cached or
// not: each row brings its data key's wrapped form, which a cache miss
// unwraps locally under the intermediate key.
func TestGetManyOneRoundTrip(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{Budget: 3, ReserveChunk: 1})
	names, want := putRandom(t, e.store, "p", 10)
	if keys := count(t, e.pool, `SELECT count(DISTINCT data_key_id) FROM keybroker.encrypted_secrets`); keys < 2 {
		t.Fatalf("the secrets are under %d data keys, want several", keys)
	}
	pool, tr := tracedPool(t, e.url)
	s := newStore(t, pool, pgstore.Config{KEK: e.kek})
	warmIntermediate(t, e, s)
	for _, c := range []struct {
		what string
		want int64
	}{{"cold cache", 1}, {"warm cache", 1}} {
		tr.n.Store(0)
		got, err := s.GetMany(ctx, "p", names)
		if err != nil {
			t.Fatal(err)
		}
		checkValues(t, got, want)
		if n := tr.n.Load(); n != c.want {
			t.Errorf("%s: %d round trips, want %d", c.what, n, c.want)
		}
	}
}

// A data key shared by several secrets is unwrapped once per call even when
// the secrets' rows interleave with another key's and the cache holds one
// key: two Stores share data key K1 (a budget of 4 in reservations of 2);
// one spends its half and moves on to K2 while the other still holds one
// encryption under K1, so the rows are stored K1, K1, K1, K2, K1.
func TestGetManyDataKeyOnce(t *testing.T) {
	ctx := context.Background()
	cfg := pgstore.Config{Budget: 4, ReserveChunk: 2}
	e := newEnv(t, cfg)
	cfg.KEK = e.kek
	other := newStore(t, e.pool, cfg)
	want := map[string][]byte{}
	for i, s := range []*pgstore.Store{other, e.store, e.store, e.store, other} {
		name := fmt.Sprint("s", i)
		want[name] = []byte(name)
		if err := s.Put(ctx, "p", name, want[name]); err != nil {
			t.Fatal(err)
		}
	}
	var order string
	if err := e.pool.QueryRow(ctx, `SELECT string_agg(k::text, ',' ORDER BY c) FROM (SELECT s.ctid AS c, dense_rank() OVER (ORDER BY d.created_at, d.id) AS k
		FROM keybroker.encrypted_secrets s JOIN keybroker.data_keys d ON d.id = s.data_key_id) r`).Scan(&order); err != nil || order != "1,1,1,2,1" {
		t.Fatalf("rows stored under data keys %s (%v), want 1,1,1,2,1", order, err)
	}
	pool, tr := tracedPool(t, e.url)
	s := newStore(t, pool, pgstore.Config{KEK: e.kek, CacheEntries: 1})
	warmIntermediate(t, e, s)
	tr.n.Store(0)
	misses := s.CacheStats().Misses
	got, err := s.GetMany(ctx, "p", []string{"s0", "s1", "s2", "s3", "s4"})
	if err != nil {
		t.Fatal(err)
	}
	checkValues(t, got, want)
	if n := tr.n.Load(); n != 1 {
		t.Errorf("%d round trips, want 1", n)
	}
	if n := s.CacheStats().Misses - misses; n != 2 {
		t.Errorf("%d data key unwraps, want 2 (each data key once)", n)
	}
}

// warmIntermediate has s unwrap the intermediate key (one read of its row,
// once per process per CacheTTL, which the round-trip counts leave out) by
// reading a secret of a project of its own.
func warmIntermediate(t *testing.T, e *env, s *pgstore.Store) {
	t.Helper()
	ctx := context.Background()
	if err := e.store.Put(ctx, "warm-intermediate", "w", []byte("w")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "warm-intermediate", "w"); err != nil {
		t.Fatal(err)
	}
}

// opRecorder is a pgstore.Observer that records each operation and its
// outcome.
type opRecorder struct {
	mu  sync.Mutex
	ops []string
}

func (r *opRecorder) Start(ctx context.Context, op string) (context.Context, func(error)) {
	return ctx, func(err error) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.ops = append(r.ops, fmt.Sprintf("%s:%v", op, err != nil))
	}
}

// The Observer sees one "getmany" per call, failed or not.
func TestGetManyObserver(t *testing.T) {
	ctx := context.Background()
	rec := &opRecorder{}
	e := newEnv(t, pgstore.Config{Observer: rec})
	names, _ := putRandom(t, e.store, "p", 3)
	rec.ops = nil
	if _, err := e.store.GetMany(ctx, "p", names); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.GetMany(ctx, "p", []string{""}); err == nil {
		t.Fatal("empty name accepted")
	}
	if got := strings.Join(rec.ops, " "); got != "getmany:false getmany:true" {
		t.Fatalf("observed %q", got)
	}
}
