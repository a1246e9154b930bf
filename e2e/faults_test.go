package e2e

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/vault"
)

// onUnwrap is the Vault provider with a hook run before its n-th Unwrap. It forwards
// everything else, so the store sees the same capabilities (rotation, description,
// retirement; Vault has no in-service rewrap).
type onUnwrap struct {
	*vault.Provider
	n     atomic.Int64
	at    int64
	hook  func()
	fired atomic.Bool
}

func (p *onUnwrap) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	if p.n.Add(1) == p.at {
		p.hook()
		p.fired.Store(true)
	}
	return p.Provider.Unwrap(ctx, wk, aad)
}

// testVaultStopDuringRewrap: the Vault container stops in the middle of a rewrap batch (after
// the first batch committed and half of the second is rewrapped in memory). The rewrap fails
// with a clear error, the interrupted batch is rolled back, no data key is lost (each is under
// the old or the new version), and once Vault is started again (same storage, unsealed) a new
// rewrap finishes the rest.
func testVaultStopDuringRewrap(t *testing.T, e *env, pool *pgxpool.Pool) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	v := startVault(t)
	const batch = 10
	var stopErr error
	kek := &onUnwrap{Provider: newVaultKEK(t, v, "stopped"), at: batch + batch/2, hook: func() { stopErr = v.stop(ctx) }}
	schema := e.name("vault_stop")
	set := genSecrets(5, "stop", 10, 100)
	st := newStore(ctx, t, pool, schema, kek, 10) // 100 data keys
	putAll(ctx, t, st, set)
	old, err := st.PrimaryVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dataKeys := dataKeysByVersion(ctx, t, pool, schema)[old]
	cur, err := st.RotateKEK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	kek.n.Store(0) // count the rewrap's unwraps only

	res, err := st.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: batch})
	if !kek.fired.Load() || stopErr != nil {
		t.Fatalf("Vault not stopped during the rewrap: %v", stopErr)
	}
	if err == nil {
		t.Fatalf("rewrap with Vault stopped: no error (%+v)", res)
	}
	if !errors.Is(err, provider.ErrUnavailable) || !strings.HasPrefix(err.Error(), "pgstore: ") || !strings.Contains(err.Error(), "vault") {
		t.Fatalf("rewrap with Vault stopped: %q, want a pgstore error naming vault and matching provider.ErrUnavailable", err)
	}
	if res.Rewrapped != batch {
		t.Fatalf("rewrap with Vault stopped reports %d data keys rewrapped, want %d (the batch committed before the stop)", res.Rewrapped, batch)
	}
	if got := dataKeysByVersion(ctx, t, pool, schema); got[cur] != batch || got[old] != dataKeys-batch || sum(got) != dataKeys {
		t.Fatalf("data keys after the failed rewrap: %v, want %d under %s and %d under %s", got, batch, cur, dataKeys-batch, old)
	}
	t.Logf("rewrap with Vault stopped: %v", err)

	if err := v.start(ctx); err != nil {
		t.Fatal(err)
	}
	res, err = st.Rewrap(ctx, pgstore.RewrapOptions{BatchSize: batch})
	if err != nil {
		t.Fatalf("rewrap after restart: %v", err)
	}
	if res.Rewrapped != dataKeys-batch {
		t.Fatalf("rewrap after restart rewrapped %d, want %d", res.Rewrapped, dataKeys-batch)
	}
	if got := dataKeysByVersion(ctx, t, pool, schema); len(got) != 1 || got[cur] != dataKeys {
		t.Fatalf("data keys after the resumed rewrap: %v, want %d under %s", got, dataKeys, cur)
	}
	verifyAll(ctx, t, newStore(ctx, t, pool, schema, kek, 10), set)
}

// testPostgresPause: with the PostgreSQL container paused, operations fail once their
// deadline passes, with an error naming the operation and matching
// context.DeadlineExceeded; after unpausing the same store works again and nothing was
// half-written.
func testPostgresPause(t *testing.T, e *env) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	pg := startPostgres(t)
	pool := pg.pool(t, 8)
	kek := newLocalKEK(t, e.name("local"))
	st := newStore(ctx, t, pool, "keybroker", kek, 0)
	set := genSecrets(6, "pause", 5, 20)
	putAll(ctx, t, st, set)

	unpause := pause(t, pg.c)
	const deadline = time.Second
	ops := map[string]func(context.Context) error{
		"put": func(ctx context.Context) error {
			return st.Put(ctx, "pause-project-000", "during-pause", []byte("written while paused"))
		},
		"get": func(ctx context.Context) error {
			_, err := st.Get(ctx, "pause-project-001", "secret-00001")
			return err
		},
		"rewrap": func(ctx context.Context) error {
			_, err := st.Rewrap(ctx, pgstore.RewrapOptions{})
			return err
		},
	}
	for name, op := range ops {
		opCtx, opCancel := context.WithTimeout(ctx, deadline)
		start := time.Now()
		err := op(opCtx)
		took := time.Since(start)
		opCancel()
		if err == nil {
			t.Fatalf("%s on a paused server succeeded", name)
		}
		if !errors.Is(err, context.DeadlineExceeded) || !strings.HasPrefix(err.Error(), "pgstore: ") {
			t.Fatalf("%s on a paused server: %q, want a pgstore error matching context.DeadlineExceeded", name, err)
		}
		// The deadline is honoured: the call returns soon after it, not at some later timeout.
		if took > deadline+10*time.Second {
			t.Fatalf("%s on a paused server returned after %v, deadline %v", name, took, deadline)
		}
		t.Logf("%s while paused: %v", name, err)
	}
	unpause()

	// The Put that timed out may or may not have committed (the server may process it after
	// the thaw): either the secret is absent or it holds exactly the bytes written.
	got, err := st.Get(ctx, "pause-project-000", "during-pause")
	switch {
	case errors.Is(err, pgstore.ErrNotFound):
	case err != nil:
		t.Fatalf("get after unpause: %v", err)
	case !bytes.Equal(got, []byte("written while paused")):
		t.Fatal("the Put interrupted by the pause left other bytes")
	}
	if err := st.Put(ctx, "pause-project-000", "after-pause", []byte("written after the pause")); err != nil {
		t.Fatalf("put after unpause: %v", err)
	}
	set.set(secretKey{"pause-project-000", "after-pause"}, []byte("written after the pause"))
	verifyAll(ctx, t, st, set)
}
