package e2e

import (
	"context"
	"errors"

	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// TestE2E runs the scenarios that share one set of servers (see env), each on every backend.
func TestE2E(t *testing.T) {
	e := newEnv(t)
	pool := e.pg.pool(t, 24)
	for _, b := range e.backends() {
		t.Run("Lifecycle/"+b.name, func(t *testing.T) { testLifecycle(t, e, pool, b) })
	}
	for _, b := range e.backends()[1:] {
		t.Run("MoveFromLocal/"+b.name, func(t *testing.T) { testMoveFromLocal(t, e, pool, b) })
	}
	for _, b := range e.backends() {
		t.Run("ConcurrentRewrap/"+b.name, func(t *testing.T) { testConcurrentRewrap(t, e, b) })
	}
	for _, b := range e.backends() {
		t.Run("MigrateUnderLoad/"+b.name, func(t *testing.T) { testMigrateUnderLoad(t, e, pool, b) })
	}
	t.Run("KillMigration", func(t *testing.T) { testKillMigration(t, e) })
	t.Run("VaultStopDuringRewrap", func(t *testing.T) { testVaultStopDuringRewrap(t, e, pool) })
	t.Run("PostgresPause", func(t *testing.T) { testPostgresPause(t, e) })
}

// testLifecycle: apply the schema, store 10,000 secrets across 50 projects, rotate the KEK,
// rewrap, retire the old version; every secret then decrypts to its original bytes.
func testLifecycle(t *testing.T, e *env, pool *pgxpool.Pool, b backend) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	schema := e.name("lifecycle_" + b.name)
	kek := b.newKEK(t)
	// A budget of 50 encryptions per data key gives each project 4 data keys: 200 to rewrap.
	st := newStore(ctx, t, pool, schema, kek, 50)
	set := genSecrets(1, "life", 50, 200)
	putAll(ctx, t, st, set)
	if n := count(ctx, t, pool, schema, `SELECT count(*) FROM {{s}}.encrypted_secrets`); n != 10000 {
		t.Fatalf("encrypted_secrets has %d rows, want 10000", n)
	}
	old, err := st.PrimaryVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before := dataKeysByVersion(ctx, t, pool, schema)
	dataKeys := before[old]
	if len(before) != 1 || dataKeys < 200 {
		t.Fatalf("data keys by KEK version before rotation: %v, want >= 200 under %s only", before, old)
	}

	// A probe DEK wrapped under the old version shows what retirement does in the key service.
	probe := make([]byte, 32)
	probe[0] = 1
	probeWK, err := kek.Wrap(ctx, probe, []byte("e2e probe"))
	if err != nil {
		t.Fatal(err)
	}

	cur, err := st.RotateKEK(ctx)
	if err != nil {
		t.Fatalf("rotate: %v", err)
	}
	if cur == old || cur.KeyID != old.KeyID {
		t.Fatalf("rotate: %s -> %s, want a new version of the same key", old, cur)
	}
	// Retiring a version still in use is refused, naming how many data keys need it.
	var inUse *pgstore.InUseError
	if err := st.RetireKEK(ctx, old); !errors.As(err, &inUse) || inUse.DataKeys != dataKeys {
		t.Fatalf("retire before rewrap: %v, want an InUseError for %d data keys", err, dataKeys)
	}
	// A secret written after the rotation gets a data key under the new version.
	extra := secretKey{"life-after-rotation", "secret"}
	set.set(extra, []byte("written after the rotation"))
	if err := st.Put(ctx, extra.project, extra.name, []byte("written after the rotation")); err != nil {
		t.Fatal(err)
	}

	res, err := st.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: 64})
	if err != nil {
		t.Fatalf("rewrap: %v", err)
	}
	if res.Primary != cur || res.Rewrapped != dataKeys || len(res.Pending) != 1 || res.Pending[0].KEKVersion != old || res.Pending[0].DataKeys != dataKeys {
		t.Fatalf("rewrap: %+v, want %d data keys rewrapped from %s to %s", res, dataKeys, old, cur)
	}
	if after := dataKeysByVersion(ctx, t, pool, schema); len(after) != 1 || after[cur] != dataKeys+1 {
		t.Fatalf("data keys by KEK version after rewrap: %v, want %d under %s only", after, dataKeys+1, cur)
	}

	if err := st.RetireKEK(ctx, old); err != nil {
		t.Fatalf("retire %s: %v", old, err)
	}
	if n := count(ctx, t, pool, schema, `SELECT count(*) FROM {{s}}.kek WHERE key_version = $1 AND retired_at IS NOT NULL`, old.Version); n != 1 {
		t.Fatalf("kek row of %s not marked retired", old)
	}
	if _, ok := kek.(provider.Retirer); ok {
		if dek, err := kek.Unwrap(ctx, probeWK, []byte("e2e probe")); err == nil {
			provider.Clear(dek)
			t.Fatalf("a key wrapped under retired version %s still unwraps", old)
		}
	}

	// A fresh store (no cached data keys) reads every secret through the key service.
	verifyAll(ctx, t, newStore(ctx, t, pool, schema, kek, 50), set)
	t.Logf("%s: %d secrets, %d data keys rewrapped %s -> %s", b.name, set.len(), dataKeys, old.Version, cur.Version)
}

