package health_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/health"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/gcpkms"
	"github.com/profullstack/keybroker/provider/gcpkms/kmstest"
	"github.com/profullstack/keybroker/provider/local"
	"github.com/profullstack/keybroker/telemetry"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// gcpKey starts the in-process Cloud KMS server with one key and returns
// the server and a provider for the key.
func gcpKey(t *testing.T) (*kmstest.Server, *gcpkms.Provider) {
	t.Helper()
	ctx := context.Background()
	srv, err := kmstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	name, err := srv.NewKey("r", "kek")
	if err != nil {
		t.Fatal(err)
	}
	p, err := gcpkms.Open(ctx, name, srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return srv, p
}

func serve(t *testing.T, c *health.Checker) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	c.ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
	return rec.Code, rec.Body.String()
}

// The key service stops: encryption and cached decryption go on, the
// report says degraded (HTTP 200), and calls that need the service fail
// within their ctx instead of hanging.
func TestKeyServiceStopped(t *testing.T) {
	ctx := context.Background()
	srv, kek := gcpKey(t)
	env, err := envelope.New(kek)
	if err != nil {
		t.Fatal(err)
	}
	defer env.Close()
	aad := []byte("project=1")
	blob, err := env.Encrypt(ctx, []byte("value"), aad)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.Decrypt(ctx, blob, aad); err != nil {
		t.Fatal(err)
	}
	c, err := health.New(health.Config{KEK: kek, TTL: -1, Timeout: 2 * time.Second,
		CacheStats: func() envelope.CacheStats { return env.Stats().Cache }})
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != health.OK || !r.Providers[0].Reachable || r.Providers[0].PrimaryVersion != "1" || r.Providers[0].Check != "describe" {
		t.Fatalf("before the stop: %+v, want ok, reachable, version 1 by describe", r)
	}

	srv.Close()

	if _, err := env.Encrypt(ctx, []byte("value 2"), aad); err != nil {
		t.Fatalf("Encrypt with a cached DEK after the key service stopped: %v", err)
	}
	if _, err := env.Decrypt(ctx, blob, aad); err != nil {
		t.Fatalf("Decrypt with a cached DEK after the key service stopped: %v", err)
	}
	r, err = c.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p := r.Providers[0]
	if r.Status != health.Degraded || p.Reachable || (p.Outcome != "unavailable" && p.Outcome != "deadline_exceeded") {
		t.Fatalf("after the stop: status %s, provider %+v; want degraded, unreachable, unavailable or deadline_exceeded", r.Status, p)
	}
	if p.PrimaryVersion != "1" || r.CachedDataKeys == nil || *r.CachedDataKeys != 1 {
		t.Errorf("after the stop: version %q, cached keys %v; want the last known version 1 and 1 cached key", p.PrimaryVersion, r.CachedDataKeys)
	}
	if !strings.Contains(r.Detail, "cached data keys") {
		t.Errorf("detail %q does not say encryption continues on cached data keys", r.Detail)
	}
	code, body := serve(t, c)
	if code != http.StatusOK || !strings.Contains(body, `"status":"degraded"`) {
		t.Errorf("readiness while degraded: %d %s; want 200 with status degraded", code, body)
	}
	if strings.Contains(body, "projects/") || strings.Contains(body, "kek") {
		t.Errorf("readiness JSON names the key: %s", body)
	}

	// What needs the key service fails, within the caller's deadline.
	fresh, err := envelope.New(kek)
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	tctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := fresh.Decrypt(tctx, blob, aad); errors.Is(err, envelope.ErrDecrypt) || err == nil ||
		!(errors.Is(err, provider.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded)) {
		t.Errorf("Decrypt needing the stopped service: %v; want unavailable or deadline, not ErrDecrypt", err)
	}
	if _, err := fresh.Encrypt(tctx, []byte("v"), aad); err == nil {
		t.Error("Encrypt needing a new DEK succeeded with the key service stopped")
	}
}

