package pgstore_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/internal/cpumeter"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// slowKEK is a key service with a fixed latency: provider/local behind a
// sleep on every call (Wrap, Unwrap, Rewrap), counting the calls. The
// sleep is the benchmark's stand-in for a network round trip to a KMS;
// it is switched off (delay 0) while the benchmark fills the database.
type slowKEK struct {
	*local.Provider
	delay atomic.Int64 // nanoseconds
	calls atomic.Int64
}

func (k *slowKEK) wait() {
	k.calls.Add(1)
	if d := time.Duration(k.delay.Load()); d > 0 {
		time.Sleep(d)
	}
}

func (k *slowKEK) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	k.wait()
	return k.Provider.Wrap(ctx, dek, aad)
}

func (k *slowKEK) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	k.wait()
	return k.Provider.Unwrap(ctx, wk, aad)
}

func (k *slowKEK) Rewrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) (*provider.WrappedKey, error) {
	k.wait()
	return k.Provider.Rewrap(ctx, wk, aad)
}

// scaleSizes are BenchmarkScale's project counts: 100 and 1,000 unless
// KEYBROKER_BENCH_PROJECTS lists others (docs/BENCHMARKS.md's run:
// 100,1000,10000,100000).
func scaleSizes(b *testing.B) []int {
	s := os.Getenv("KEYBROKER_BENCH_PROJECTS")
	if s == "" {
		return []int{100, 1000}
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			b.Fatalf("KEYBROKER_BENCH_PROJECTS: %q", f)
		}
		out = append(out, n)
	}
	return out
}

// scaleGets is how many Gets each of BenchmarkScale's fresh Stores makes
// (KEYBROKER_BENCH_GETS, default 2000).
func scaleGets(b *testing.B) int {
	if s := os.Getenv("KEYBROKER_BENCH_GETS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			b.Fatalf("KEYBROKER_BENCH_GETS: %q", s)
		}
		return n
	}
	return 2000
}

