package e2e

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/pgstore"
)

// legacyTable creates schema.secrets, a plaintext table as an application had before
// keybroker, with rows rows across projects projects, and returns the rows as a secretSet
// keyed by (project, name).
func legacyTable(ctx context.Context, t *testing.T, pool *pgxpool.Pool, schema string, rows, projects int) *secretSet {
	t.Helper()
	q := pgx.Identifier{schema}.Sanitize()
	if _, err := pool.Exec(ctx, `CREATE SCHEMA `+q+`;
CREATE TABLE `+q+`.secrets (id bigserial PRIMARY KEY, project text NOT NULL, name text NOT NULL, value bytea, UNIQUE (project, name))`); err != nil {
		t.Fatalf("create legacy table: %v", err)
	}
	// 16 to 128 bytes per value.
	if _, err := pool.Exec(ctx, `INSERT INTO `+q+`.secrets (project, name, value)
SELECT 'legacy-' || (i % $2), 'secret-' || i, decode(repeat(md5(random()::text || i), 1 + i % 8), 'hex')
FROM generate_series(1, $1) AS i`, rows, projects); err != nil {
		t.Fatalf("fill legacy table: %v", err)
	}
	return legacyRows(ctx, t, pool, schema)
}

// legacyRows reads the legacy table's rows that still hold a value.
func legacyRows(ctx context.Context, t *testing.T, pool *pgxpool.Pool, schema string) *secretSet {
	t.Helper()
	rows, err := pool.Query(ctx, `SELECT project, name, value FROM `+pgx.Identifier{schema}.Sanitize()+`.secrets WHERE value IS NOT NULL`)
	if err != nil {
		t.Fatalf("read legacy table: %v", err)
	}
	set := newSecretSet()
	var k secretKey
	var v []byte
	if _, err := pgx.ForEachRow(rows, []any{&k.project, &k.name, &v}, func() error {
		set.m[k] = append([]byte(nil), v...)
		return nil
	}); err != nil {
		t.Fatalf("read legacy table: %v", err)
	}
	return set
}

func legacySource(schema string) pgstore.PlaintextSource {
	return pgstore.PlaintextSource{Table: schema + ".secrets", KeyColumn: "id", ProjectColumn: "project", NameColumn: "name", ValueColumn: "value"}
}

// migrateRows is the size of the legacy table of the migration under load.
const migrateRows = 100_000

