package leaktest

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/health"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	_ "github.com/profullstack/keybroker/provider/awskms"
	"github.com/profullstack/keybroker/provider/gcpkms/kmstest"
	"github.com/profullstack/keybroker/provider/local"
	_ "github.com/profullstack/keybroker/provider/vault"
	"github.com/profullstack/keybroker/telemetry"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// The sentinels. Each is distinctive enough that any appearance is a leak.
var (
	sentinelPlaintext = []byte("kb-sentinel-plaintext-9f1c2e7a")
	sentinelKey       = []byte("KBSENTINELKEY-0123456789abcdefgh") // 32 bytes: a KEK version's key
	sentinelToken     = "kb-sentinel-token-5d2a77"                 // credentials in URLs and the environment
	sentinelProject   = "kb-sentinel-project-31"                   // must not reach telemetry (it may name errors)
)

// forms returns the ways b could be printed: raw, hex, base64 at the
// three byte alignments (so an embedded copy is found too), and Go's %v
// and %q of a byte slice.
func forms(b []byte) []string {
	f := []string{string(b), hex.EncodeToString(b), strings.ToUpper(hex.EncodeToString(b)),
		fmt.Sprint(b), fmt.Sprintf("%q", b)[1 : len(b)+1]}
	for pad := range 3 {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
			s := enc.EncodeToString(append(make([]byte, pad), b...))
			// Skip the characters the padding bytes influence and the tail.
			f = append(f, s[4:len(s)-4])
		}
	}
	return f
}

// capture collects every text an operation exposes.
type capture struct {
	mu    sync.Mutex
	texts []string // "where: text"
}

func (c *capture) add(where, text string) {
	c.mu.Lock()
	c.texts = append(c.texts, where+": "+text)
	c.mu.Unlock()
}

// slogHandler renders every record, at every level, with all attributes.
type slogHandler struct {
	c      *capture
	attrs  []slog.Attr
	groups string
}

func (h *slogHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *slogHandler) Handle(_ context.Context, r slog.Record) error {
	var b bytes.Buffer
	jh := slog.NewJSONHandler(&b, &slog.HandlerOptions{Level: slog.LevelDebug})
	r2 := r.Clone()
	r2.AddAttrs(h.attrs...)
	jh.Handle(context.Background(), r2)
	h.c.add("log", h.groups+b.String())
	return nil
}
func (h *slogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &slogHandler{c: h.c, attrs: append(append([]slog.Attr(nil), h.attrs...), as...), groups: h.groups}
}
func (h *slogHandler) WithGroup(name string) slog.Handler {
	return &slogHandler{c: h.c, attrs: h.attrs, groups: h.groups + name + "."}
}

type leakEnv struct {
	t       *testing.T
	ctx     context.Context
	c       *capture
	tel     *telemetry.Telemetry
	reader  *sdkmetric.ManualReader
	spans   *tracetest.SpanRecorder
	logger  *slog.Logger
	outputs int // operations run
}

// op runs f, recording its error (both verbs) or panic.
func (e *leakEnv) op(name string, f func() error) {
	e.t.Helper()
	e.outputs++
	defer func() {
		if r := recover(); r != nil {
			e.t.Errorf("%s panicked", name)
			e.c.add("panic in "+name, fmt.Sprint(r))
		}
	}()
	if err := f(); err != nil {
		e.c.add("error of "+name, err.Error())
		e.c.add("error of "+name+" (%+v)", fmt.Sprintf("%+v", err))
	}
}

// mustFail is op for an operation that must fail.
func (e *leakEnv) mustFail(name string, f func() error) {
	e.t.Helper()
	failed := false
	e.op(name, func() error { err := f(); failed = err != nil; return err })
	if !failed {
		e.t.Errorf("%s succeeded, want an error", name)
	}
}