// BenchmarkScale is issue 15's measurement: N projects with one 100-byte
// secret each, a key service with a fixed 5 ms latency, and a fresh Store
// (default Config: empty cache) reading uniformly random projects, once
// with the key hierarchy (the default) and once with DirectKEK, over the
// same rows (the data keys are rewrapped from direct to the hierarchy in
// between, which is the migration of an existing database). An iteration
// is KEYBROKER_BENCH_GETS (2000) Gets by one fresh Store, or (ik-rewrap)
// one rewrap of every data key: run it with -benchtime 1x. Reported: key-service calls per 1,000 Gets, Get
// p50 and p99, heap per cached data key (runtime.MemStats, after GC), and
// (ik-rewrap) the rate of the local rewrap of every data key to a new
// intermediate key (RotateIntermediate + Rewrap with
// KEYBROKER_BENCH_REWRAP_WORKERS workers, default
// pgstore.DefaultRewrapWorkers; target ≥ 50,000 data keys/s). Run the documented figures with
//
//	KEYBROKER_BENCH_PROJECTS=100,1000,10000,100000 go test -run '^$' -bench Scale -benchtime 1x -timeout 60m ./pgstore
func BenchmarkScale(b *testing.B) {
	ctx := context.Background()
	for _, n := range scaleSizes(b) {
		b.Run(fmt.Sprintf("projects=%d", n), func(b *testing.B) {
			base, err := local.Generate("scale")
			if err != nil {
				b.Fatal(err)
			}
			kek := &slowKEK{Provider: base}
			e := newEnv(b, pgstore.Config{KEK: kek, DirectKEK: true})
			fillProjects(b, e, n)
			for _, mode := range []string{"direct", "hierarchy"} {
				if mode == "hierarchy" {
					s := newStore(b, e.pool, pgstore.Config{KEK: kek})
					if res, err := s.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil || res.Remaining != 0 {
						b.Fatalf("migrate to the hierarchy: %+v, %v", res, err)
					}
				}
				b.Run(mode, func(b *testing.B) {
					kek.delay.Store(int64(5 * time.Millisecond))
					defer kek.delay.Store(0)
					runtime.GC()
					var before runtime.MemStats
					runtime.ReadMemStats(&before)
					s := newStore(b, e.pool, pgstore.Config{KEK: kek, DirectKEK: mode == "direct"})
					calls0 := kek.calls.Load()
					gets := scaleGets(b)
					var lat []time.Duration
					for b.Loop() {
						lat = make([]time.Duration, 0, gets)
						rng := rand.New(rand.NewPCG(1, uint64(n)))
						for range gets {
							p := fmt.Sprint("p", rng.IntN(n))
							t0 := time.Now()
							if _, err := s.Get(ctx, p, "s"); err != nil {
								b.Fatal(err)
							}
							lat = append(lat, time.Since(t0))
						}
					}
					calls := kek.calls.Load() - calls0
					runtime.GC()
					var after runtime.MemStats
					runtime.ReadMemStats(&after)
					st := s.CacheStats()
					slices.Sort(lat)
					b.ReportMetric(float64(calls)*1000/float64(b.N*len(lat)), "kms-calls/1000gets")
					b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
					b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
					b.ReportMetric(float64(st.Entries), "cached-keys")
					if st.Entries > 0 {
						b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(st.Entries), "heap-B/cached-key")
					}
					runtime.KeepAlive(s)
				})
			}
			// Rotating the intermediate key and rewrapping every data key
			// to it: local, no key-service call per data key.
			b.Run("ik-rewrap", func(b *testing.B) {
				s := newStore(b, e.pool, pgstore.Config{KEK: kek})
				var keys, calls int64
				var elapsed, client, server time.Duration
				meter := serverMeter(b, e)
				workers := rewrapWorkers(b)
				for b.Loop() {
					b.StopTimer()
					if _, err := s.RotateIntermediate(ctx); err != nil {
						b.Fatal(err)
					}
					kek.delay.Store(int64(5 * time.Millisecond))
					calls0 := kek.calls.Load()
					b.StartTimer()
					c0, s0 := meter.Sample()
					t0 := time.Now()
					res, err := s.Rewrap(ctx, pgstore.RewrapOptions{Workers: workers})
					elapsed += time.Since(t0)
					c1, s1 := meter.Sample()
					client, server = client+c1-c0, server+s1-s0
					b.StopTimer()
					kek.delay.Store(0)
					calls += kek.calls.Load() - calls0
					if err != nil || res.Rewrapped != int64(n) || res.Remaining != 0 {
						b.Fatalf("rewrap to the new intermediate key: %+v, %v", res, err)
					}
					keys += res.Rewrapped
					b.StartTimer()
				}
				b.ReportMetric(float64(keys)/elapsed.Seconds(), "datakeys/s")
				// What one rewrap process reaches on an idle machine: it and
				// the server take turns, so about one data key per (client +
				// server) CPU time.
				b.ReportMetric(float64(client.Microseconds())/float64(keys), "client-cpu-µs/datakey")
				b.ReportMetric(float64(server.Microseconds())/float64(keys), "server-cpu-µs/datakey")
				b.ReportMetric(float64(keys)/(client+server).Seconds(), "cpu-bound-datakeys/s")
				b.ReportMetric(float64(calls)/float64(b.N), "kms-calls/rewrap")
			})
		})
	}
}

// rewrapWorkers is the ik-rewrap sub-benchmark's RewrapOptions.Workers:
// KEYBROKER_BENCH_REWRAP_WORKERS, or 0 (pgstore.DefaultRewrapWorkers).
func rewrapWorkers(b *testing.B) int {
	s := os.Getenv("KEYBROKER_BENCH_REWRAP_WORKERS")
	if s == "" {
		return 0
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		b.Fatalf("KEYBROKER_BENCH_REWRAP_WORKERS: %q", s)
	}
	return n
}

// serverMeter measures this process's CPU and that of the test server's
// postmaster and backends (the server runs on this machine: pgtest's, or
// KEYBROKER_TEST_DATABASE_URL's when local).
func serverMeter(b *testing.B, e *env) cpumeter.Meter {
	b.Helper()
	var dir string
	if err := e.pool.QueryRow(context.Background(), `SELECT current_setting('data_directory')`).Scan(&dir); err != nil {
		b.Fatal(err)
	}
	pid, err := cpumeter.PostmasterPID(dir)
	if err != nil {
		b.Fatalf("server CPU: %v (the benchmark needs the server on this machine)", err)
	}
	return cpumeter.Meter{Postmaster: pid}
}

