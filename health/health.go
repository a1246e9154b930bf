package health

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/telemetry"
)

// Defaults for Config fields left zero.
const (
	DefaultTTL     = 15 * time.Second
	DefaultTimeout = 5 * time.Second
)

// State is a Report's overall verdict.
type State string

const (
	// OK: every provider answered and the database (if any) too.
	OK State = "ok"
	// Degraded: a key service did not answer in time or was unavailable.
	// Encryption continues with the data keys already unwrapped in memory,
	// within their message budget and age; new data keys, decryptions of
	// uncached data keys and rewraps fail until it answers again.
	Degraded State = "degraded"
	// Down: the database did not answer, or the primary key service
	// answered with a lasting failure (access denied, key not found or
	// disabled): configuration, not an outage.
	Down State = "down"
)

// Config configures a Checker.
type Config struct {
	// KEK is what to check: a *provider.Keyring (each member is checked; the
	// first is the primary) or one provider. When nil, Store's keyring.
	KEK provider.KEKProvider
	// Store, when set, adds the database check and the counts of data keys
	// and secrets not yet on the primary key version. The counts need a
	// role that row-level security does not restrict, as pgstore's Status
	// does; under a role it binds (a tenant-facing service's), the database
	// is still checked but the counts are left out and
	// StoreReport.CountsOmitted says why.
	Store *pgstore.Store
	// CacheStats, when set, reports how many unwrapped data keys the
	// process holds (for example Store.CacheStats, or an Envelope's
	// Stats().Cache through a func literal).
	CacheStats func() envelope.CacheStats
	// TTL is how long a report is reused before the next Check asks the
	// key services and database again (DefaultTTL when zero; negative:
	// never reused). Concurrent Checks share one refresh, so a readiness
	// probe cannot make more than one round of calls per TTL.
	TTL time.Duration
	// Timeout bounds one refresh (DefaultTimeout when zero). A key service
	// that does not answer within it counts as unavailable.
	Timeout time.Duration
}

// Report is the outcome of one check. It carries no key ids, tenants or
// secret names: the JSON is fit for an unauthenticated probe endpoint.
type Report struct {
	Status State `json:"status"`
	// Detail is one line explaining a status other than OK.
	Detail    string           `json:"detail,omitempty"`
	CheckedAt time.Time        `json:"checked_at"`
	Providers []ProviderReport `json:"providers"`
	Store     *StoreReport     `json:"store,omitempty"`
	// CachedDataKeys is how many unwrapped data keys this process holds
	// (nil when Config.CacheStats is not set): what encryption and
	// decryption can use while a key service is unreachable.
	CachedDataKeys *int `json:"cached_data_keys,omitempty"`
}

// ProviderReport is one provider's line in a Report.
type ProviderReport struct {
	Ref     provider.KeyRef `json:"-"`       // for the application; not served
	Backend string          `json:"backend"` // the provider scheme
	Primary bool            `json:"primary"`
	// Check is how the provider was asked: "describe" (a provider.Describer)
	// or "wrap" (a throwaway random key wrapped and dropped).
	Check     string `json:"check"`
	Reachable bool   `json:"reachable"`
	// Outcome classifies the check's error (telemetry.Outcome): "ok",
	// "unavailable", "deadline_exceeded", "access_denied", ...
	Outcome string `json:"outcome"`
	// PrimaryVersion is the key version new data keys are wrapped under,
	// as last reported (kept from an earlier check while unreachable).
	PrimaryVersion string `json:"primary_version,omitempty"`
}

