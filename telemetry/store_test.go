package telemetry_test

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
	"github.com/profullstack/keybroker/telemetry"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

var _ pgstore.Observer = (*telemetry.StoreObserver)(nil)

func TestStoreObserver(t *testing.T) {
	ctx := context.Background()
	r := newRecorder(t)
	pool := pgtest.Pool(t)
	if err := pgstore.Migrate(ctx, pool, pgstore.DefaultSchema); err != nil {
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
	got := r.collect(t)
	for attrs, want := range map[string]float64{
		"keybroker.operation=put,keybroker.outcome=ok":    1,
		"keybroker.operation=get,keybroker.outcome=ok":    1,
		"keybroker.operation=get,keybroker.outcome=error": 1,
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
