package telemetry_test

import (
	"context"
	"errors"
	"slices"
	"sort"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
	"github.com/profullstack/keybroker/telemetry"
)

// recorder is an SDK meter and tracer provider with in-memory readers.
type recorder struct {
	reader *sdkmetric.ManualReader
	spans  *tracetest.SpanRecorder
	tel    *telemetry.Telemetry
}

func newRecorder(t *testing.T) *recorder {
	t.Helper()
	r := &recorder{reader: sdkmetric.NewManualReader(), spans: tracetest.NewSpanRecorder()}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(r.reader))
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(r.spans))
	t.Cleanup(func() { mp.Shutdown(context.Background()); tp.Shutdown(context.Background()) })
	tel, err := telemetry.New(telemetry.WithMeterProvider(mp), telemetry.WithTracerProvider(tp))
	if err != nil {
		t.Fatal(err)
	}
	r.tel = tel
	return r
}

// point is one data point: its attributes as "k=v" strings, sorted, and
// its value.
type point struct {
	attrs string
	value float64
}

func attrString(s attribute.Set) string {
	var kv []string
	for _, a := range s.ToSlice() {
		kv = append(kv, string(a.Key)+"="+a.Value.String())
	}
	sort.Strings(kv)
	return join(kv)
}

func join(s []string) string {
	out := ""
	for i, x := range s {
		if i > 0 {
			out += ","
		}
		out += x
	}
	return out
}

// collect returns every metric's data points by name: sums and gauges by
// value, histograms by count.
func (r *recorder) collect(t *testing.T) map[string][]point {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string][]point{}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != telemetry.ScopeName {
			t.Errorf("scope %q, want %q", sm.Scope.Name, telemetry.ScopeName)
		}
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					out[m.Name] = append(out[m.Name], point{attrString(p.Attributes), float64(p.Value)})
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					out[m.Name] = append(out[m.Name], point{attrString(p.Attributes), float64(p.Value)})
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					out[m.Name] = append(out[m.Name], point{attrString(p.Attributes), float64(p.Count)})
				}
			default:
				t.Errorf("metric %s has unexpected data type %T", m.Name, m.Data)
			}
		}
	}
	return out
}

func value(t *testing.T, got map[string][]point, name, attrs string) float64 {
	t.Helper()
	for _, p := range got[name] {
		if p.attrs == attrs {
			return p.value
		}
	}
	t.Errorf("%s{%s}: no data point; have %v", name, attrs, got[name])
	return -1
}

// allowedAttrs is every attribute key and value the package may emit: no
// key ids, versions, tenants, names or anything derived from data.
var allowedAttrs = map[attribute.Key][]string{
	telemetry.AttrOperation: {"encrypt", "decrypt", "put", "get", "getmany", "wrap", "unwrap", "rewrap", "rotate", "describe", "retire", "reencrypt", "migrate_plaintext"},
	telemetry.AttrBackend:   {"local", "awskms", "gcpkms", "vault"},
	telemetry.AttrComponent: {"envelope", "pgstore"},
	telemetry.AttrOutcome: {"ok", "decrypt_failed", "key_not_found", "access_denied", "key_disabled", "unavailable",
		"invalid_ciphertext", "canceled", "deadline_exceeded", "closed", "error"},
}

func checkAttrs(t *testing.T, where string, attrs []attribute.KeyValue) {
	t.Helper()
	for _, a := range attrs {
		if !slices.Contains(allowedAttrs[a.Key], a.Value.String()) {
			t.Errorf("%s: attribute %s=%q outside the allowed set", where, a.Key, a.Value.String())
		}
	}
}

