package pgstore_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

// Each benchmark has a baseline sub-benchmark doing the same database work
// on plaintext, in the same run, on the same server.

const benchValueSize = 1024

func benchValue(b *testing.B) []byte {
	v := make([]byte, benchValueSize)
	if _, err := rand.Read(v); err != nil {
		b.Fatal(err)
	}
	return v
}

func plainTable(b *testing.B, e *env) {
	b.Helper()
	if _, err := e.pool.Exec(context.Background(), `CREATE TABLE plain_secrets (project_id text, name text, value bytea NOT NULL,
		created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (project_id, name))`); err != nil {
		b.Fatal(err)
	}
}

const plainUpsert = `INSERT INTO plain_secrets (project_id, name, value) VALUES ($1, $2, $3)
ON CONFLICT (project_id, name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()`

// benchConns are the connections BenchmarkPut and BenchmarkGet compare,
// plain and encrypted on each, all from pgstore.NewPool: direct, where it
// picks pgx's cache_statement; direct in PoolerSafeMode (cache_describe,
// named in the URL), the cost of that mode; and through PgBouncer in
// transaction mode (pgtest.PoolerURL, 2 server connections), where NewPool
// picks PoolerSafeMode.
var benchConns = []struct {
	name string
	pool func(b *testing.B, dbURL string) *pgxpool.Pool
}{
	{"direct-cache_statement", func(b *testing.B, u string) *pgxpool.Pool { return newPool(b, u) }},
	{"direct-cache_describe", func(b *testing.B, u string) *pgxpool.Pool {
		return newPool(b, u+"&default_query_exec_mode=cache_describe")
	}},
	{"pgbouncer-cache_describe", func(b *testing.B, u string) *pgxpool.Pool { return newPool(b, pgtest.PoolerURL(b, u)) }},
}

func newPool(b *testing.B, dbURL string) *pgxpool.Pool {
	pool, err := pgstore.NewPool(context.Background(), dbURL)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(pool.Close)
	return pool
}

// pair is the plain and the encrypted operation on one connection.
type pair struct {
	conn             string
	plain, encrypted func(i int) error
}

// interleaved runs every operation once per iteration, one after the
// other, so that load on the machine affects all alike, and reports each
// one's time per operation (<conn>-plain-ns/op, <conn>-encrypted-ns/op)
// and, per connection, the encrypted rate relative to the plain one
// (<conn>-rate-vs-plain; the target is at least 0.8). An empty conn drops
// the prefix (plain-ns/op, ...).
func interleaved(b *testing.B, pairs []pair) {
	b.SetBytes(int64(2*len(pairs)) * benchValueSize)
	tp := make([]time.Duration, len(pairs))
	te := make([]time.Duration, len(pairs))
	i := 0
	for b.Loop() {
		for k, p := range pairs {
			t0 := time.Now()
			if err := p.plain(i); err != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			if err := p.encrypted(i); err != nil {
				b.Fatal(err)
			}
			te[k] += time.Since(t1)
			tp[k] += t1.Sub(t0)
		}
		i++
	}
	for k, p := range pairs {
		prefix := p.conn
		if prefix != "" {
			prefix += "-"
		}
		b.ReportMetric(float64(tp[k].Nanoseconds())/float64(i), prefix+"plain-ns/op")
		b.ReportMetric(float64(te[k].Nanoseconds())/float64(i), prefix+"encrypted-ns/op")
		b.ReportMetric(float64(tp[k])/float64(te[k]), prefix+"rate-vs-plain")
	}
}

func BenchmarkPut(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b, pgstore.Config{})
	plainTable(b, e)
	v := benchValue(b)
	var pairs []pair
	for _, c := range benchConns {
		pool := c.pool(b, e.url)
		s := newStore(b, pool, pgstore.Config{KEK: e.kek})
		pairs = append(pairs, pair{c.name, func(i int) error {
			_, err := pool.Exec(ctx, plainUpsert, "p", fmt.Sprint("s", i%1000), v)
			return err
		}, func(i int) error {
			return s.Put(ctx, "p", fmt.Sprint("s", i%1000), v)
		}})
	}
	interleaved(b, pairs)
}

func BenchmarkGet(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b, pgstore.Config{})
	plainTable(b, e)
	v := benchValue(b)
	for i := range 1000 {
		name := fmt.Sprint("s", i)
		if _, err := e.pool.Exec(ctx, plainUpsert, "p", name, v); err != nil {
			b.Fatal(err)
		}
		if err := e.store.Put(ctx, "p", name, v); err != nil {
			b.Fatal(err)
		}
	}
	var pairs []pair
	for _, c := range benchConns {
		pool := c.pool(b, e.url)
		s := newStore(b, pool, pgstore.Config{KEK: e.kek})
		pairs = append(pairs, pair{c.name, func(i int) error {
			var got []byte
			return pool.QueryRow(ctx, `SELECT value FROM plain_secrets WHERE project_id = $1 AND name = $2`, "p", fmt.Sprint("s", i%1000)).Scan(&got)
		}, func(i int) error {
			_, err := s.Get(ctx, "p", fmt.Sprint("s", i%1000))
			return err
		}})
	}
	interleaved(b, pairs)
}