// StoreReport is the database's line in a Report. The counts are nil
// (absent from the JSON) when the database did not answer or when
// CountsOmitted is set; they are never reported as zeros they are not.
type StoreReport struct {
	Reachable bool   `json:"reachable"`
	Outcome   string `json:"outcome"`
	// CountsOmitted, when set, is why the database answered but the counts
	// are absent: "counts need a role row-level security does not
	// restrict" (pgstore.ErrRowSecurity) when the Store's role is bound by
	// row-level security and would see no project's rows.
	CountsOmitted string `json:"counts_omitted,omitempty"`
	DataKeys      *int64 `json:"data_keys,omitempty"`
	Secrets       *int64 `json:"secrets,omitempty"`
	// DataKeysToRewrap and SecretsToRewrap count data keys not wrapped
	// under the version new data keys get (the newest intermediate key, or
	// with pgstore.Config.DirectKEK the primary provider's current
	// version), and the secrets under them (run `keybroker rewrap`). Nil
	// while that version is unknown.
	DataKeysToRewrap *int64 `json:"data_keys_to_rewrap,omitempty"`
	SecretsToRewrap  *int64 `json:"secrets_to_rewrap,omitempty"`
	// RetiredVersionsInUse counts retired key versions still wrapping a
	// data key: those data keys no longer unwrap.
	RetiredVersionsInUse *int `json:"retired_versions_in_use,omitempty"`
	// MaxBudgetUsed is the highest number of encryptions reserved from any
	// active data key's budget (Budget): how close a project is to getting
	// a new data key, which needs the key service. Budget is the Store's
	// per-data-key budget, 0 (absent) with the counts.
	MaxBudgetUsed *int64 `json:"max_budget_used,omitempty"`
	Budget        int64  `json:"budget,omitempty"`
}

// Checker answers health checks. Safe for concurrent use.
type Checker struct {
	cfg       Config
	providers []provider.KEKProvider

	mu       sync.Mutex
	last     *Report
	inflight chan struct{} // closed when the running refresh ends
	versions map[provider.KeyRef]string
}