func writeKeyring(t *testing.T, key []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keyring.json")
	js := fmt.Sprintf(`{"id":"leak","primary":1,"keys":[{"version":1,"key":%q}]}`, base64.StdEncoding.EncodeToString(key))
	if err := os.WriteFile(path, []byte(js), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestNoSecretLeaks(t *testing.T) {
	c := &capture{}
	reader := sdkmetric.NewManualReader()
	spans := tracetest.NewSpanRecorder()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	tel, err := telemetry.New(telemetry.WithMeterProvider(mp), telemetry.WithTracerProvider(tp))
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(&slogHandler{c: c})
	prev := slog.Default()
	slog.SetDefault(logger)
	t.Cleanup(func() { slog.SetDefault(prev) })
	t.Setenv("VAULT_TOKEN", sentinelToken)
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIA"+strings.ToUpper(hex.EncodeToString([]byte("leak")))) // not secret
	t.Setenv("AWS_SECRET_ACCESS_KEY", sentinelToken)
	t.Setenv("AWS_REGION", "us-east-1")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")

	e := &leakEnv{t: t, ctx: context.Background(), c: c, tel: tel, reader: reader, spans: spans, logger: logger}
	e.envelopeOps()
	e.providerOps()
	e.unreachableOps()
	e.storeOps()

	// Everything the test provider produced.
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(e.ctx, &rm); err != nil {
		t.Fatal(err)
	}
	var attrSets []attribute.Set
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					attrSets = append(attrSets, p.Attributes)
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					attrSets = append(attrSets, p.Attributes)
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					attrSets = append(attrSets, p.Attributes)
				}
			}
		}
	}
	var telemetryTexts []string
	for _, s := range attrSets {
		telemetryTexts = append(telemetryTexts, "metric attributes: "+s.Encoded(attribute.DefaultEncoder()))
	}
	for _, s := range spans.Ended() {
		var b strings.Builder
		fmt.Fprintf(&b, "%s status=%v %q", s.Name(), s.Status().Code, s.Status().Description)
		for _, a := range s.Attributes() {
			fmt.Fprintf(&b, " %s=%s", a.Key, a.Value.String())
		}
		for _, ev := range s.Events() {
			fmt.Fprintf(&b, " event %s", ev.Name)
			for _, a := range ev.Attributes {
				fmt.Fprintf(&b, " %s=%s", a.Key, a.Value.String())
			}
		}
		telemetryTexts = append(telemetryTexts, "span: "+b.String())
	}
	logs := 0
	for _, text := range c.texts {
		if strings.HasPrefix(text, "log: ") {
			logs++
		}
	}
	if logs == 0 || len(attrSets) == 0 || len(spans.Ended()) == 0 {
		t.Fatalf("nothing captured (%d log records, %d metric points, %d spans): the check would be empty", logs, len(attrSets), len(spans.Ended()))
	}

	// The matcher finds what it must.
	for _, b := range [][]byte{sentinelKey, sentinelPlaintext} {
		for _, probe := range []string{fmt.Sprintf("x%xy", b), "k=" + base64.StdEncoding.EncodeToString(append([]byte{7}, b...)), fmt.Sprintf("%v", b)} {
			if !leaks(probe, b) {
				t.Fatalf("matcher misses %q", probe)
			}
		}
	}

	secrets := map[string][]byte{"plaintext": sentinelPlaintext, "key": sentinelKey, "token": []byte(sentinelToken)}
	for _, text := range c.texts {
		for what, b := range secrets {
			if leaks(text, b) {
				t.Errorf("sentinel %s leaked in %s", what, text)
			}
		}
	}
	secrets["project"] = []byte(sentinelProject)
	for _, text := range telemetryTexts {
		for what, b := range secrets {
			if leaks(text, b) {
				t.Errorf("sentinel %s leaked in %s", what, text)
			}
		}
	}
	t.Logf("%d operations; %d texts (errors, panics, %d log records), %d metric attribute sets, %d spans checked",
		e.outputs, len(c.texts), logs, len(attrSets), len(spans.Ended()))
}

func leaks(text string, b []byte) bool {
	for _, f := range forms(b) {
		if strings.Contains(text, f) {
			return true
		}
	}
	return false
}