const migrateRows = 100_000

// fillLegacy (re)creates legacy_secrets with migrateRows rows of 100-byte
// values over 100 projects, and empties encrypted_secrets.
func fillLegacy(b *testing.B, e *env) {
	b.Helper()
	ctx := context.Background()
	if _, err := e.pool.Exec(ctx, `DROP TABLE IF EXISTS legacy_secrets, plain_copy;
		TRUNCATE keybroker.encrypted_secrets;
		CREATE TABLE legacy_secrets (id bigint PRIMARY KEY, project text NOT NULL, secret_name text NOT NULL, value bytea);
		CREATE TABLE plain_copy (project_id text, name text, value bytea NOT NULL, PRIMARY KEY (project_id, name));
		INSERT INTO legacy_secrets SELECT g, 'proj' || (g % 100), 'name' || g, convert_to(rpad('value-' || g, 100, '*'), 'UTF8')
		FROM generate_series(1, `+fmt.Sprint(migrateRows)+`) g;
		ANALYZE legacy_secrets`); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkMigratePlaintext(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b, pgstore.Config{})
	// The baseline moves the same rows in the same batches, without
	// encryption: read a keyset batch FOR NO KEY UPDATE, insert it
	// returning what was stored, clear the source.
	b.Run("plain", func(b *testing.B) {
		var elapsed time.Duration
		for b.Loop() {
			b.StopTimer()
			fillLegacy(b, e)
			b.StartTimer()
			t0 := time.Now()
			last := int64(0)
			for {
				tx, err := e.pool.Begin(ctx)
				if err != nil {
					b.Fatal(err)
				}
				rows, _ := tx.Query(ctx, `SELECT id, project, secret_name, value FROM legacy_secrets src WHERE value IS NOT NULL AND id > $1 ORDER BY src.id LIMIT $2 FOR NO KEY UPDATE`, last, pgstore.DefaultBatchSize)
				var ids []int64
				var ps, ns []string
				var vs [][]byte
				var id int64
				var p, n string
				var v []byte
				if _, err := pgx.ForEachRow(rows, []any{&id, &p, &n, &v}, func() error {
					ids, ps, ns, vs = append(ids, id), append(ps, p), append(ns, n), append(vs, v)
					return nil
				}); err != nil {
					b.Fatal(err)
				}
				if len(ids) == 0 {
					tx.Rollback(ctx)
					break
				}
				back, _ := tx.Query(ctx, `INSERT INTO plain_copy SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) ON CONFLICT DO NOTHING
					RETURNING project_id, name, value`, ps, ns, vs)
				if _, err := pgx.ForEachRow(back, []any{&p, &n, &v}, func() error { return nil }); err != nil {
					b.Fatal(err)
				}
				if _, err := tx.Exec(ctx, `UPDATE legacy_secrets SET value = NULL WHERE id = ANY($1)`, ids); err != nil {
					b.Fatal(err)
				}
				if err := tx.Commit(ctx); err != nil {
					b.Fatal(err)
				}
				last = ids[len(ids)-1]
			}
			elapsed += time.Since(t0)
		}
		b.ReportMetric(float64(migrateRows*b.N)/elapsed.Seconds(), "rows/s")
	})
	for _, workers := range []int{1, 2} {
		b.Run(fmt.Sprintf("encrypted/workers=%d", workers), func(b *testing.B) {
			var elapsed time.Duration
			for b.Loop() {
				b.StopTimer()
				fillLegacy(b, e)
				b.StartTimer()
				t0 := time.Now()
				res, err := e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{ClearPlaintext: true, Workers: workers})
				if err != nil || res.Migrated != migrateRows {
					b.Fatalf("%+v, %v", res, err)
				}
				elapsed += time.Since(t0)
			}
			b.ReportMetric(float64(migrateRows*b.N)/elapsed.Seconds(), "rows/s")
		})
	}
}