// New returns a Checker. It makes no call: the first Check does.
func New(cfg Config) (*Checker, error) {
	if cfg.KEK == nil && cfg.Store != nil {
		cfg.KEK = cfg.Store.Keyring()
	}
	if cfg.KEK == nil {
		return nil, errors.New("health: no KEK provider and no store to check")
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("health: negative timeout %v", cfg.Timeout)
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	ps := []provider.KEKProvider{cfg.KEK}
	if kr, ok := cfg.KEK.(*provider.Keyring); ok {
		ps = kr.Providers()
	}
	return &Checker{cfg: cfg, providers: ps, versions: map[provider.KeyRef]string{}}, nil
}

// Check returns the latest report, refreshing it when it is older than the
// TTL. A refresh runs in the background under its own Timeout, so a Check
// whose ctx ends first returns ctx's error at once and the refresh still
// serves the next caller.
func (c *Checker) Check(ctx context.Context) (*Report, error) {
	for {
		c.mu.Lock()
		if c.last != nil && c.cfg.TTL > 0 && time.Since(c.last.CheckedAt) < c.cfg.TTL {
			r := c.last
			c.mu.Unlock()
			return r, nil
		}
		wait := c.inflight
		if wait == nil {
			wait = make(chan struct{})
			c.inflight = wait
			go c.refresh(wait)
		}
		c.mu.Unlock()
		select {
		case <-wait:
			c.mu.Lock()
			r := c.last
			c.mu.Unlock()
			if r != nil {
				return r, nil
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("health: %w", ctx.Err())
		}
	}
}

// refresh asks every provider and the database at once and publishes the
// report.
func (c *Checker) refresh(done chan struct{}) {
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.Timeout)
	defer cancel()
	r := &Report{Providers: make([]ProviderReport, len(c.providers))}
	var st *pgstore.Status
	var stErr error
	var wg sync.WaitGroup
	for i, p := range c.providers {
		wg.Go(func() { r.Providers[i] = c.checkProvider(ctx, p, i == 0) })
	}
	if c.cfg.Store != nil {
		wg.Go(func() { st, stErr = c.cfg.Store.Status(ctx) })
	}
	wg.Wait()
	r.CheckedAt = time.Now()

	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range r.Providers {
		pr := &r.Providers[i]
		if pr.Reachable {
			c.versions[pr.Ref] = pr.PrimaryVersion
		} else {
			pr.PrimaryVersion = c.versions[pr.Ref]
		}
	}
	if c.cfg.Store != nil {
		r.Store = storeReport(st, stErr, r.Providers[0], c.cfg.Store)
	}
	if c.cfg.CacheStats != nil {
		n := c.cfg.CacheStats().Entries
		r.CachedDataKeys = &n
	}
	r.Status, r.Detail = verdict(r)
	c.last = r
	c.inflight = nil
	close(done)
}

func (c *Checker) checkProvider(ctx context.Context, p provider.KEKProvider, primary bool) ProviderReport {
	pr := ProviderReport{Ref: p.Ref(), Backend: p.Ref().Provider, Primary: primary}
	var err error
	if d, ok := p.(provider.Describer); ok {
		pr.Check = "describe"
		var s provider.Status
		if s, err = d.Describe(ctx); err == nil {
			pr.PrimaryVersion = s.PrimaryVersion
		}
	} else {
		pr.Check = "wrap"
		probe := make([]byte, 32)
		if _, err = rand.Read(probe); err == nil {
			var wk *provider.WrappedKey
			if wk, err = p.Wrap(ctx, probe, []byte("keybroker/health/v1")); err == nil {
				pr.PrimaryVersion = wk.Version
			}
		}
		provider.Clear(probe)
	}
	pr.Reachable = err == nil
	pr.Outcome = telemetry.Outcome(err)
	return pr
}

// storeReport summarises st. Data keys "to rewrap" are those not under
// the version new data keys get: with the key hierarchy the newest
// intermediate key version st records, else the primary provider's
// current version.
func storeReport(st *pgstore.Status, err error, primary ProviderReport, store *pgstore.Store) *StoreReport {
	if errors.Is(err, pgstore.ErrRowSecurity) { // the database answered
		return &StoreReport{Reachable: true, Outcome: telemetry.OutcomeOK, CountsOmitted: err.Error()}
	}
	sr := &StoreReport{Reachable: err == nil, Outcome: telemetry.Outcome(err)}
	if err != nil {
		return sr
	}
	sr.Budget = st.Budget
	var dataKeys int64
	for _, n := range st.DataKeys {
		dataKeys += n
	}
	retired := 0
	sr.DataKeys, sr.Secrets, sr.MaxBudgetUsed, sr.RetiredVersionsInUse = &dataKeys, &st.Secrets, &st.MaxActiveUse, &retired
	current, version := primary.Ref, primary.PrimaryVersion
	if !store.DirectKEK() {
		current, version = store.Hierarchy().Ref(), ""
		newest := uint64(0)
		for _, v := range st.Versions {
			if n, err := strconv.ParseUint(v.Version, 10, 32); err == nil && v.Provider == current.Provider && v.KeyID == current.KeyID && n > newest {
				newest, version = n, v.Version
			}
		}
	}
	var keys, secrets int64
	for _, v := range st.Versions {
		if v.RetiredAt != nil && v.DataKeys > 0 {
			retired++
		}
		if v.Provider != current.Provider || v.KeyID != current.KeyID || v.Version != version {
			keys += v.DataKeys
			secrets += v.Secrets
		}
	}
	if version != "" {
		sr.DataKeysToRewrap, sr.SecretsToRewrap = &keys, &secrets
	}
	return sr
}

func verdict(r *Report) (State, string) {
	if r.Store != nil && !r.Store.Reachable {
		return Down, "database did not answer: " + r.Store.Outcome
	}
	p := r.Providers[0]
	if !p.Reachable && !transient(p.Outcome) {
		return Down, "primary key service refused: " + p.Outcome
	}
	for _, p := range r.Providers {
		if !p.Reachable {
			which := "a decrypt-only"
			if p.Primary {
				which = "the primary"
			}
			return Degraded, which + " key service (" + p.Backend + ") is unreachable (" + p.Outcome +
				"): encryption continues with cached data keys within their budget and age; new data keys and uncached decryptions fail until it answers"
		}
	}
	return OK, ""
}

// transient reports whether an outcome is an outage that may end by itself.
func transient(outcome string) bool {
	switch outcome {
	case telemetry.OutcomeUnavailable, telemetry.OutcomeDeadline, telemetry.OutcomeCanceled:
		return true
	}
	return false
}

// ServeHTTP serves a readiness probe: the report as JSON, with status 200
// when it is OK or Degraded (the process can still serve from cached data
// keys, so it should keep receiving traffic) and 503 when Down or when the
// request ends before a report is ready.
func (c *Checker) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	r, err := c.Check(req.Context())
	if err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(map[string]string{"status": string(Down), "detail": "health check did not finish in time"})
		return
	}
	if r.Status == Down {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	json.NewEncoder(w).Encode(r)
}

var _ http.Handler = (*Checker)(nil)