// kmsCalls counts the describe calls the telemetry decorator recorded.
func kmsCalls(t *testing.T, reader *sdkmetric.ManualReader, op string) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != telemetry.MetricKMSCalls {
				continue
			}
			for _, p := range m.Data.(metricdata.Sum[int64]).DataPoints {
				if v, _ := p.Attributes.Value(telemetry.AttrOperation); v == attribute.StringValue(op) {
					n += p.Value
				}
			}
		}
	}
	return n
}

func TestStoreCountsAndRateLimit(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.Pool(t)
	if err := pgstore.Migrate(ctx, pool, pgstore.DefaultSchema); err != nil {
		t.Fatal(err)
	}
	reader := sdkmetric.NewManualReader()
	tel, err := telemetry.New(telemetry.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := local.Generate("health")
	if err != nil {
		t.Fatal(err)
	}
	kr, err := tel.Keyring(raw)
	if err != nil {
		t.Fatal(err)
	}
	// DirectKEK: a KEK rotation leaves data keys to rewrap, which the
	// report counts. (TestStoreHierarchyToRewrap covers the default.)
	st, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kr, DirectKEK: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, s := range [][2]string{{"p1", "a"}, {"p1", "b"}, {"p2", "a"}} {
		if err := st.Put(ctx, s[0], s[1], []byte("v")); err != nil {
			t.Fatal(err)
		}
	}

	// Many probes at once within one TTL: one describe.
	c, err := health.New(health.Config{Store: st, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	before := kmsCalls(t, reader, "describe")
	var wg sync.WaitGroup
	reports := make([]*health.Report, 20)
	for i := range reports {
		wg.Go(func() {
			r, err := c.Check(ctx)
			if err != nil {
				t.Error(err)
			}
			reports[i] = r
		})
	}
	wg.Wait()
	if n := kmsCalls(t, reader, "describe") - before; n != 1 {
		t.Errorf("20 concurrent checks made %d describe calls, want 1", n)
	}
	r := reports[0]
	if r.Status != health.OK || r.Store == nil || *r.Store.DataKeys != 2 || *r.Store.Secrets != 3 ||
		r.Store.DataKeysToRewrap == nil || *r.Store.DataKeysToRewrap != 0 || *r.Store.SecretsToRewrap != 0 {
		t.Fatalf("report %+v, store %+v; want ok, 2 data keys, 3 secrets, nothing to rewrap", r, r.Store)
	}

	if _, err := st.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if again, _ := c.Check(ctx); again != r {
		t.Error("a check within the TTL did not reuse the report")
	}
	live, err := health.New(health.Config{Store: st, TTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	r, err = live.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if *r.Store.DataKeysToRewrap != 2 || *r.Store.SecretsToRewrap != 3 || r.Providers[0].PrimaryVersion != "2" {
		t.Fatalf("after rotation: store %+v, primary %q; want 2 data keys and 3 secrets to rewrap, version 2", r.Store, r.Providers[0].PrimaryVersion)
	}
	if _, err := st.Rewrap(ctx, pgstore.RewrapOptions{}); err != nil {
		t.Fatal(err)
	}
	if r, _ = live.Check(ctx); *r.Store.DataKeysToRewrap != 0 {
		t.Fatalf("after rewrap: %d data keys to rewrap, want 0", *r.Store.DataKeysToRewrap)
	}

	// The database goes away: down, 503.
	pool.Close()
	code, body := serve(t, live)
	var got health.Report
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatal(err)
	}
	if code != http.StatusServiceUnavailable || got.Status != health.Down || got.Store.Reachable {
		t.Fatalf("with the pool closed: %d %s; want 503, down, store unreachable", code, body)
	}
}

// A provider without Describe is checked by wrapping a throwaway key.
func TestWrapCheck(t *testing.T) {
	ctx := context.Background()
	kek, err := local.Generate("health")
	if err != nil {
		t.Fatal(err)
	}
	c, err := health.New(health.Config{KEK: struct{ provider.KEKProvider }{kek}, TTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p := r.Providers[0]; r.Status != health.OK || p.Check != "wrap" || p.PrimaryVersion != "1" {
		t.Fatalf("wrap check: %+v, want ok by wrap, version 1", r)
	}
	if _, err := health.New(health.Config{}); err == nil {
		t.Error("New with nothing to check succeeded")
	}
}

// The key service answers but refuses (IAM): down, 503.
func TestPrimaryRefused(t *testing.T) {
	srv, kek := gcpKey(t)
	srv.SetInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		return nil, status.Error(codes.PermissionDenied, "Permission 'cloudkms.cryptoKeys.get' denied")
	})
	c, err := health.New(health.Config{KEK: kek, TTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	code, body := serve(t, c)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, `"outcome":"access_denied"`) || !strings.Contains(body, `"status":"down"`) {
		t.Fatalf("refused primary: %d %s; want 503, down, access_denied", code, body)
	}
}

// With pgstore: the key service stops; Puts and Gets on a project whose
// data key is cached go on, a project that needs a new data key fails
// within its ctx, and the report is degraded with the database counts.
func TestStoreWithKeyServiceStopped(t *testing.T) {
	ctx := context.Background()
	srv, kek := gcpKey(t)
	pool := pgtest.Pool(t)
	if err := pgstore.Migrate(ctx, pool, pgstore.DefaultSchema); err != nil {
		t.Fatal(err)
	}
	// DirectKEK: a new data key needs the key service. (With the key
	// hierarchy it needs only the intermediate key this Store holds.)
	st, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek, DirectKEK: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.Put(ctx, "p1", "a", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	c, err := health.New(health.Config{Store: st, CacheStats: st.CacheStats, TTL: -1, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := c.Check(ctx); err != nil || r.Status != health.OK {
		t.Fatalf("before the stop: %+v, %v", r, err)
	}

	srv.Close()

	if err := st.Put(ctx, "p1", "b", []byte("v2")); err != nil {
		t.Fatalf("Put under the cached data key after the key service stopped: %v", err)
	}
	if v, err := st.Get(ctx, "p1", "a"); err != nil || string(v) != "v1" {
		t.Fatalf("Get under the cached data key after the key service stopped: %q, %v", v, err)
	}
	tctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := st.Put(tctx, "p2", "a", []byte("v")); err == nil || errors.Is(err, envelope.ErrDecrypt) ||
		!(errors.Is(err, provider.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded)) {
		t.Fatalf("Put needing a new data key: %v; want unavailable or deadline", err)
	}
	r, err := c.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if r.Status != health.Degraded || !r.Store.Reachable || *r.Store.Secrets != 2 || r.Store.DataKeysToRewrap == nil ||
		*r.Store.DataKeysToRewrap != 0 || *r.Store.MaxBudgetUsed < 2 || *r.CachedDataKeys != 1 {
		t.Fatalf("after the stop: %+v, store %+v; want degraded, database reachable, 2 secrets, nothing to rewrap, budget used, 1 cached key", r, r.Store)
	}
}

// A local keyring file rotated by another handle (as `keybroker rotate` in
// another process would): the next report names the new primary; a
// keyring file that can no longer be read leaves the process degraded,
// not down, since it still holds its keys.
func TestLocalRotatedElsewhere(t *testing.T) {
	ctx := context.Background()
	g, err := local.Generate("health")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "keyring.json")
	if err := g.Save(path); err != nil {
		t.Fatal(err)
	}
	kek, err := local.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := health.New(health.Config{KEK: kek, TTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	primary := func() (*health.Report, string) {
		t.Helper()
		r, err := c.Check(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return r, r.Providers[0].PrimaryVersion
	}
	if _, v := primary(); v != "1" {
		t.Fatalf("primary before rotation = %q, want 1", v)
	}
	other, err := local.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if r, v := primary(); v != "2" || r.Status != health.OK {
		t.Fatalf("after a rotation elsewhere: %s, primary %q; want ok, 2", r.Status, v)
	}
	if err := os.WriteFile(path, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if r, v := primary(); r.Status != health.Degraded || v != "2" || r.Providers[0].Outcome != telemetry.OutcomeUnavailable {
		t.Fatalf("with the keyring file broken: %+v; want degraded, unavailable, last primary 2", r)
	}
}

// Under a role row-level security binds (a tenant-facing service's), the
// store line says the database answered and why the counts are absent; it
// never serves zeros for a database that holds secrets.
func TestStoreUnderRowSecurity(t *testing.T) {
	ctx := context.Background()
	dbURL := pgtest.NewDatabase(t)
	owner := pgtest.PoolFor(t, dbURL)
	if err := pgstore.Migrate(ctx, owner, pgstore.DefaultSchema); err != nil {
		t.Fatal(err)
	}
	kek, err := local.Generate("health")
	if err != nil {
		t.Fatal(err)
	}
	st, err := pgstore.New(ctx, owner, pgstore.Config{KEK: kek})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for i := range 10 {
		if err := st.Put(ctx, fmt.Sprintf("p%d", i%2), fmt.Sprintf("s%d", i), []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	role, roleURL := pgtest.NewRole(t, dbURL)
	r := pgx.Identifier{role}.Sanitize()
	if _, err := owner.Exec(ctx, pgtest.TenantGrants(r)); err != nil {
		t.Fatal(err)
	}
	tenant, err := pgstore.New(ctx, pgtest.PoolFor(t, roleURL), pgstore.Config{KEK: kek})
	if err != nil {
		t.Fatal(err)
	}
	defer tenant.Close()
	c, err := health.New(health.Config{Store: tenant, TTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	code, body := serve(t, c)
	if code != http.StatusOK || !strings.Contains(body, `"store":{"reachable":true,"outcome":"ok","counts_omitted":"pgstore: counts need a role row-level security does not restrict"}`) {
		t.Fatalf("tenant role: %d %s; want 200, the store reachable, counts omitted with the reason", code, body)
	}
	owned, err := health.New(health.Config{Store: st, TTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := owned.Check(ctx); err != nil || rep.Store.CountsOmitted != "" || rep.Store.Secrets == nil || *rep.Store.Secrets != 10 {
		t.Fatalf("owner: %+v, %v; want 10 secrets", rep.Store, err)
	}
}

// With the key hierarchy the data keys to rewrap are those not under the
// newest intermediate key: none after a KEK rotation (which moves the
// intermediate key only), all of them after an intermediate key rotation.
func TestStoreHierarchyToRewrap(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.PoolFor(t, pgtest.NewDatabase(t))
	if err := pgstore.Migrate(ctx, pool, pgstore.DefaultSchema); err != nil {
		t.Fatal(err)
	}
	kek, err := local.Generate("health")
	if err != nil {
		t.Fatal(err)
	}
	st, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, p := range []string{"p1", "p2"} {
		if err := st.Put(ctx, p, "a", []byte("v")); err != nil {
			t.Fatal(err)
		}
	}
	c, err := health.New(health.Config{Store: st, TTL: -1})
	if err != nil {
		t.Fatal(err)
	}
	toRewrap := func() int64 {
		t.Helper()
		r, err := c.Check(ctx)
		if err != nil || r.Store == nil || r.Store.DataKeysToRewrap == nil {
			t.Fatalf("check: %+v, %v", r, err)
		}
		return *r.Store.DataKeysToRewrap
	}
	if _, err := st.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	if n := toRewrap(); n != 0 {
		t.Fatalf("after a KEK rotation %d data keys to rewrap, want 0", n)
	}
	if _, err := st.RotateIntermediate(ctx); err != nil {
		t.Fatal(err)
	}
	if n := toRewrap(); n != 2 {
		t.Fatalf("after an intermediate key rotation %d data keys to rewrap, want 2", n)
	}
}