// BenchmarkRewrap rewraps 100 data keys after a rotation, once with no
// secrets and once with 100,000 secrets under those keys: the time should
// not depend on the secrets.
func BenchmarkRewrap(b *testing.B) {
	ctx := context.Background()
	for _, secrets := range []int{0, migrateRows} {
		b.Run(fmt.Sprintf("datakeys=100/secrets=%d", secrets), func(b *testing.B) {
			e := newEnv(b, pgstore.Config{})
			if secrets == 0 {
				for p := range 100 {
					if err := e.store.Put(ctx, fmt.Sprint("proj", p), "only", []byte("v")); err != nil {
						b.Fatal(err)
					}
					if err := e.store.Delete(ctx, fmt.Sprint("proj", p), "only"); err != nil {
						b.Fatal(err)
					}
				}
			} else {
				fillLegacy(b, e)
				if _, err := e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{}); err != nil {
					b.Fatal(err)
				}
			}
			if n := count(b, e.pool, `SELECT count(*) FROM keybroker.data_keys`); n != 100 {
				b.Fatalf("%d data keys", n)
			}
			var elapsed time.Duration
			var keys int64
			for b.Loop() {
				b.StopTimer()
				if _, err := e.store.RotateKEK(ctx); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				t0 := time.Now()
				res, err := e.store.Rewrap(ctx, pgstore.RewrapOptions{})
				if err != nil || res.Rewrapped != 100 {
					b.Fatalf("%+v, %v", res, err)
				}
				elapsed += time.Since(t0)
				keys += res.Rewrapped
			}
			b.ReportMetric(float64(keys)/elapsed.Seconds(), "datakeys/s")
		})
	}
}

// BenchmarkPutFence measures what Put's fence costs in the database: the
// same envelope upserted with the unfenced statement (VALUES, as before
// migration 003) and with Put's fenced one (INSERT ... SELECT from
// data_keys ... FOR KEY SHARE), alternately, on the same rows.
func BenchmarkPutFence(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b, pgstore.Config{})
	if err := e.store.Put(ctx, "p", "seed", benchValue(b)); err != nil {
		b.Fatal(err)
	}
	var blob, nonce []byte
	var id pgtype.UUID
	if err := e.pool.QueryRow(ctx, `SELECT encrypted_data, nonce, data_key_id FROM keybroker.encrypted_secrets WHERE name = 'seed'`).Scan(&blob, &nonce, &id); err != nil {
		b.Fatal(err)
	}
	const set = ` ON CONFLICT (project_id, name) DO UPDATE SET encrypted_data = EXCLUDED.encrypted_data, nonce = EXCLUDED.nonce,
    data_key_id = EXCLUDED.data_key_id, updated_at = now()`
	interleaved(b, []pair{{"", func(i int) error {
		_, err := e.pool.Exec(ctx, `INSERT INTO keybroker.encrypted_secrets AS s (project_id, name, encrypted_data, nonce, data_key_id)
VALUES ($1, $2, $3, $4, $5)`+set, "p", fmt.Sprint("a", i%1000), blob, nonce, id)
		return err
	}, func(i int) error {
		_, err := e.pool.Exec(ctx, `INSERT INTO keybroker.encrypted_secrets AS s (project_id, name, encrypted_data, nonce, data_key_id)
SELECT $1, $2, $3, $4, d.id FROM keybroker.data_keys d WHERE d.id = $5 AND d.project_id = $1 AND d.state <> 'retired' FOR KEY SHARE`+set, "p", fmt.Sprint("b", i%1000), blob, nonce, id)
		return err
	}}})
}