func TestEnvelopeMetricsAndSpans(t *testing.T) {
	ctx := context.Background()
	r := newRecorder(t)
	kek, err := local.Generate("tel")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := envelope.New(r.tel.WrapProvider(kek), envelope.WithMaxMessages(2))
	if err != nil {
		t.Fatal(err)
	}
	env, err := r.tel.Envelope(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()

	aad := []byte("project=p1,name=n1")
	var blobs [][]byte
	for range 3 { // budget 2: two DEKs, two wraps
		b, err := env.Encrypt(ctx, []byte("value"), aad)
		if err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, b)
	}
	for _, b := range [][]byte{blobs[0], blobs[0], blobs[2]} { // miss, hit, miss
		if _, err := env.Decrypt(ctx, b, aad); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := env.Decrypt(ctx, blobs[0], []byte("other")); !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("Decrypt with wrong aad: %v, want ErrDecrypt", err)
	}
	// A blob whose DEK another key wrapped: the unwrap fails in the provider.
	other, err := local.Generate("tel")
	if err != nil {
		t.Fatal(err)
	}
	oe, err := envelope.New(other)
	if err != nil {
		t.Fatal(err)
	}
	defer oe.Close()
	foreign, err := oe.Encrypt(ctx, []byte("value"), aad)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.Decrypt(ctx, foreign, aad); !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("Decrypt of a foreign blob: %v, want ErrDecrypt", err)
	}

	got := r.collect(t)
	for name, pts := range got {
		for _, p := range pts {
			if p.attrs == "" {
				t.Errorf("%s has a data point without attributes", name)
			}
		}
	}
	const enc, dec = "keybroker.operation=encrypt", "keybroker.operation=decrypt"
	if v := value(t, got, telemetry.MetricOperations, enc+",keybroker.outcome=ok"); v != 3 {
		t.Errorf("encrypt ok = %v, want 3", v)
	}
	if v := value(t, got, telemetry.MetricOperations, dec+",keybroker.outcome=ok"); v != 3 {
		t.Errorf("decrypt ok = %v, want 3", v)
	}
	if v := value(t, got, telemetry.MetricOperations, dec+",keybroker.outcome=decrypt_failed"); v != 2 {
		t.Errorf("decrypt failed = %v, want 2", v)
	}
	if v := value(t, got, telemetry.MetricOperationTime, enc+",keybroker.outcome=ok"); v != 3 {
		t.Errorf("encrypt durations = %v, want 3", v)
	}
	const kms = "keybroker.backend=local,"
	if v := value(t, got, telemetry.MetricKMSCalls, kms+"keybroker.operation=wrap,keybroker.outcome=ok"); v != 2 {
		t.Errorf("wraps = %v, want 2", v)
	}
	if v := value(t, got, telemetry.MetricKMSCalls, kms+"keybroker.operation=unwrap,keybroker.outcome=ok"); v != 2 {
		t.Errorf("unwraps = %v, want 2", v)
	}
	if v := value(t, got, telemetry.MetricKMSCalls, kms+"keybroker.operation=unwrap,keybroker.outcome=invalid_ciphertext"); v != 1 {
		t.Errorf("failed unwraps = %v, want 1", v)
	}
	if v := value(t, got, telemetry.MetricKMSTime, kms+"keybroker.operation=wrap,keybroker.outcome=ok"); v != 2 {
		t.Errorf("wrap durations = %v, want 2", v)
	}
	const comp = "keybroker.component=envelope"
	// Misses: blobs[0], blobs[2], and the foreign blob (whose load failed).
	for name, want := range map[string]float64{
		telemetry.MetricCacheHits: 2, telemetry.MetricCacheMisses: 3, telemetry.MetricCacheEvictions: 0,
		telemetry.MetricCacheEntries: 2, telemetry.MetricBudgetUsed: 1, telemetry.MetricBudgetLimit: 2,
	} {
		if v := value(t, got, name, comp); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}

	spans := r.spans.Ended()
	names := map[string]int{}
	byID := map[string]string{}
	for _, s := range spans {
		names[s.Name()]++
		byID[s.SpanContext().SpanID().String()] = s.Name()
		checkAttrs(t, "span "+s.Name(), s.Attributes())
		if len(s.Events()) != 0 {
			t.Errorf("span %s has events %v; errors are recorded as outcomes only", s.Name(), s.Events())
		}
	}
	want := map[string]int{"keybroker.encrypt": 3, "keybroker.decrypt": 5, "keybroker.kms.wrap": 2, "keybroker.kms.unwrap": 3}
	for n, c := range want {
		if names[n] != c {
			t.Errorf("%d %s spans, want %d (all: %v)", names[n], n, c, names)
		}
	}
	for _, s := range spans {
		if s.Name() == "keybroker.kms.wrap" && byID[s.Parent().SpanID().String()] != "keybroker.encrypt" {
			t.Errorf("kms.wrap span's parent is %q, want keybroker.encrypt", byID[s.Parent().SpanID().String()])
		}
		if s.Name() == "keybroker.kms.unwrap" {
			if s.SpanKind().String() != "client" {
				t.Errorf("kms.unwrap span kind %v, want client", s.SpanKind())
			}
		}
	}

	var rm metricdata.ResourceMetrics
	if err := r.reader.Collect(ctx, &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					checkAttrs(t, m.Name, p.Attributes.ToSlice())
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					checkAttrs(t, m.Name, p.Attributes.ToSlice())
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					checkAttrs(t, m.Name, p.Attributes.ToSlice())
				}
			}
		}
	}
}

