package telemetry_test

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
	"github.com/profullstack/keybroker/telemetry"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

var _ pgstore.Observer = (*telemetry.StoreObserver)(nil)

func TestStoreObserver(t *testing.T) {
	ctx := context.Background()
	r := newRecorder(t)
	pool, kr := migratedKeyring(t, r)
	st, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kr, Observer: r.tel.StoreObserver()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	reg, err := r.tel.ObserveCache("pgstore", st.CacheStats)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Unregister()
	if err := st.Put(ctx, "p1", "a", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Get(ctx, "p1", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Get(ctx, "p1", "missing"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("Get missing: %v, want ErrNotFound", err)
	}
	if m, err := st.GetMany(ctx, "p1", []string{"a", "missing"}); err != nil || len(m) != 1 {
		t.Fatalf("GetMany: %d secrets, %v; want 1", len(m), err)
	}
	got := r.collect(t)
	for attrs, want := range map[string]float64{
		"keybroker.operation=put,keybroker.outcome=ok":     1,
		"keybroker.operation=get,keybroker.outcome=ok":     1,
		"keybroker.operation=get,keybroker.outcome=error":  1,
		"keybroker.operation=getmany,keybroker.outcome=ok": 1,
	} {
		if v := value(t, got, telemetry.MetricOperations, attrs); v != want {
			t.Errorf("operations{%s} = %v, want %v", attrs, v, want)
		}
	}
	if v := value(t, got, telemetry.MetricKMSCalls, "keybroker.backend=local,keybroker.operation=wrap,keybroker.outcome=ok"); v != 1 {
		t.Errorf("wraps = %v, want 1 (one data key)", v)
	}
	// Put made the data key and cached it, so Get hit the cache.
	if v := value(t, got, telemetry.MetricCacheHits, "keybroker.component=pgstore"); v < 1 {
		t.Errorf("pgstore cache hits = %v, want at least 1", v)
	}
	parents := map[string]string{}
	for _, s := range r.spans.Ended() {
		parents[s.SpanContext().SpanID().String()] = s.Name()
		checkAttrs(t, "span "+s.Name(), s.Attributes())
	}
	found := false
	for _, s := range r.spans.Ended() {
		if s.Name() == "keybroker.kms.wrap" {
			found = true
			if p := parents[s.Parent().SpanID().String()]; p != "keybroker.put" {
				t.Errorf("kms.wrap's parent is %q, want keybroker.put", p)
			}
		}
	}
	if !found {
		t.Error("no kms.wrap span")
	}
}

// A Get whose data key has been tampered with (its wrapped form edited in
// the database) counts as decrypt_failed, the outcome docs/OPERATIONS.md
// alerts on for tampering, exactly as an edited ciphertext does; the
// key-service call it made records the service's own verdict.
func TestStoreObserverTamperedDataKey(t *testing.T) {
	ctx := context.Background()
	r := newRecorder(t)
	pool, kr := migratedKeyring(t, r)
	open := func() *pgstore.Store {
		// DirectKEK: the key service unwraps the data key itself, and its
		// verdict is the kms.calls outcome checked below. (Under the key
		// hierarchy the intermediate key does, in process.)
		st, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kr, Observer: r.tel.StoreObserver(), DirectKEK: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	for _, name := range []string{"a", "b"} {
		if err := open().Put(ctx, "p1", name, []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pool.Exec(ctx, `UPDATE keybroker.encrypted_secrets SET encrypted_data = set_byte(encrypted_data, 40, get_byte(encrypted_data, 40) # 1) WHERE name = 'a'`); err != nil {
		t.Fatal(err)
	}
	if _, err := open().Get(ctx, "p1", "a"); err == nil {
		t.Fatal("edited ciphertext decrypted")
	}
	if _, err := pool.Exec(ctx, `UPDATE keybroker.data_keys SET wrapped_dek = set_byte(wrapped_dek, 20, get_byte(wrapped_dek, 20) # 1)`); err != nil {
		t.Fatal(err)
	}
	if _, err := open().Get(ctx, "p1", "b"); err == nil { // a fresh Store: the data key is unwrapped from the row
		t.Fatal("edited data key unwrapped")
	}
	got := r.collect(t)
	if v := value(t, got, telemetry.MetricOperations, "keybroker.operation=get,keybroker.outcome=decrypt_failed"); v != 2 {
		t.Errorf("get decrypt_failed = %v, want 2 (edited ciphertext, edited data key)", v)
	}
	if v := value(t, got, telemetry.MetricKMSCalls, "keybroker.backend=local,keybroker.operation=unwrap,keybroker.outcome=invalid_ciphertext"); v != 1 {
		t.Errorf("unwraps invalid_ciphertext = %v, want 1", v)
	}
}

// migratedKeyring gives a fresh migrated database and a local keyring
// instrumented by r's Telemetry.
func migratedKeyring(t *testing.T, r *recorder) (*pgxpool.Pool, *provider.Keyring) {
	t.Helper()
	pool := pgtest.Pool(t)
	if err := pgstore.Migrate(context.Background(), pool, pgstore.DefaultSchema); err != nil {
		t.Fatal(err)
	}
	kek, err := local.Generate("tel")
	if err != nil {
		t.Fatal(err)
	}
	kr, err := r.tel.Keyring(kek)
	if err != nil {
		t.Fatal(err)
	}
	return pool, kr
}