// testMigrateUnderLoad: 100,000 legacy plaintext rows are migrated while concurrent writers
// keep inserting and updating: new secrets through the store, new values for legacy secrets
// through the store, new rows in the legacy table. Afterwards no row is lost and none
// mismatched.
func testMigrateUnderLoad(t *testing.T, e *env, pool *pgxpool.Pool, b backend) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	schema := e.name("migrate_" + b.name)
	legacySchema := schema + "_legacy"
	legacy := legacyTable(ctx, t, pool, legacySchema, migrateRows, 100)
	kek := b.newKEK(t)
	migrator := newStore(ctx, t, pool, schema, kek, 0)
	app := newStore(ctx, t, pool, schema, kek, 0)

	// Each writer does opsPerBatch operations per batch of the migration: at each batch
	// boundary the migration waits until the writers' previous operations are done and grants
	// the next ones, which run while the next batch does. So the load is bounded and
	// interleaves with every batch, whatever the scheduling.
	const opsPerBatch = 4
	legacyNames := make([]secretKey, 0, len(legacy.m))
	for k := range legacy.m {
		legacyNames = append(legacyNames, k)
	}
	var (
		wg        sync.WaitGroup
		grants    [4]chan int      // operations a writer may do
		done      [4]chan struct{} // one per operation a writer did
		ops       [4]int64         // operations done, read after wg.Wait
		errs      = make(chan error, 4)
		inserted  = newSecretSet() // new secrets written through the store
		updated   = newSecretSet() // legacy secrets overwritten through the store
		legacyNew = newSecretSet() // rows added to the legacy table meanwhile
	)
	writer := func(i int, op func(r *rand.Rand, n int) error) {
		grants[i], done[i] = make(chan int, 1), make(chan struct{}, opsPerBatch)
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(i), 99))
			for g := range grants[i] {
				for range g {
					if err := op(r, int(ops[i])); err != nil {
						errs <- err
						return
					}
					ops[i]++
					done[i] <- struct{}{}
				}
			}
		}()
	}
	writer(0, func(r *rand.Rand, n int) error {
		k, v := secretKey{fmt.Sprintf("live-%d", n%10), fmt.Sprintf("new-%06d", n)}, randomValue(r, 200)
		if err := app.Put(ctx, k.project, k.name, v); err != nil {
			return err
		}
		inserted.set(k, v)
		return nil
	})
	// Two updaters, each on its own half of the legacy names, so each name's last value is known.
	for half := range 2 {
		writer(1+half, func(r *rand.Rand, n int) error {
			k := legacyNames[(2*r.IntN(len(legacyNames)/2)+half)%len(legacyNames)]
			v := randomValue(r, 200)
			if err := app.Put(ctx, k.project, k.name, v); err != nil {
				return err
			}
			updated.set(k, v)
			return nil
		})
	}
	writer(3, func(r *rand.Rand, n int) error {
		k, v := secretKey{fmt.Sprintf("legacy-%d", n%100), fmt.Sprintf("late-%06d", n)}, randomValue(r, 128)
		if _, err := pool.Exec(ctx, `INSERT INTO `+pgx.Identifier{legacySchema}.Sanitize()+`.secrets (project, name, value) VALUES ($1, $2, $3)`, k.project, k.name, v); err != nil {
			return err
		}
		legacyNew.set(k, v)
		return nil
	})
	var writerErr error
	outstanding := false // operations are granted and not yet all done
	// settle waits until the operations granted last are done.
	settle := func() {
		if !outstanding {
			return
		}
		outstanding = false
		for i := range done {
			for range opsPerBatch {
				select {
				case <-done[i]:
				case err := <-errs:
					writerErr = cmp.Or(writerErr, err)
					return
				case <-ctx.Done():
					writerErr = cmp.Or(writerErr, ctx.Err())
					return
				}
			}
		}
	}
	grant := func() {
		if writerErr == nil {
			for i := range grants {
				grants[i] <- opsPerBatch
			}
			outstanding = true
		}
	}
	grant()
	start := time.Now()
	batches := 0
	first, err := migrator.MigratePlaintext(ctx, legacySource(legacySchema), pgstore.MigrateOptions{
		BatchSize: 1000,
		Progress: func(pgstore.MigrateProgress) {
			batches++
			settle()
			grant()
		},
	})
	took := time.Since(start)
	settle()
	for i := range grants {
		close(grants[i])
	}
	wg.Wait()
	if writerErr != nil {
		t.Fatalf("writer: %v", writerErr)
	}
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	if want := int64(opsPerBatch * (batches + 1)); ops[0] != want || ops[1]+ops[2] != 2*want || ops[3] != want {
		t.Fatalf("writers did %v operations, want %d each", ops, want)
	}
	// The legacy writer may have added rows behind the migration's cursor after it passed:
	// a second run, with no writer left, catches up. It is idempotent for the rest.
	last, err := migrator.MigratePlaintext(ctx, legacySource(legacySchema), pgstore.MigrateOptions{BatchSize: 1000})
	if err != nil {
		t.Fatalf("catch-up migrate: %v", err)
	}

	totalLegacy := int64(len(legacy.m) + legacyNew.len())
	nUpdated := int64(updated.len())
	if last.Migrated+last.AlreadyPresent+last.Conflicts != totalLegacy || last.Conflicts != nUpdated {
		t.Fatalf("catch-up run %+v: want %d rows seen, %d of them conflicts (the legacy secrets updated through the store)",
			last, totalLegacy, nUpdated)
	}
	if got := first.Migrated + last.Migrated; got > totalLegacy || got < totalLegacy-nUpdated {
		t.Fatalf("migrated %d + %d rows, want between %d and %d", first.Migrated, last.Migrated, totalLegacy-nUpdated, totalLegacy)
	}

	want := newSecretSet()
	for _, s := range []*secretSet{legacy, legacyNew, updated, inserted} { // later sets win
		for k, v := range s.snapshot() {
			want.set(k, v)
		}
	}
	if n := count(ctx, t, pool, schema, `SELECT count(*) FROM {{s}}.encrypted_secrets`); n != int64(want.len()) {
		t.Fatalf("encrypted_secrets has %d rows, want %d", n, want.len())
	}
	verifyAll(ctx, t, newStore(ctx, t, pool, schema, kek, 0), want)
	t.Logf("%s: %d legacy rows migrated in %v (%d batches) while writers did %d inserts, %d updates, %d legacy inserts; catch-up migrated %d",
		b.name, len(legacy.m), took.Round(time.Millisecond), batches, ops[0], ops[1]+ops[2], ops[3], last.Migrated)
}

// cutter is a pgx tracer that, armed with n, cuts its connection to the server (the server
// ends the backend, as when the migrating process dies or its network goes) just before the
// n-th statement from now is sent: anywhere in a batch, between BEGIN and COMMIT included.
type cutter struct {
	admin *pgxpool.Pool

	mu        sync.Mutex
	countdown int
	cuts      int
	cutSQL    string // the statement the last cut came before ("batch" for a batch)
	err       error
}

func (c *cutter) arm(n int) {
	c.mu.Lock()
	c.countdown = n
	c.mu.Unlock()
}

func (c *cutter) maybeCut(ctx context.Context, conn *pgx.Conn, sql string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.countdown == 0 {
		return
	}
	if c.countdown--; c.countdown > 0 {
		return
	}
	// The second argument waits for the backend to have exited.
	var ok bool
	err := c.admin.QueryRow(context.WithoutCancel(ctx), `SELECT pg_terminate_backend($1, 10000)`, conn.PgConn().PID()).Scan(&ok)
	if err == nil && !ok {
		err = fmt.Errorf("backend %d not terminated", conn.PgConn().PID())
	}
	if err != nil && c.err == nil {
		c.err = err
	}
	c.cuts++
	c.cutSQL = sql
}