func TestKeyServiceOperations(t *testing.T) {
	ctx := context.Background()
	r := newRecorder(t)
	kek, err := local.Generate("tel")
	if err != nil {
		t.Fatal(err)
	}
	kr, err := r.tel.Keyring(kek)
	if err != nil {
		t.Fatal(err)
	}
	p := kr.Primary()
	if p.Ref() != kek.Ref() {
		t.Fatalf("wrapped Ref %v, want %v", p.Ref(), kek.Ref())
	}
	dek := make([]byte, 32)
	wk, err := kr.Wrap(ctx, dek, nil)
	if err != nil {
		t.Fatal(err)
	}
	v2, err := p.(provider.Rotator).Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The keyring rewraps inside the provider because the wrapper still
	// is a Rewrapper.
	if _, err := kr.Rewrap(ctx, wk, nil); err != nil {
		t.Fatal(err)
	}
	st, err := p.(provider.Describer).Describe(ctx)
	if err != nil || st.PrimaryVersion != v2 {
		t.Fatalf("Describe = %+v, %v; want primary %s", st, err, v2)
	}
	if err := p.(provider.Retirer).Retire(ctx, wk.Version); err != nil {
		t.Fatal(err)
	}
	if _, err := kr.Unwrap(ctx, wk, nil); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("Unwrap under a retired version: %v, want ErrKeyNotFound", err)
	}
	got := r.collect(t)
	for _, c := range []string{"wrap,keybroker.outcome=ok", "rotate,keybroker.outcome=ok", "rewrap,keybroker.outcome=ok",
		"describe,keybroker.outcome=ok", "retire,keybroker.outcome=ok", "unwrap,keybroker.outcome=key_not_found"} {
		if v := value(t, got, telemetry.MetricKMSCalls, "keybroker.backend=local,keybroker.operation="+c); v != 1 {
			t.Errorf("kms calls %s = %v, want 1", c, v)
		}
	}
	for _, s := range r.spans.Ended() {
		checkAttrs(t, "span "+s.Name(), s.Attributes())
		if s.Name() == "keybroker.kms.unwrap" && (s.Status().Code.String() != "Error" || s.Status().Description != "key_not_found") {
			t.Errorf("failed unwrap span status %+v, want Error key_not_found", s.Status())
		}
	}
}

// partial exposes only the interfaces it embeds, with a real provider
// behind each.
type (
	bare          struct{ provider.KEKProvider }
	describerOnly struct {
		provider.KEKProvider
		provider.Describer
	}
	rewrapRetire struct {
		provider.KEKProvider
		provider.Rewrapper
		provider.Retirer
	}
)

func TestWrapProviderKeepsExactlyTheOptionalInterfaces(t *testing.T) {
	tel, err := telemetry.New()
	if err != nil {
		t.Fatal(err)
	}
	kek, err := local.Generate("tel")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []provider.KEKProvider{kek, bare{kek}, describerOnly{kek, kek}, rewrapRetire{kek, kek, kek}} {
		w := tel.WrapProvider(p)
		_, rot := p.(provider.Rotator)
		_, rw := p.(provider.Rewrapper)
		_, d := p.(provider.Describer)
		_, ret := p.(provider.Retirer)
		_, wrot := w.(provider.Rotator)
		_, wrw := w.(provider.Rewrapper)
		_, wd := w.(provider.Describer)
		_, wret := w.(provider.Retirer)
		if [4]bool{rot, rw, d, ret} != [4]bool{wrot, wrw, wd, wret} {
			t.Errorf("%T: wrapped has Rotator, Rewrapper, Describer, Retirer = %v, want %v", p, [4]bool{wrot, wrw, wd, wret}, [4]bool{rot, rw, d, ret})
		}
		if w.Ref() != p.Ref() {
			t.Errorf("%T: Ref %v, want %v", p, w.Ref(), p.Ref())
		}
	}
}

func TestCacheAndProgress(t *testing.T) {
	ctx := context.Background()
	r := newRecorder(t)
	c := envelope.NewKeyCache(1, 0)
	defer c.Close()
	kek, err := local.Generate("tel")
	if err != nil {
		t.Fatal(err)
	}
	reg, err := r.tel.ObserveCache("pgstore", c.Stats)
	if err != nil {
		t.Fatal(err)
	}
	load := func(ctx context.Context) (*envelope.DataKey, error) {
		k, _, err := envelope.NewDataKey(ctx, kek, nil)
		return k, err
	}
	for _, id := range []string{"a", "a", "b"} { // miss, hit, miss evicting a
		_, release, err := c.Get(ctx, id, load)
		if err != nil {
			t.Fatal(err)
		}
		release()
	}
	rec := r.tel.Progress("rewrap")
	rec(ctx, 1000, 2500)
	rec(ctx, 2000, 2500)
	got := r.collect(t)
	for name, want := range map[string]float64{telemetry.MetricCacheHits: 1, telemetry.MetricCacheMisses: 2,
		telemetry.MetricCacheEvictions: 1, telemetry.MetricCacheEntries: 1} {
		if v := value(t, got, name, "keybroker.component=pgstore"); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}
	if v := value(t, got, telemetry.MetricProgressDone, "keybroker.operation=rewrap"); v != 2000 {
		t.Errorf("progress done = %v, want 2000", v)
	}
	if v := value(t, got, telemetry.MetricProgressTotal, "keybroker.operation=rewrap"); v != 2500 {
		t.Errorf("progress total = %v, want 2500", v)
	}
	if err := reg.Unregister(); err != nil {
		t.Fatal(err)
	}
	if got := r.collect(t); len(got[telemetry.MetricCacheHits]) != 0 {
		t.Errorf("cache still observed after Unregister: %v", got[telemetry.MetricCacheHits])
	}
}
