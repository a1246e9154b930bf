package e2e

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// workers is how many goroutines store or check secrets at once.
const workers = 8

// secretKey names one secret.
type secretKey struct{ project, name string }

// secretSet is what a scenario expects the store to hold. Safe for concurrent use.
type secretSet struct {
	mu sync.Mutex
	m  map[secretKey][]byte
}

func newSecretSet() *secretSet { return &secretSet{m: map[secretKey][]byte{}} }

func (s *secretSet) set(k secretKey, v []byte) {
	s.mu.Lock()
	s.m[k] = v
	s.mu.Unlock()
}

func (s *secretSet) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

func (s *secretSet) snapshot() map[secretKey][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := make(map[secretKey][]byte, len(s.m))
	for k, v := range s.m {
		c[k] = v
	}
	return c
}

// randomValue returns 1..maxLen random bytes from r.
func randomValue(r *rand.Rand, maxLen int) []byte {
	b := make([]byte, 1+r.IntN(maxLen))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// genSecrets makes projects×perProject secrets with random values, reproducible from seed.
func genSecrets(seed uint64, prefix string, projects, perProject int) *secretSet {
	r := rand.New(rand.NewPCG(seed, 0x6b6579))
	s := newSecretSet()
	for p := range projects {
		for n := range perProject {
			s.m[secretKey{fmt.Sprintf("%s-project-%03d", prefix, p), fmt.Sprintf("secret-%05d", n)}] = randomValue(r, 300)
		}
	}
	return s
}

// putAll stores every secret of set through st.
func putAll(ctx context.Context, t *testing.T, st *pgstore.Store, set *secretSet) {
	t.Helper()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(workers)
	for k, v := range set.snapshot() {
		g.Go(func() error { return st.Put(gctx, k.project, k.name, v) })
	}
	if err := g.Wait(); err != nil {
		t.Fatalf("put: %v", err)
	}
}

// verifyAll reads every secret of set through st and fails, with counts (never contents),
// unless each one decrypts to the bytes expected.
func verifyAll(ctx context.Context, t *testing.T, st *pgstore.Store, set *secretSet) {
	t.Helper()
	var checked, mismatched, failed atomic.Int64
	var firstErr atomic.Pointer[error]
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(workers)
	for k, v := range set.snapshot() {
		g.Go(func() error {
			got, err := st.Get(gctx, k.project, k.name)
			checked.Add(1)
			switch {
			case err != nil:
				failed.Add(1)
				firstErr.CompareAndSwap(nil, &err)
			case !bytes.Equal(got, v):
				mismatched.Add(1)
			}
			return nil
		})
	}
	g.Wait()
	if failed.Load() > 0 || mismatched.Load() > 0 || checked.Load() != int64(set.len()) {
		var first error
		if p := firstErr.Load(); p != nil {
			first = *p
		}
		t.Fatalf("verify: %d secrets expected, %d read, %d failed (first error: %v), %d with other bytes",
			set.len(), checked.Load(), failed.Load(), first, mismatched.Load())
	}
}

// newStore migrates schema (idempotent) and opens a Store on it. Data
// keys are wrapped directly under kek (DirectKEK): the scenarios rewrap
// every data key through the real key services, which with the key
// hierarchy (pgstore's default) a KEK rotation no longer does.
func newStore(ctx context.Context, t *testing.T, pool *pgxpool.Pool, schema string, kek provider.KEKProvider, budget int64) *pgstore.Store {
	t.Helper()
	if err := pgstore.Migrate(ctx, pool, schema); err != nil {
		t.Fatalf("migrate schema %s: %v", schema, err)
	}
	st, err := pgstore.New(ctx, pool, pgstore.Config{Schema: schema, KEK: kek, Budget: budget, Actor: "e2e", DirectKEK: true})
	if err != nil {
		t.Fatalf("pgstore.New: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// dataKeysByVersion counts the data keys of schema by the KEK version that wraps them.
func dataKeysByVersion(ctx context.Context, t *testing.T, pool *pgxpool.Pool, schema string) map[pgstore.KEKVersion]int64 {
	t.Helper()
	q := pgx.Identifier{schema}.Sanitize()
	rows, err := pool.Query(ctx, `SELECT k.provider, k.key_id, k.key_version, count(*)
FROM `+q+`.data_keys d JOIN `+q+`.kek k ON k.id = d.kek_id GROUP BY 1, 2, 3`)
	if err != nil {
		t.Fatalf("count data keys: %v", err)
	}
	m := map[pgstore.KEKVersion]int64{}
	var v pgstore.KEKVersion
	var n int64
	if _, err := pgx.ForEachRow(rows, []any{&v.Provider, &v.KeyID, &v.Version, &n}, func() error {
		m[v] = n
		return nil
	}); err != nil {
		t.Fatalf("count data keys: %v", err)
	}
	return m
}

// count runs a count(*) query; {{s}} in query stands for the quoted schema.
func count(ctx context.Context, t *testing.T, pool *pgxpool.Pool, schema, query string, args ...any) int64 {
	t.Helper()
	var n int64
	q := bytes.ReplaceAll([]byte(query), []byte("{{s}}"), []byte(pgx.Identifier{schema}.Sanitize()))
	if err := pool.QueryRow(ctx, string(q), args...).Scan(&n); err != nil {
		t.Fatalf("count: %v", err)
	}
	return n
}

// sum adds up a by-version count.
func sum(m map[pgstore.KEKVersion]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}