func (c *cutter) TraceQueryStart(ctx context.Context, conn *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	c.maybeCut(ctx, conn, d.SQL)
	return ctx
}
func (c *cutter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (c *cutter) TraceBatchStart(ctx context.Context, conn *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	c.maybeCut(ctx, conn, "batch")
	return ctx
}
func (c *cutter) TraceBatchQuery(_ context.Context, _ *pgx.Conn, d pgx.TraceBatchQueryData) {
	c.mu.Lock()
	if c.cutSQL == "batch" {
		c.cutSQL = "batch: " + d.SQL
	}
	c.mu.Unlock()
}
func (c *cutter) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

// testKillMigration: the migrating process loses its database connection at 20 random
// points (the plaintext column being cleared as rows are migrated, so a lost row would be
// gone for good); each rerun, a new process, continues, and at every point no secret is lost:
// a legacy value is cleared only where its encrypted copy is stored. The seed of the points
// is logged; KEYBROKER_E2E_SEED replays one.
func testKillMigration(t *testing.T, e *env) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("KEYBROKER_E2E_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("KEYBROKER_E2E_SEED: %v", err)
		}
	}
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 20))

	admin := e.pg.pool(t, 4)
	schema := e.name("kill")
	legacySchema := schema + "_legacy"
	legacy := legacyTable(ctx, t, admin, legacySchema, 40_000, 10)
	kek := newLocalKEK(t, e.name("local"))
	if err := pgstore.Migrate(ctx, admin, schema); err != nil {
		t.Fatal(err)
	}
	cut := &cutter{admin: admin}
	// run is one migrating process: its own pool and store, gone when it returns.
	run := func() (pgstore.MigrateResult, error) {
		cfg, err := pgxpool.ParseConfig(e.pg.URL)
		if err != nil {
			t.Fatal(err)
		}
		cfg.MaxConns = 2
		cfg.ConnConfig.Tracer = cut
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer pool.Close()
		st, err := pgstore.New(ctx, pool, pgstore.Config{Schema: schema, KEK: kek})
		if err != nil {
			return pgstore.MigrateResult{}, err
		}
		defer st.Close()
		return st.MigratePlaintext(ctx, legacySource(legacySchema), pgstore.MigrateOptions{BatchSize: 100, ClearPlaintext: true})
	}
	// lost counts legacy rows whose value is cleared but whose secret is not stored.
	lost := func() int64 {
		return count(ctx, t, admin, legacySchema, `SELECT count(*) FROM {{s}}.secrets l WHERE l.value IS NULL AND NOT EXISTS (
  SELECT 1 FROM `+pgx.Identifier{schema}.Sanitize()+`.encrypted_secrets e WHERE e.project_id = l.project AND e.name = l.name)`)
	}

	var points []string
	for i := range 20 {
		// A run makes about 20 statements before its first batch, then about 7 per batch.
		n := 1 + r.IntN(100)
		points = append(points, strconv.Itoa(n))
		cut.arm(n)
		res, err := run()
		if cut.err != nil {
			t.Fatalf("cut %d: %v", i+1, cut.err)
		}
		if cut.cuts != i+1 {
			t.Fatalf("run %d finished before its cut point (statement %d): the legacy table is too small for 20 cuts", i+1, n)
		}
		if err == nil {
			t.Fatalf("run %d: no error although its connection was cut at statement %d (%.60q); result %+v", i+1, n, cut.cutSQL, res)
		}
		if msg := err.Error(); !strings.HasPrefix(msg, "pgstore: ") || strings.Contains(msg, "\n") {
			t.Fatalf("run %d: error %q, want one line starting with pgstore:", i+1, msg)
		}
		if l := lost(); l != 0 {
			t.Fatalf("after cut %d (statement %d): %d legacy values cleared without their secret stored", i+1, n, l)
		}
	}
	cut.arm(0)
	res, err := run()
	if err != nil {
		t.Fatalf("final run: %v", err)
	}
	if left := count(ctx, t, admin, legacySchema, `SELECT count(*) FROM {{s}}.secrets WHERE value IS NOT NULL`); left != 0 || lost() != 0 {
		t.Fatalf("after the final run %d legacy values are left, %d lost", left, lost())
	}
	if n := count(ctx, t, admin, schema, `SELECT count(*) FROM {{s}}.encrypted_secrets`); n != int64(len(legacy.m)) {
		t.Fatalf("encrypted_secrets has %d rows, want %d", n, len(legacy.m))
	}
	st, err := pgstore.New(ctx, admin, pgstore.Config{Schema: schema, KEK: kek})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	verifyAll(ctx, t, st, legacy)
	if res.Migrated >= int64(len(legacy.m)) {
		t.Fatalf("the final run migrated all %d rows: the cut runs committed nothing", res.Migrated)
	}
	t.Logf("cut at statements %s; the final run migrated %d of %d rows", strings.Join(points, ","), res.Migrated, len(legacy.m))
}