// fillProjects stores one 100-byte secret, "s", in each of projects p0 …
// p<n-1>, from 8 goroutines.
func fillProjects(b *testing.B, e *env, n int) {
	b.Helper()
	ctx := context.Background()
	value := make([]byte, 100)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1) - 1; i < int64(n); i = next.Add(1) - 1 {
				if err := e.store.Put(ctx, fmt.Sprint("p", i), "s", value); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	if _, err := e.pool.Exec(ctx, `ANALYZE keybroker.data_keys; ANALYZE keybroker.encrypted_secrets; ANALYZE keybroker.kek`); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkScaleAgainst100 measures issue 15's latency target — Get p50
// at N projects ≤ 1.3× the 100-project p50, with the key hierarchy — on a
// machine whose load changes from one second to the next: a database of
// 100 projects and one of N (the same fill as BenchmarkScale) are read at
// the same time, Gets alternating between a fresh Store on each, so both
// p50s see the same load. A third column alternates with them: a plain
// SELECT of the same secret row at N (the database's own cost at that
// table size, no keybroker). One iteration is KEYBROKER_BENCH_GETS Gets on
// each; run it with -benchtime 1x:
//
//	KEYBROKER_BENCH_PROJECTS=1000,10000,100000 go test -run '^$' -bench ScaleAgainst100 -benchtime 1x -timeout 60m ./pgstore
func BenchmarkScaleAgainst100(b *testing.B) {
	ctx := context.Background()
	base, err := local.Generate("scale")
	if err != nil {
		b.Fatal(err)
	}
	kek := &slowKEK{Provider: base}
	ref := newEnv(b, pgstore.Config{KEK: kek})
	fillProjects(b, ref, 100)
	for _, n := range scaleSizes(b) {
		b.Run(fmt.Sprintf("projects=%d", n), func(b *testing.B) {
			e := newEnv(b, pgstore.Config{KEK: kek})
			fillProjects(b, e, n)
			kek.delay.Store(int64(5 * time.Millisecond))
			defer kek.delay.Store(0)
			gets := scaleGets(b)
			var small, large, plain []time.Duration
			for b.Loop() {
				s100 := newStore(b, ref.pool, pgstore.Config{KEK: kek})
				sN := newStore(b, e.pool, pgstore.Config{KEK: kek})
				small, large, plain = make([]time.Duration, 0, gets), make([]time.Duration, 0, gets), make([]time.Duration, 0, gets)
				r100 := rand.New(rand.NewPCG(1, 100))
				rN := rand.New(rand.NewPCG(1, uint64(n)))
				rP := rand.New(rand.NewPCG(2, uint64(n)))
				for range gets {
					t0 := time.Now()
					if _, err := s100.Get(ctx, fmt.Sprint("p", r100.IntN(100)), "s"); err != nil {
						b.Fatal(err)
					}
					t1 := time.Now()
					if _, err := sN.Get(ctx, fmt.Sprint("p", rN.IntN(n)), "s"); err != nil {
						b.Fatal(err)
					}
					t2 := time.Now()
					var ct []byte
					if err := e.pool.QueryRow(ctx, `SELECT encrypted_data FROM keybroker.encrypted_secrets WHERE project_id = $1 AND name = 's'`,
						fmt.Sprint("p", rP.IntN(n))).Scan(&ct); err != nil {
						b.Fatal(err)
					}
					t3 := time.Now()
					small, large, plain = append(small, t1.Sub(t0)), append(large, t2.Sub(t1)), append(plain, t3.Sub(t2))
				}
			}
			for _, l := range [][]time.Duration{small, large, plain} {
				slices.Sort(l)
			}
			p50 := func(l []time.Duration) float64 { return float64(l[len(l)/2].Microseconds()) }
			b.ReportMetric(p50(small), "p50-µs-100")
			b.ReportMetric(p50(large), "p50-µs-N")
			b.ReportMetric(p50(plain), "p50-µs-plain-select-N")
			b.ReportMetric(p50(large)/p50(small), "p50-N/100")
		})
	}
}

// BenchmarkReserveFence is the cost migration 012's statement-level fence
// adds to every UPDATE of data_keys that changes no kek_id: one budget
// reservation (the two statements of Store.reserveChunk, one round trip)
// with the fences of migration 012 ("statement") and with 010's row
// triggers put back in the same database ("row", the baseline: they did
// not fire on such an update), alternately, twice each. Reported: CPU per
// reservation, this process's and the server's.
func BenchmarkReserveFence(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b, pgstore.Config{})
	fillProjects(b, e, 100)
	var id [16]byte
	if err := e.pool.QueryRow(ctx, `SELECT id FROM keybroker.data_keys WHERE project_id = 'p0'`).Scan(&id); err != nil {
		b.Fatal(err)
	}
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET budget = 4294967296`); err != nil {
		b.Fatal(err)
	}
	meter := serverMeter(b, e)
	install := map[string][]string{
		"statement": {
			`DROP TRIGGER data_keys_kek_fence ON keybroker.data_keys`,
			`DROP TRIGGER data_keys_tenant_fence ON keybroker.data_keys`,
			`CREATE TRIGGER data_keys_update_fence AFTER UPDATE ON keybroker.data_keys REFERENCING OLD TABLE AS old_keys NEW TABLE AS new_keys FOR EACH STATEMENT EXECUTE FUNCTION keybroker.data_keys_update_fence()`,
			`CREATE TRIGGER data_keys_kek_fence BEFORE INSERT ON keybroker.data_keys FOR EACH ROW EXECUTE FUNCTION keybroker.data_keys_kek_fence()`,
			`CREATE TRIGGER data_keys_tenant_fence BEFORE INSERT ON keybroker.data_keys FOR EACH ROW EXECUTE FUNCTION keybroker.data_keys_tenant_fence()`,
		},
		"row": {
			`DROP TRIGGER data_keys_update_fence ON keybroker.data_keys`,
			`DROP TRIGGER data_keys_kek_fence ON keybroker.data_keys`,
			`DROP TRIGGER data_keys_tenant_fence ON keybroker.data_keys`,
			`CREATE TRIGGER data_keys_kek_fence BEFORE INSERT OR UPDATE OF kek_id ON keybroker.data_keys FOR EACH ROW EXECUTE FUNCTION keybroker.data_keys_kek_fence()`,
			`CREATE TRIGGER data_keys_tenant_fence BEFORE INSERT OR UPDATE OF kek_id, project_id ON keybroker.data_keys FOR EACH ROW EXECUTE FUNCTION keybroker.data_keys_tenant_fence()`,
		},
	}
	for i, fences := range []string{"row", "statement", "row", "statement"} {
		if i > 0 || fences != "statement" { // the migrations installed "statement"
			for _, q := range install[fences] {
				if _, err := e.pool.Exec(ctx, q); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.Run("fences="+fences, func(b *testing.B) {
			c0, s0 := meter.Sample()
			for b.Loop() {
				bt := &pgx.Batch{}
				bt.Queue(`UPDATE keybroker.data_keys d SET messages = LEAST(o.messages + $2, o.budget, $3)
FROM (SELECT id, messages, budget FROM keybroker.data_keys WHERE id = $1 FOR NO KEY UPDATE) o
WHERE d.id = o.id AND d.state = 'active' AND o.messages < LEAST(o.budget, $3)
RETURNING d.messages - o.messages`, id, 1, int64(1)<<32)
				bt.Queue(`UPDATE keybroker.data_keys SET state = 'spent' WHERE id = $1 AND state = 'active' AND messages >= LEAST(budget, $2)`, id, int64(1)<<32)
				if err := e.pool.SendBatch(ctx, bt).Close(); err != nil {
					b.Fatal(err)
				}
			}
			c1, s1 := meter.Sample()
			b.ReportMetric(float64((c1-c0).Nanoseconds())/1e3/float64(b.N), "client-cpu-µs/op")
			b.ReportMetric(float64((s1-s0).Nanoseconds())/1e3/float64(b.N), "server-cpu-µs/op")
		})
	}
}