func (e *leakEnv) envelopeOps() {
	t, ctx := e.t, e.ctx
	kek, err := local.OpenFile(writeKeyring(t, sentinelKey))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := envelope.New(e.tel.WrapProvider(kek))
	if err != nil {
		t.Fatal(err)
	}
	env, err := e.tel.Envelope(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	aad := []byte("project=" + sentinelProject)
	blob, err := env.Encrypt(ctx, sentinelPlaintext, aad)
	if err != nil {
		t.Fatal(err)
	}
	got, err := env.Decrypt(ctx, blob, aad)
	if err != nil || !bytes.Equal(got, sentinelPlaintext) {
		t.Fatalf("round trip: %v", err)
	}
	e.mustFail("decrypt, wrong aad", func() error { _, err := env.Decrypt(ctx, blob, sentinelPlaintext); return err })
	corrupt := bytes.Clone(blob)
	corrupt[len(corrupt)-1] ^= 1
	e.mustFail("decrypt, corrupt tag", func() error { _, err := env.Decrypt(ctx, corrupt, aad); return err })
	e.mustFail("decrypt, truncated", func() error { _, err := env.Decrypt(ctx, blob[:len(blob)/2], aad); return err })
	e.mustFail("decrypt, trailing sentinel", func() error {
		_, err := env.Decrypt(ctx, append(bytes.Clone(blob), sentinelPlaintext...), aad)
		return err
	})
	e.mustFail("decrypt, plaintext as blob", func() error { _, err := env.Decrypt(ctx, sentinelPlaintext, aad); return err })
	e.mustFail("parse header, key as blob", func() error { _, err := envelope.ParseHeader(sentinelKey); return err })
	e.mustFail("encrypt, oversized aad", func() error {
		_, err := env.Encrypt(ctx, sentinelPlaintext, bytes.Repeat(sentinelPlaintext, envelope.MaxAADLen/len(sentinelPlaintext)+1))
		return err
	})

	// Wrong key: a keyring with the same id and version but other bytes.
	other, err := local.Generate("leak")
	if err != nil {
		t.Fatal(err)
	}
	oenv, err := envelope.New(e.tel.WrapProvider(other))
	if err != nil {
		t.Fatal(err)
	}
	defer oenv.Close()
	e.mustFail("decrypt, wrong key", func() error { _, err := oenv.Decrypt(ctx, blob, aad); return err })

	// External-DEK mode.
	dk, wk, err := envelope.NewDataKey(ctx, e.tel.WrapProvider(kek), aad)
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := envelope.SealWithKeyID(dk, []byte("id-1"), sentinelPlaintext, aad)
	if err != nil {
		t.Fatal(err)
	}
	dk2, err := envelope.UnwrapDataKey(ctx, e.tel.WrapProvider(other), wk, aad)
	if err == nil {
		dk2.Destroy()
		t.Error("UnwrapDataKey with the wrong key succeeded")
	} else {
		e.c.add("error of unwrap data key, wrong key", err.Error())
	}
	e.mustFail("open with key, wrong aad", func() error { _, err := envelope.OpenWithKey(dk, sealed, nil); return err })
	dk.Destroy()
	e.mustFail("open with key, destroyed", func() error { _, err := envelope.OpenWithKey(dk, sealed, aad); return err })
	e.mustFail("seal with key, destroyed", func() error {
		_, err := envelope.SealWithKeyID(dk, []byte("id-1"), sentinelPlaintext, aad)
		return err
	})
}

func (e *leakEnv) providerOps() {
	t, ctx := e.t, e.ctx
	kek, err := local.OpenFile(writeKeyring(t, sentinelKey))
	if err != nil {
		t.Fatal(err)
	}
	p := e.tel.WrapProvider(kek)
	e.mustFail("wrap, DEK too long", func() error {
		_, err := p.Wrap(ctx, bytes.Repeat(sentinelKey, 3), nil)
		return err
	})
	e.mustFail("unwrap, sentinel ciphertext", func() error {
		_, err := p.Unwrap(ctx, &provider.WrappedKey{Provider: "local", KeyID: "leak", Version: "1", Ciphertext: sentinelPlaintext}, nil)
		return err
	})
	e.mustFail("unwrap, key as version", func() error {
		_, err := p.Unwrap(ctx, &provider.WrappedKey{Provider: "local", KeyID: "leak", Version: string(sentinelKey), Ciphertext: []byte{1}}, nil)
		return err
	})
	wk, err := p.Wrap(ctx, sentinelKey, sentinelPlaintext)
	if err != nil {
		t.Fatal(err)
	}
	e.mustFail("unwrap, wrong aad", func() error { _, err := p.Unwrap(ctx, wk, []byte("other")); return err })
	e.mustFail("retire primary", func() error { return p.(provider.Retirer).Retire(ctx, "1") })
	e.mustFail("retire, key as version", func() error { return p.(provider.Retirer).Retire(ctx, string(sentinelKey)) })

	// Bad keyrings.
	e.mustFail("keyring, 31-byte key", func() error { _, err := local.OpenFile(writeKeyring(t, sentinelKey[:31])); return err })
	bad := filepath.Join(t.TempDir(), "bad.json")
	os.WriteFile(bad, []byte(`{"id":"leak","primary":1,"keys":[{"version":1,"key":"`+string(sentinelKey)+`!"}]}`), 0o600)
	e.mustFail("keyring, key not base64", func() error { _, err := local.OpenFile(bad); return err })
	os.WriteFile(bad, []byte(`{"id":"leak","primary":1,"keys":[{"version":1,"key":"`+base64.StdEncoding.EncodeToString(sentinelKey)+`"}], "extra": "`+sentinelToken+`"`), 0o600)
	e.mustFail("keyring, truncated JSON", func() error { _, err := local.OpenFile(bad); return err })
	t.Setenv("KB_LEAK_KEYRING", base64.StdEncoding.EncodeToString(append([]byte(`{"id":`), sentinelKey...)))
	e.mustFail("keyring from env, malformed", func() error { _, err := local.FromEnv("KB_LEAK_KEYRING"); return err })

	// Bad URLs, each carrying the token somewhere.
	tok := sentinelToken
	for _, u := range []string{
		"vault://transit/keys/k?token=" + tok,
		"vault://u:" + tok + "@transit/keys/k",
		"vault://transit/keys/k?addr=http://u:" + tok + "@127.0.0.1:1",
		"vault://transit/keys/k?role_id=x&secret_id=" + tok,
		"awskms://alias/k?region=us-east-1&secret=" + tok,
		"awskms://u:" + tok + "@alias/k",
		"awskms://alias/k?region=us-east-1&endpoint=http://u:" + tok + "@[::1",
		"gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k?credentials=" + tok,
		"gcpkms://projects/p?endpoint=" + tok + "&insecure=true",
		// A credential pasted as a bare query arrives as a parameter name.
		"vault://transit/keys/k?" + tok,
		"awskms://alias/k?region=us-east-1&" + tok,
		"gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k?" + tok,
		"local:///etc/keyring.json?key=" + tok,
		"local://env/" + tok + "-not-a-var",
		"nosuch://" + tok,
		tok,
		"vault://%zz" + tok,
		"local://" + string(sentinelKey) + "/\x00",
	} {
		e.mustFail("open URL", func() error {
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			p, err := provider.Open(ctx, u)
			if err == nil {
				_, err = p.Wrap(ctx, sentinelKey, nil)
			}
			return err
		})
	}
}

// unreachableOps runs wrap, unwrap and describe against key services that
// do not answer: a Vault and an AWS KMS address nothing listens on, and a
// Cloud KMS server that is stopped.
func (e *leakEnv) unreachableOps() {
	t := e.t
	srv, err := kmstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	gcpAddr := srv.Addr()
	srv.Close()
	for _, u := range []string{
		"vault://transit/keys/k?addr=http://" + closedAddr(t) + "&timeout=2s&max_retries=0",
		"awskms://alias/k?region=us-east-1&endpoint=http://" + closedAddr(t) + "&timeout=2s&max_attempts=1",
		"gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k?endpoint=" + gcpAddr + "&insecure=true",
	} {
		ctx, cancel := context.WithTimeout(e.ctx, 3*time.Second)
		raw, err := provider.Open(ctx, u)
		if err != nil {
			e.c.add("error of open unreachable", err.Error())
			cancel()
			continue
		}
		p := e.tel.WrapProvider(raw)
		e.mustFail("wrap, unreachable", func() error { _, err := p.Wrap(ctx, sentinelKey, sentinelPlaintext); return err })
		e.mustFail("unwrap, unreachable", func() error {
			_, err := p.Unwrap(ctx, &provider.WrappedKey{Provider: p.Ref().Provider, KeyID: p.Ref().KeyID, Version: "1", Ciphertext: sentinelKey}, sentinelPlaintext)
			return err
		})
		if d, ok := p.(provider.Describer); ok {
			e.mustFail("describe, unreachable", func() error { _, err := d.Describe(ctx); return err })
		}
		env, err := envelope.New(p)
		if err != nil {
			t.Fatal(err)
		}
		e.mustFail("encrypt, unreachable", func() error { _, err := env.Encrypt(ctx, sentinelPlaintext, nil); return err })
		env.Close()
		hc, err := health.New(health.Config{KEK: p, Timeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		e.op("health, unreachable", func() error {
			r, err := hc.Check(ctx)
			if err == nil {
				e.c.add("health report", fmt.Sprintf("%+v", *r))
				if r.Status == health.OK {
					t.Errorf("health of %s reports ok", p.Ref().Provider)
				}
			}
			return err
		})
		if c, ok := raw.(interface{ Close() error }); ok {
			c.Close()
		}
		cancel()
	}
}

func (e *leakEnv) storeOps() {
	t, ctx := e.t, e.ctx
	pool := pgtest.Pool(t)
	if err := pgstore.Migrate(ctx, pool, pgstore.DefaultSchema); err != nil {
		t.Fatal(err)
	}
	kek, err := local.OpenFile(writeKeyring(t, sentinelKey))
	if err != nil {
		t.Fatal(err)
	}
	kr, err := e.tel.Keyring(kek)
	if err != nil {
		t.Fatal(err)
	}
	st, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kr, Logger: e.logger, Actor: "leaktest", Budget: 2, ReserveChunk: 1,
		Observer: e.tel.StoreObserver()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	reg, err := e.tel.ObserveCache("pgstore", st.CacheStats)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Unregister()
	for _, name := range []string{"a", "b", "c"} { // budget 2: two data keys
		if err := st.Put(ctx, sentinelProject, name, sentinelPlaintext); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := st.Get(ctx, sentinelProject, "a"); err != nil || !bytes.Equal(got, sentinelPlaintext) {
		t.Fatalf("Get: %v", err)
	}
	e.mustFail("put, oversized value", func() error {
		return st.Put(ctx, sentinelProject, "big", bytes.Repeat(sentinelPlaintext, pgstore.MaxValueLen/len(sentinelPlaintext)+1))
	})
	e.mustFail("get, missing", func() error { _, err := st.Get(ctx, sentinelProject, "missing"); return err })

	// A corrupt row.
	if _, err := pool.Exec(ctx, `UPDATE keybroker.encrypted_secrets SET encrypted_data = set_byte(encrypted_data, length(encrypted_data) - 1, get_byte(encrypted_data, length(encrypted_data) - 1) # 1) WHERE name = 'b'`); err != nil {
		t.Fatal(err)
	}
	e.mustFail("get, corrupt row", func() error { _, err := st.Get(ctx, sentinelProject, "b"); return err })
	if _, err := pool.Exec(ctx, `UPDATE keybroker.encrypted_secrets SET encrypted_data = $1 WHERE name = 'b'`, sentinelPlaintext); err != nil {
		t.Fatal(err)
	}
	e.mustFail("get, plaintext in the row", func() error { _, err := st.Get(ctx, sentinelProject, "b"); return err })
	if _, err := pool.Exec(ctx, `DELETE FROM keybroker.encrypted_secrets WHERE name = 'b'`); err != nil {
		t.Fatal(err)
	}

	// The wrong key: a store whose keyring has the same id, other bytes.
	other, err := local.Generate("leak")
	if err != nil {
		t.Fatal(err)
	}
	wrong, err := pgstore.New(ctx, pool, pgstore.Config{KEK: e.tel.WrapProvider(other), Logger: e.logger})
	if err != nil {
		t.Fatal(err)
	}
	e.mustFail("get, wrong key", func() error { _, err := wrong.Get(ctx, sentinelProject, "a"); return err })
	e.op("rewrap, wrong key", func() error { _, err := wrong.Rewrap(ctx, pgstore.RewrapOptions{}); return err })
	wrong.Close()

	// Key management.
	rec := e.tel.Progress("rewrap")
	e.op("rotate", func() error { _, err := st.RotateKEK(ctx); return err })
	e.op("rewrap", func() error {
		_, err := st.Rewrap(ctx, pgstore.RewrapOptions{Progress: func(p pgstore.RewrapProgress) { rec(ctx, p.Done, p.Total) }})
		return err
	})
	e.op("reencrypt", func() error { _, err := st.Reencrypt(ctx, sentinelProject, pgstore.ReencryptOptions{}); return err })
	e.op("retire", func() error {
		return st.RetireKEK(ctx, pgstore.KEKVersion{Provider: "local", KeyID: "leak", Version: "1"})
	})
	e.op("list", func() error { _, err := st.List(ctx, sentinelProject); return err })
	e.op("status", func() error { _, err := st.Status(ctx); return err })
	hc, err := health.New(health.Config{Store: st, CacheStats: st.CacheStats})
	if err != nil {
		t.Fatal(err)
	}
	e.op("health", func() error {
		r, err := hc.Check(ctx)
		if err == nil {
			e.c.add("health report", fmt.Sprintf("%+v %+v", *r, *r.Store))
		}
		return err
	})

	// Plaintext migration, including a row that fails validation.
	if _, err := pool.Exec(ctx, `CREATE TABLE legacy (id bigint PRIMARY KEY, project text, name text, value bytea)`); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO legacy VALUES (1, $1, 'm1', $2), (2, $1, 'm2', $2)`, sentinelProject, sentinelPlaintext); err != nil {
		t.Fatal(err)
	}
	src := pgstore.PlaintextSource{Table: "public.legacy", KeyColumn: "id", ProjectColumn: "project", NameColumn: "name", ValueColumn: "value"}
	e.op("migrate plaintext", func() error {
		_, err := st.MigratePlaintext(ctx, src, pgstore.MigrateOptions{ClearPlaintext: true})
		return err
	})
	if _, err := pool.Exec(ctx, `INSERT INTO legacy VALUES (3, NULL, 'm3', $1)`, sentinelPlaintext); err != nil {
		t.Fatal(err)
	}
	e.mustFail("migrate plaintext, row without project", func() error {
		_, err := st.MigratePlaintext(ctx, src, pgstore.MigrateOptions{})
		return err
	})
	e.mustFail("migrate plaintext, bad column", func() error {
		s := src
		s.ValueColumn = "no_such_column"
		_, err := st.MigratePlaintext(ctx, s, pgstore.MigrateOptions{})
		return err
	})

	// The database goes away mid-use.
	pool.Close()
	e.mustFail("put, closed pool", func() error { return st.Put(ctx, sentinelProject, "d", sentinelPlaintext) })
	e.mustFail("get, closed pool", func() error { _, err := st.Get(ctx, sentinelProject, "c"); return err })
}