// testMoveFromLocal: a deployment starts on the local provider; its configuration switches to
// b as primary with local kept decrypt-only; every data key is rewrapped to b; local is
// removed; every secret still decrypts, and no longer through local.
func testMoveFromLocal(t *testing.T, e *env, pool *pgxpool.Pool, b backend) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	schema := e.name("move_" + b.name)
	localKEK := newLocalKEK(t, e.name("local"))
	set := genSecrets(2, "move", 20, 100)
	putAll(ctx, t, newStore(ctx, t, pool, schema, localKEK, 25), set)
	dataKeys := sum(dataKeysByVersion(ctx, t, pool, schema))

	target := b.newKEK(t)
	kr, err := provider.NewKeyring(target, localKEK)
	if err != nil {
		t.Fatal(err)
	}
	mid := newStore(ctx, t, pool, schema, kr, 25)
	// Writes during the move go to the new backend at once.
	more := genSecrets(3, "move-new", 2, 50)
	putAll(ctx, t, mid, more)
	for k, v := range more.snapshot() {
		set.set(k, v)
	}
	res, err := mid.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: 16})
	if err != nil {
		t.Fatalf("rewrap to %s: %v", b.name, err)
	}
	if res.Rewrapped != dataKeys || res.Primary.Provider != target.Ref().Provider {
		t.Fatalf("rewrap: %+v, want %d data keys moved to %s", res, dataKeys, target.Ref())
	}
	for _, p := range res.Pending {
		if p.Provider != "local" {
			t.Fatalf("rewrap: pending %v, want local data keys only", res.Pending)
		}
	}
	for v := range dataKeysByVersion(ctx, t, pool, schema) {
		if v.Provider != target.Ref().Provider || v.KeyID != target.Ref().KeyID {
			t.Fatalf("after the move a data key is still under %s", v)
		}
	}

	// local removed from the configuration.
	verifyAll(ctx, t, newStore(ctx, t, pool, schema, target, 25), set)
	// The local key alone no longer reads anything.
	onlyLocal := newStore(ctx, t, pool, schema, localKEK, 25)
	for k := range set.snapshot() {
		if v, err := onlyLocal.Get(ctx, k.project, k.name); err == nil {
			provider.Clear(v)
			t.Fatalf("secret %s/%s still decrypts with the local key alone", k.project, k.name)
		}
		break
	}
	t.Logf("local -> %s: %d secrets, %d data keys moved", b.name, set.len(), dataKeys)
}

// testConcurrentRewrap: two rewrap workers (separate stores and pools, as two processes) run
// at once and share the work; every data key ends wrapped exactly once under the new version.
func testConcurrentRewrap(t *testing.T, e *env, b backend) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	schema := e.name("concurrent_" + b.name)
	kek := b.newKEK(t)
	setup := e.pg.pool(t, 8)
	set := genSecrets(4, "conc", 20, 100)
	// A budget of 10 gives 200 data keys.
	putAll(ctx, t, newStore(ctx, t, setup, schema, kek, 10), set)
	admin := newStore(ctx, t, setup, schema, kek, 10)
	old, err := admin.PrimaryVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dataKeys := dataKeysByVersion(ctx, t, setup, schema)[old]
	if dataKeys < 200 {
		t.Fatalf("%d data keys under %s, want >= 200", dataKeys, old)
	}
	cur, err := admin.RotateKEK(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// Each worker, after its first committed batch, waits until the other has committed one
	// too (or has finished): both provably take part, whatever the scheduling.
	type worker struct {
		store     *pgstore.Store
		firstDone chan struct{}
		finished  chan struct{}
		res       pgstore.RewrapResult
		err       error
	}
	ws := [2]*worker{}
	for i := range ws {
		ws[i] = &worker{store: newStore(ctx, t, e.pg.pool(t, 4), schema, kek, 10), firstDone: make(chan struct{}), finished: make(chan struct{})}
	}
	for i, w := range ws {
		other := ws[1-i]
		first := true
		go func() {
			defer close(w.finished)
			w.res, w.err = w.store.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: 8, Progress: func(pgstore.RewrapProgress) {
				if !first {
					return
				}
				first = false
				close(w.firstDone)
				select {
				case <-other.firstDone:
				case <-other.finished:
				case <-ctx.Done():
				}
			}})
			if first {
				close(w.firstDone)
			}
		}()
	}
	for _, w := range ws {
		<-w.finished
		if w.err != nil {
			t.Fatalf("rewrap worker: %v", w.err)
		}
	}
	a, c := ws[0].res.Rewrapped, ws[1].res.Rewrapped
	if a == 0 || c == 0 || a+c != dataKeys {
		t.Fatalf("workers rewrapped %d and %d data keys, want both > 0 and %d in all", a, c, dataKeys)
	}
	if got := dataKeysByVersion(ctx, t, setup, schema); len(got) != 1 || got[cur] != dataKeys {
		t.Fatalf("data keys by version after rewrap: %v, want %d under %s", got, dataKeys, cur)
	}
	// The audit trail counts each data key once.
	if n := count(ctx, t, setup, schema, `SELECT coalesce(sum(count), 0) FROM {{s}}.key_events WHERE event = 'kek.rewrap'`); n != dataKeys {
		t.Fatalf("audit trail records %d rewraps, want %d", n, dataKeys)
	}
	verifyAll(ctx, t, newStore(ctx, t, setup, schema, kek, 10), set)
	t.Logf("%s: workers rewrapped %d + %d = %d data keys", b.name, a, c, dataKeys)
}