// BenchmarkGetMany10 reads 10 secrets of one project each iteration, one
// call after the other on each connection of benchConns: one Get (the
// round trip GetMany aims to cost), GetMany of 10 names, 10 Gets (what it
// replaces) and, as the floor, one plain SELECT of the 10 plaintext rows;
// the op that runs first after switching connection (slower, measured)
// rotates from one iteration to the next.
// It reports each one's time per operation (<conn>-<op>-ns/op) and
// <conn>-getmany10-vs-get, GetMany's time over one Get's (the target is at
// most 1.5), and <conn>-getmany10-vs-plain, over the plain SELECT's.
func BenchmarkGetMany10(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b, pgstore.Config{})
	plainTable(b, e)
	v := benchValue(b)
	const sets = 100
	names := make([][]string, sets)
	for i := range sets * 10 {
		name := fmt.Sprint("s", i)
		if _, err := e.pool.Exec(ctx, plainUpsert, "p", name, v); err != nil {
			b.Fatal(err)
		}
		if err := e.store.Put(ctx, "p", name, v); err != nil {
			b.Fatal(err)
		}
		names[i%sets] = append(names[i%sets], name)
	}
	// Statistics, as autovacuum would gather: without them the planner
	// guesses a project has a few rows and reads all 1000 of them,
	// filtering on name, rather than looking the names up in the index.
	if _, err := e.pool.Exec(ctx, `ANALYZE plain_secrets, keybroker.encrypted_secrets`); err != nil {
		b.Fatal(err)
	}
	type op struct {
		name string
		run  func(s *pgstore.Store, pool *pgxpool.Pool, i int) error
	}
	ops := []op{
		{"get", func(s *pgstore.Store, _ *pgxpool.Pool, i int) error {
			_, err := s.Get(ctx, "p", names[i%sets][0])
			return err
		}},
		{"getmany10", func(s *pgstore.Store, _ *pgxpool.Pool, i int) error {
			got, err := s.GetMany(ctx, "p", names[i%sets])
			if err == nil && len(got) != 10 {
				err = fmt.Errorf("GetMany returned %d secrets", len(got))
			}
			return err
		}},
		{"get10x", func(s *pgstore.Store, _ *pgxpool.Pool, i int) error {
			for _, name := range names[i%sets] {
				if _, err := s.Get(ctx, "p", name); err != nil {
					return err
				}
			}
			return nil
		}},
		{"plain-select10", func(_ *pgstore.Store, pool *pgxpool.Pool, i int) error {
			rows, _ := pool.Query(ctx, `SELECT name, value FROM plain_secrets WHERE project_id = $1 AND name = ANY($2)`, "p", names[i%sets])
			n := 0
			_, err := pgx.ForEachRow(rows, []any{new(string), new([]byte)}, func() error { n++; return nil })
			if err == nil && n != 10 {
				err = fmt.Errorf("plain SELECT returned %d rows", n)
			}
			return err
		}},
	}
	type conn struct {
		name  string
		pool  *pgxpool.Pool
		store *pgstore.Store
		t     []time.Duration
	}
	var conns []*conn
	for _, c := range benchConns {
		pool := c.pool(b, e.url)
		conns = append(conns, &conn{c.name, pool, newStore(b, pool, pgstore.Config{KEK: e.kek}), make([]time.Duration, len(ops))})
	}
	i := 0
	for b.Loop() {
		for _, c := range conns {
			for j := range ops {
				k := (i + j) % len(ops)
				t0 := time.Now()
				if err := ops[k].run(c.store, c.pool, i); err != nil {
					b.Fatal(err)
				}
				c.t[k] += time.Since(t0)
			}
		}
		i++
	}
	for _, c := range conns {
		for k, o := range ops {
			b.ReportMetric(float64(c.t[k].Nanoseconds())/float64(i), c.name+"-"+o.name+"-ns/op")
		}
		b.ReportMetric(float64(c.t[1])/float64(c.t[0]), c.name+"-getmany10-vs-get")
		b.ReportMetric(float64(c.t[1])/float64(c.t[3]), c.name+"-getmany10-vs-plain")
	}
}

// BenchmarkPutInTx prices Store.In on a direct connection. Each iteration
// runs, one after the other: a transaction upserting an application row
// and the plaintext value (plain-tx-ns/op, the baseline), the same
// transaction with In(tx).Put instead (kb-tx-ns/op), and Put alone on the
// pool (kb-put-ns/op); tx-overhead is kb-tx over plain-tx.
func BenchmarkPutInTx(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b, pgstore.Config{})
	plainTable(b, e)
	if _, err := e.pool.Exec(ctx, `CREATE TABLE app_rows (project_id text, name text, touched timestamptz, PRIMARY KEY (project_id, name))`); err != nil {
		b.Fatal(err)
	}
	const appUpsert = `INSERT INTO app_rows VALUES ($1, $2, now()) ON CONFLICT (project_id, name) DO UPDATE SET touched = now()`
	v := benchValue(b)
	pool := benchConns[0].pool(b, e.url)
	s := newStore(b, pool, pgstore.Config{KEK: e.kek})
	inTx := func(name string, put func(tx pgx.Tx) error) error {
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, appUpsert, "p", name); err != nil {
				return err
			}
			return put(tx)
		})
	}
	var plainTx, kbTx, kbPut time.Duration
	i := 0
	for b.Loop() {
		name := fmt.Sprint("s", i%1000)
		t0 := time.Now()
		if err := inTx(name, func(tx pgx.Tx) error { _, err := tx.Exec(ctx, plainUpsert, "p", name, v); return err }); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := inTx(name, func(tx pgx.Tx) error { return s.In(tx).Put(ctx, "p", name, v) }); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if err := s.Put(ctx, "p", name, v); err != nil {
			b.Fatal(err)
		}
		kbPut += time.Since(t2)
		kbTx += t2.Sub(t1)
		plainTx += t1.Sub(t0)
		i++
	}
	b.ReportMetric(float64(plainTx.Nanoseconds())/float64(i), "plain-tx-ns/op")
	b.ReportMetric(float64(kbTx.Nanoseconds())/float64(i), "kb-tx-ns/op")
	b.ReportMetric(float64(kbPut.Nanoseconds())/float64(i), "kb-put-ns/op")
	b.ReportMetric(float64(kbTx)/float64(plainTx), "tx-overhead")
}
