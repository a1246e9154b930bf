package pgstore

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
)

// DefaultTenantKEKSchemes are the provider URL schemes a project's own KEK
// may name when Config.TenantKEKSchemes is nil: cloud KMS keys, whose
// credentials come from the SDK's default chain and never from the URL.
// Vault is left out by default because its URL names the address the
// process sends its token to (see docs/SECURITY.md, Per-project KEKs).
var DefaultTenantKEKSchemes = []string{"awskms", "gcpkms"}

// ErrTenantKEKRefused: a project KEK URL names a scheme or parameter a
// binding may not (see CheckTenantKEKURL).
var ErrTenantKEKRefused = errors.New("pgstore: project KEK URL refused")

// sqlstateTenant is data_keys_tenant_fence's error: a data key under a
// chain that is not its project's (migration 006).
const sqlstateTenant = "KB006"

// chainPrefix starts the key_id of every project's own chain of
// intermediate keys; the rest is random, so rebinding a project makes a
// new chain and never mixes two KEKs in one.
const chainPrefix = "tenant-"

// CheckTenantKEKURL reports whether rawURL may be a project's own KEK, on
// top of the checks of the backend itself: a well-formed provider URL of
// one of schemes (DefaultTenantKEKSchemes when nil), never the local
// scheme (a keyring file or environment variable of the process), with no
// user information and no query parameter naming a file (a name ending in
// "_file", such as vault's token_file): a database row never chooses what
// file or variable a process reads. Errors never echo the URL.
func CheckTenantKEKURL(rawURL string, schemes []string) error {
	if schemes == nil {
		schemes = DefaultTenantKEKSchemes
	}
	if len(rawURL) > 2048 {
		return fmt.Errorf("%w: %d bytes, more than 2048", ErrTenantKEKRefused, len(rawURL))
	}
	u, err := provider.ParseURL(rawURL)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrTenantKEKRefused, err)
	}
	if u.Scheme == "local" {
		return fmt.Errorf("%w: scheme local names a file or variable of the process; a project's KEK must be a key service (%s)", ErrTenantKEKRefused, strings.Join(schemes, ", "))
	}
	if !slices.Contains(schemes, u.Scheme) {
		return fmt.Errorf("%w: scheme %q is not allowed for project KEKs (allowed: %s)", ErrTenantKEKRefused, u.Scheme, strings.Join(schemes, ", "))
	}
	if u.User != nil {
		return fmt.Errorf("%w: user information in the URL", ErrTenantKEKRefused)
	}
	for k := range u.Query() {
		if strings.HasSuffix(strings.ToLower(k), "_file") {
			return fmt.Errorf("%w: parameter %s names a file", ErrTenantKEKRefused, provider.ParamName(k))
		}
	}
	return nil
}

// tenants holds the chains of intermediate keys of projects bound to their
// own KEK, opened on first use.
type tenants struct {
	schemes     []string
	open        func(ctx context.Context, rawURL string) (provider.KEKProvider, error)
	rotateAfter time.Duration
	ttl         time.Duration
	actor       string

	mu     sync.Mutex
	chains map[string]*tenantChain // by chain id
	closed bool
}

// tenantChain is one project's chain: its KEK and the hierarchy on it.
type tenantChain struct {
	mu      sync.Mutex // held while opening
	project string
	kek     provider.KEKProvider
	ik      *hierarchy.Provider
}

func newTenants(cfg Config) (*tenants, error) {
	for _, sc := range cfg.TenantKEKSchemes {
		if sc == "local" {
			return nil, fmt.Errorf("%w: Config.TenantKEKSchemes names local, which a project KEK may never be", ErrInvalidArgument)
		}
	}
	open := cfg.OpenTenantKEK
	if open == nil {
		open = provider.Open
	}
	return &tenants{schemes: cfg.TenantKEKSchemes, open: open,
		rotateAfter: cfg.IntermediateRotateAfter, ttl: cfg.CacheTTL, actor: cfg.Actor,
		chains: map[string]*tenantChain{}}, nil
}

func (t *tenants) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.closed = true
	for id, c := range t.chains {
		c.mu.Lock()
		if c.ik != nil {
			c.ik.Close()
			closeProvider(c.kek)
		}
		c.mu.Unlock()
		delete(t.chains, id)
	}
}

func closeProvider(p provider.KEKProvider) {
	if c, ok := p.(io.Closer); ok {
		c.Close()
	}
}

// chain returns project's chain chainID, reading its row and opening its
// KEK on first use. A chain the table does not record for project (a data
// key row altered or moved) is envelope.ErrDecrypt, like any data key that
// does not unwrap; a URL CheckTenantKEKURL refuses is ErrTenantKEKRefused;
// a KEK that no longer exists (provider.ErrKeyNotFound) is ErrDecrypt, and
// every other error opening it (disabled, denied, unavailable, a scheme
// this program does not import) is returned as it is.
func (s *Store) chain(ctx context.Context, project, chainID string) (*tenantChain, error) {
	t := s.tenants
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil, envelope.ErrClosed
	}
	c := t.chains[chainID]
	if c == nil {
		c = &tenantChain{}
		t.chains[chainID] = c
	}
	t.mu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ik != nil {
		if c.project != project {
			return nil, envelope.ErrDecrypt
		}
		return c, nil
	}
	var owner, url string
	var found bool
	err := s.scoped(ctx, project, func(b *pgx.Batch) {
		b.Queue(`SELECT project_id, kek_url FROM `+s.q+`.tenant_chains WHERE chain_id = $1 AND project_id = $2`, chainID, project).
			QueryRow(func(r pgx.Row) error {
				err := r.Scan(&owner, &url)
				if errors.Is(err, pgx.ErrNoRows) {
					return nil
				}
				found = err == nil
				return err
			})
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: read project %q's KEK: %w", project, err)
	}
	if !found {
		return nil, envelope.ErrDecrypt
	}
	if err := CheckTenantKEKURL(url, t.schemes); err != nil {
		return nil, fmt.Errorf("pgstore: project %q's KEK (chain %s): %w", project, chainID, err)
	}
	kek, err := t.open(ctx, url)
	if err != nil {
		if errors.Is(err, provider.ErrKeyNotFound) || errors.Is(err, provider.ErrInvalidCiphertext) {
			// The key is gone (destroyed: the project is shredded), as
			// opaque as any data key that does not unwrap.
			return nil, envelope.ErrDecrypt
		}
		// Disabled, denied, unreachable, or this process cannot open the
		// URL at all (a backend not compiled in, a bad parameter): say so.
		return nil, fmt.Errorf("pgstore: open project %q's KEK (chain %s): %w", project, chainID, err)
	}
	ik, err := hierarchy.New(hierarchy.Config{Pool: s.pool, Schema: s.schema, KeyID: chainID, KEK: kek,
		RotateAfter: t.rotateAfter, CacheTTL: t.ttl, Actor: t.actor, Logger: s.log})
	if err != nil {
		closeProvider(kek)
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	c.project, c.kek, c.ik = owner, kek, ik
	return c, nil
}

// binding returns the chain project is bound to, "" when it is not.
func (s *Store) binding(ctx context.Context, project string) (string, error) {
	var chainID string
	err := s.scoped(ctx, project, func(b *pgx.Batch) {
		b.Queue(`SELECT chain_id FROM `+s.q+`.project_keks WHERE project_id = $1`, project).QueryRow(func(r pgx.Row) error {
			err := r.Scan(&chainID)
			if errors.Is(err, pgx.ErrNoRows) {
				return nil
			}
			return err
		})
	})
	if err != nil {
		return "", fmt.Errorf("pgstore: read project %q's KEK binding: %w", project, err)
	}
	return chainID, nil
}

// wrapperFor returns what wraps project's new data keys: its own chain
// when the project is bound to a KEK, else the deployment's. It reads the
// binding on every call: data keys are created rarely, and the database's
// fence (KB006) catches a binding changed after this read.
func (s *Store) wrapperFor(ctx context.Context, project string) (provider.KEKProvider, error) {
	chainID, err := s.binding(ctx, project)
	if err != nil || chainID == "" {
		return s.dek, err
	}
	c, err := s.chain(ctx, project, chainID)
	if err != nil {
		return nil, err
	}
	return c.ik, nil
}

// unwrapperFor returns what unwraps wk, a data key of project: the
// project's chain that wk names when it is one (not the deployment's),
// else the deployment's keyring.
func (s *Store) unwrapperFor(ctx context.Context, project string, wk *provider.WrappedKey) (provider.KEKProvider, error) {
	if wk.Provider != hierarchy.Scheme || wk.KeyID == s.ik.Ref().KeyID || !strings.HasPrefix(wk.KeyID, chainPrefix) {
		return s.dek, nil
	}
	c, err := s.chain(ctx, project, wk.KeyID)
	if err != nil {
		return nil, err
	}
	return c.ik, nil
}

// rewrapTo re-encrypts wk, a data key of project, under dst: locally when
// the key is under dst already (another version of the same chain), else
// by unwrapping with whatever holds it and wrapping under dst.
func (s *Store) rewrapTo(ctx context.Context, dst provider.KEKProvider, project string, wk *provider.WrappedKey, aad []byte) (*provider.WrappedKey, error) {
	src, err := s.unwrapperFor(ctx, project, wk)
	if err != nil {
		return nil, err
	}
	if src == dst {
		if rw, ok := dst.(provider.Rewrapper); ok {
			return rw.Rewrap(ctx, wk, aad)
		}
	}
	dek, err := src.Unwrap(ctx, wk, aad)
	if err != nil {
		return nil, err
	}
	defer provider.Clear(dek)
	return dst.Wrap(ctx, dek, aad)
}

// ProjectKEK is a project's binding to its own KEK.
type ProjectKEK struct {
	Project string
	URL     string // the provider URL, as given to SetProjectKEK
	Chain   string // the key_id of the project's chain of intermediate keys
	BoundAt time.Time
}

// SetProjectKEK binds project to its own KEK, the provider rawURL names
// (a customer's KMS key: bring your own key). The URL must pass
// CheckTenantKEKURL with the Store's Config.TenantKEKSchemes, open with
// Config.OpenTenantKEK, and wrap and unwrap a throwaway key (so a typo or a
// key the deployment may not use fails here, not at the next Put). The
// project then gets a chain of intermediate keys of its own, wrapped under
// that KEK: its new data keys are wrapped under the chain, and Rewrap moves
// its existing ones there (no secret is re-encrypted). Binding to the URL
// it is bound to already changes nothing; binding to another makes a new
// chain (and Rewrap moves the data keys to it, which needs the old KEK
// still). Recorded as a project.kek.set event. Needs the tables' owner:
// other roles have no write on project_keks.
func (s *Store) SetProjectKEK(ctx context.Context, project, rawURL string) (ProjectKEK, error) {
	b := ProjectKEK{Project: project, URL: rawURL}
	if err := checkProject(project); err != nil {
		return b, err
	}
	if err := CheckTenantKEKURL(rawURL, s.tenants.schemes); err != nil {
		return b, err
	}
	kek, err := s.tenants.open(ctx, rawURL)
	if err != nil {
		return b, fmt.Errorf("pgstore: set project %q's KEK: open: %w", project, err)
	}
	ref := kek.Ref()
	err = probe(ctx, kek)
	closeProvider(kek)
	if err != nil {
		return b, fmt.Errorf("pgstore: set project %q's KEK: %s does not wrap and unwrap: %w", project, ref, err)
	}
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return b, fmt.Errorf("pgstore: set project KEK: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	var oldChain, oldURL pgtype.Text
	err = tx.QueryRow(ctx, `SELECT b.chain_id, c.kek_url FROM `+s.q+`.project_keks b JOIN `+s.q+`.tenant_chains c USING (chain_id)
WHERE b.project_id = $1 FOR UPDATE OF b`, project).Scan(&oldChain, &oldURL)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return b, fmt.Errorf("pgstore: set project KEK: %w", err)
	}
	if oldURL.Valid && oldURL.String == rawURL {
		got, _, err := s.projectKEK(ctx, tx, project)
		return got, err
	}
	var rnd [16]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return b, fmt.Errorf("pgstore: set project KEK: %w", err)
	}
	b.Chain = chainPrefix + hex.EncodeToString(rnd[:])
	if _, err := tx.Exec(ctx, `INSERT INTO `+s.q+`.tenant_chains (chain_id, project_id, kek_url) VALUES ($1, $2, $3)`, b.Chain, project, rawURL); err != nil {
		return b, fmt.Errorf("pgstore: set project KEK: %w", err)
	}
	if err := tx.QueryRow(ctx, `INSERT INTO `+s.q+`.project_keks (project_id, chain_id) VALUES ($1, $2)
ON CONFLICT (project_id) DO UPDATE SET chain_id = EXCLUDED.chain_id, bound_at = now() RETURNING bound_at`, project, b.Chain).Scan(&b.BoundAt); err != nil {
		return b, fmt.Errorf("pgstore: set project KEK: %w", err)
	}
	detail := map[string]any{"chain": b.Chain, "kek": ref.String()}
	if oldChain.Valid {
		detail["previous_chain"] = oldChain.String
	}
	if err := s.event(ctx, tx, "project.kek.set", project, 0, nil, 1, detail); err != nil {
		return b, err
	}
	if err := tx.Commit(ctx); err != nil {
		return b, fmt.Errorf("pgstore: set project KEK: commit: %w", err)
	}
	s.log.Info("pgstore: bound project to its own KEK; rewrap moves its data keys", "project", project, "chain", b.Chain, "kek", ref.String())
	return b, nil
}

// probe wraps and unwraps a throwaway key with p.
func probe(ctx context.Context, p provider.KEKProvider) error {
	k := make([]byte, 32)
	defer provider.Clear(k)
	if _, err := rand.Read(k); err != nil {
		return err
	}
	aad := []byte("keybroker/probe/v1")
	wk, err := p.Wrap(ctx, k, aad)
	if err != nil {
		return err
	}
	back, err := p.Unwrap(ctx, wk, aad)
	if err != nil {
		return err
	}
	defer provider.Clear(back)
	if subtle.ConstantTimeCompare(back, k) != 1 {
		return errors.New("unwrapped another key")
	}
	return nil
}

// UnsetProjectKEK removes project's binding: its new data keys are wrapped
// under the deployment's chain again, and Rewrap moves its existing ones
// back (which needs the project's KEK once more). The chain stays recorded
// so those keys keep unwrapping meanwhile. ErrNotFound when the project is
// not bound. Recorded as a project.kek.unset event; needs the tables'
// owner.
func (s *Store) UnsetProjectKEK(ctx context.Context, project string) error {
	if err := checkProject(project); err != nil {
		return err
	}
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: unset project KEK: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	var chainID string
	err = tx.QueryRow(ctx, `DELETE FROM `+s.q+`.project_keks WHERE project_id = $1 RETURNING chain_id`, project).Scan(&chainID)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("%w: project %q is not bound to a KEK of its own", ErrNotFound, project)
	}
	if err != nil {
		return fmt.Errorf("pgstore: unset project KEK: %w", err)
	}
	if err := s.event(ctx, tx, "project.kek.unset", project, 0, nil, 1, map[string]any{"chain": chainID}); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("pgstore: unset project KEK: commit: %w", err)
	}
	s.log.Info("pgstore: unbound project from its own KEK; rewrap moves its data keys back", "project", project, "chain", chainID)
	return nil
}

// ProjectKEK returns project's binding, and false when it has none.
func (s *Store) ProjectKEK(ctx context.Context, project string) (ProjectKEK, bool, error) {
	if err := checkProject(project); err != nil {
		return ProjectKEK{}, false, err
	}
	return s.projectKEK(ctx, s.pool, project)
}

func (s *Store) projectKEK(ctx context.Context, q querier, project string) (ProjectKEK, bool, error) {
	b := ProjectKEK{Project: project}
	err := q.QueryRow(ctx, `SELECT c.kek_url, b.chain_id, b.bound_at FROM `+s.q+`.project_keks b JOIN `+s.q+`.tenant_chains c USING (chain_id)
WHERE b.project_id = $1`, project).Scan(&b.URL, &b.Chain, &b.BoundAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return ProjectKEK{Project: project}, false, nil
	}
	if err != nil {
		return b, false, fmt.Errorf("pgstore: read project KEK: %w", err)
	}
	return b, true, nil
}

// ProjectKEKStatus is one bound project's line in Status.
type ProjectKEKStatus struct {
	ProjectKEK
	DataKeys int64 // the project's data keys
	// Pending counts the project's data keys not under its chain yet:
	// Rewrap moves them (and until then a backup of them is not
	// crypto-shredded by destroying the project's KEK).
	Pending int64
	// KEKs are the keys (of the project's KEK) that wrap the chain's
	// intermediate keys, as the kek table records them.
	KEKs []provider.KeyRef
}

// tenantStatus fills st's ProjectKEKs, Recovery and IntermediateKeys.
func (s *Store) tenantStatus(ctx context.Context, st *Status) error {
	rows, err := s.pool.Query(ctx, `SELECT b.project_id, c.kek_url, b.chain_id, b.bound_at,
  (SELECT count(*) FROM `+s.q+`.data_keys d WHERE d.project_id = b.project_id),
  (SELECT count(*) FROM `+s.q+`.data_keys d JOIN `+s.q+`.kek k ON k.id = d.kek_id
   WHERE d.project_id = b.project_id AND (k.provider <> $1 OR k.key_id <> b.chain_id))
FROM `+s.q+`.project_keks b JOIN `+s.q+`.tenant_chains c USING (chain_id) ORDER BY b.project_id`, hierarchy.Scheme)
	if err != nil {
		return fmt.Errorf("pgstore: status: %w", err)
	}
	var p ProjectKEKStatus
	if _, err := pgx.ForEachRow(rows, []any{&p.Project, &p.URL, &p.Chain, &p.BoundAt, &p.DataKeys, &p.Pending}, func() error {
		st.ProjectKEKs = append(st.ProjectKEKs, p)
		return nil
	}); err != nil {
		return fmt.Errorf("pgstore: status: %w", err)
	}
	for i := range st.ProjectKEKs {
		p := &st.ProjectKEKs[i]
		rows, err := s.pool.Query(ctx, `SELECT DISTINCT k.provider, k.key_id FROM `+s.q+`.intermediate_keys i
JOIN `+s.q+`.kek k ON k.id = i.kek_id WHERE i.key_id = $1 ORDER BY 1, 2`, p.Chain)
		if err != nil {
			return fmt.Errorf("pgstore: status: %w", err)
		}
		var ref provider.KeyRef
		if _, err := pgx.ForEachRow(rows, []any{&ref.Provider, &ref.KeyID}, func() error { p.KEKs = append(p.KEKs, ref); return nil }); err != nil {
			return fmt.Errorf("pgstore: status: %w", err)
		}
	}
	rec, total, err := s.ik.RecoveryStatus(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: status: %w", err)
	}
	st.Recovery, st.IntermediateKeys = rec, total
	return nil
}

// boundChains lists the bound projects with their chains.
func (s *Store) boundChains(ctx context.Context) ([][2]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT project_id, chain_id FROM `+s.q+`.project_keks ORDER BY project_id`)
	if err != nil {
		return nil, err
	}
	var (
		out  [][2]string
		p, c string
	)
	_, err = pgx.ForEachRow(rows, []any{&p, &c}, func() error { out = append(out, [2]string{p, c}); return nil })
	return out, err
}

// rewrapTenants is Rewrap's part for the projects bound to their own KEK:
// each chain's intermediate keys are rewrapped to its KEK's primary
// version (a rotation of the customer's key), then each project's data
// keys not under its chain's current intermediate key are moved there,
// batch by batch (each its own transaction with its kek.rewrap event, rows
// locked FOR NO KEY UPDATE, so concurrent runs wait for each other's
// batches and then skip the rows done). It adds to res.
func (s *Store) rewrapTenants(ctx context.Context, opts RewrapOptions, batch int, res *RewrapResult) error {
	bound, err := s.boundChains(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: rewrap: %w", err)
	}
	var failed []error
	for _, pc := range bound {
		if err := s.rewrapTenant(ctx, opts, batch, res, pc[0], pc[1]); err != nil {
			if ctx.Err() != nil {
				return err
			}
			// One tenant's KEK disabled or unreachable must not hold up
			// the others: go on, and say so at the end.
			s.log.Error("pgstore: rewrap: project left as it is", "project", pc[0], "err", err)
			failed = append(failed, err)
			var left int64
			if cerr := s.pool.QueryRow(ctx, `SELECT count(*) FROM `+s.q+`.data_keys d JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE d.project_id = $1 AND (k.provider <> $2 OR k.key_id <> $3)`, pc[0], hierarchy.Scheme, pc[1]).Scan(&left); cerr != nil {
				failed = append(failed, fmt.Errorf("pgstore: rewrap: recount: %w", cerr))
			}
			res.Remaining += left
		}
	}
	return errors.Join(failed...)
}

func (s *Store) rewrapTenant(ctx context.Context, opts RewrapOptions, batch int, res *RewrapResult, project, chainID string) error {
	c, err := s.chain(ctx, project, chainID)
	if err != nil {
		return fmt.Errorf("pgstore: rewrap project %q: %w", project, err)
	}
	if !opts.DryRun {
		ir, err := c.ik.RewrapKEK(ctx)
		if err != nil {
			return fmt.Errorf("pgstore: rewrap project %q: %w", project, err)
		}
		res.IntermediateKeys += ir.Rewrapped
	}
	if opts.DryRun {
		// Without the chain's first version (which primaryOf would make)
		// every data key of the project is pending.
		st, err := c.ik.Describe(ctx)
		if err != nil {
			return fmt.Errorf("pgstore: rewrap project %q: %w", project, err)
		}
		if st.PrimaryVersion == "" {
			var n int64
			if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM `+s.q+`.data_keys WHERE project_id = $1`, project).Scan(&n); err != nil {
				return fmt.Errorf("pgstore: rewrap: %w", err)
			}
			res.Remaining += n
			return nil
		}
	}
	primary, primaryID, err := s.primaryOf(ctx, c.ik)
	if err != nil {
		return fmt.Errorf("pgstore: rewrap project %q: %w", project, err)
	}
	rows, err := s.pool.Query(ctx, `SELECT k.provider, k.key_id, k.key_version, count(*)
FROM `+s.q+`.data_keys d JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE d.project_id = $1 AND d.kek_id <> $2 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3`, project, primaryID)
	if err != nil {
		return fmt.Errorf("pgstore: rewrap: %w", err)
	}
	var vc VersionCount
	var pending int64
	if _, err := pgx.ForEachRow(rows, []any{&vc.Provider, &vc.KeyID, &vc.Version, &vc.DataKeys}, func() error {
		res.Pending = append(res.Pending, vc)
		pending += vc.DataKeys
		return nil
	}); err != nil {
		return fmt.Errorf("pgstore: rewrap: %w", err)
	}
	if opts.DryRun || pending == 0 {
		res.Remaining += pending
		return nil
	}
	var corrupt []pgtype.UUID
	for {
		n, bad, err := s.rewrapProjectBatch(ctx, c, project, primary, primaryID, batch, corrupt)
		if err != nil {
			return err
		}
		res.Rewrapped += n
		res.ProjectKEKs += n
		res.Corrupt = append(res.Corrupt, bad...)
		for _, b := range bad {
			corrupt = append(corrupt, uuidParam(b.DataKeyID))
		}
		if n > 0 && opts.Progress != nil {
			opts.Progress(RewrapProgress{Done: res.Rewrapped, Total: res.Rewrapped + pending - n})
		}
		if n == 0 && len(bad) == 0 {
			break
		}
		pending -= n
	}
	var left int64
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM `+s.q+`.data_keys WHERE project_id = $1 AND kek_id <> $2`, project, primaryID).Scan(&left); err != nil {
		return fmt.Errorf("pgstore: rewrap: recount: %w", err)
	}
	res.Remaining += left
	s.log.Info("pgstore: rewrapped project's data keys to its own KEK's chain", "project", project, "to", primary.String(), "remaining", left)
	return nil
}

func (s *Store) rewrapProjectBatch(ctx context.Context, c *tenantChain, project string, primary KEKVersion, primaryID int64, batch int, exclude []pgtype.UUID) (int64, []CorruptKey, error) {
	if exclude == nil {
		exclude = []pgtype.UUID{}
	}
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return 0, nil, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	rows, err := tx.Query(ctx, `SELECT d.id, d.wrapped_dek, k.provider, k.key_id, k.key_version
FROM `+s.q+`.data_keys d JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE d.project_id = $1 AND d.kek_id <> $2 AND d.id <> ALL($4::uuid[]) ORDER BY d.id LIMIT $3 FOR NO KEY UPDATE OF d`, project, primaryID, batch, exclude)
	if err != nil {
		return 0, nil, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	type item struct {
		id pgtype.UUID
		wk provider.WrappedKey
	}
	var (
		it   item
		todo []item
	)
	if _, err := pgx.ForEachRow(rows, []any{&it.id, &it.wk.Ciphertext, &it.wk.Provider, &it.wk.KeyID, &it.wk.Version}, func() error {
		todo = append(todo, it)
		it = item{}
		return nil
	}); err != nil {
		return 0, nil, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	var (
		ids     []pgtype.UUID
		wrapped [][]byte
		keks    []int64
		bad     []CorruptKey
	)
	kekIDs := map[string]int64{primary.Version: primaryID}
	from := map[string]int64{}
	for i := range todo {
		t := &todo[i]
		old := KEKVersion{Provider: t.wk.Provider, KeyID: t.wk.KeyID, Version: t.wk.Version}
		nwk, err := s.rewrapTo(ctx, c.ik, project, &t.wk, wrapAAD(project, t.id.Bytes))
		if isCorrupt(err) {
			s.log.Error("pgstore: rewrap: data key does not unwrap; left as it is", "project", project, "data_key", t.id.String(), "kek", old.String())
			bad = append(bad, CorruptKey{Project: project, DataKeyID: t.id.Bytes, KEKVersion: old})
			if err := s.event(ctx, tx, "dek.corrupt", project, 0, &t.id.Bytes, 1, map[string]any{"kek": old.String()}); err != nil {
				return 0, nil, err
			}
			continue
		}
		if err != nil {
			return 0, nil, fmt.Errorf("pgstore: rewrap data key of project %q: %w", project, err)
		}
		kid, ok := kekIDs[nwk.Version]
		if !ok {
			if kid, err = s.kekRowFor(ctx, s.pool, nwk.Provider, nwk.KeyID, nwk.Version); err != nil {
				return 0, nil, err
			}
			kekIDs[nwk.Version] = kid
		}
		ids, wrapped, keks = append(ids, t.id), append(wrapped, nwk.Ciphertext), append(keks, kid)
		from[old.String()]++
	}
	if len(ids) > 0 {
		if _, err := tx.Exec(ctx, `UPDATE `+s.q+`.data_keys d SET wrapped_dek = u.w, kek_id = u.k, rewrapped_at = now()
FROM unnest($1::uuid[], $2::bytea[], $3::bigint[]) AS u(id, w, k) WHERE d.id = u.id`, ids, wrapped, keks); err != nil {
			return 0, nil, fmt.Errorf("pgstore: rewrap project %q: %w", project, err)
		}
		if err := s.event(ctx, tx, "kek.rewrap", project, primaryID, nil, int64(len(ids)), map[string]any{"to": primary.String(), "from": from}); err != nil {
			return 0, nil, err
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, nil, fmt.Errorf("pgstore: rewrap: commit: %w", err)
	}
	return int64(len(ids)), bad, nil
}

// tenantVersion returns the chain v belongs to when v is a version of a
// project's own chain (intermediate:tenant-…@N), opened, and ok false
// otherwise.
func (s *Store) tenantVersion(ctx context.Context, v KEKVersion) (*tenantChain, bool, error) {
	if v.Provider != hierarchy.Scheme || !strings.HasPrefix(v.KeyID, chainPrefix) {
		return nil, false, nil
	}
	var project string
	err := s.pool.QueryRow(ctx, `SELECT project_id FROM `+s.q+`.tenant_chains WHERE chain_id = $1`, v.KeyID).Scan(&project)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("pgstore: %w", err)
	}
	c, err := s.chain(ctx, project, v.KeyID)
	if err != nil {
		return nil, false, err
	}
	return c, true, nil
}

// checkTenantRetire refuses (ErrPrimaryVersion) to retire the current
// version of a project's own chain, before RetireKEK changes anything.
func (s *Store) checkTenantRetire(ctx context.Context, v KEKVersion) error {
	c, ok, err := s.tenantVersion(ctx, v)
	if err != nil || !ok {
		return err
	}
	st, err := c.ik.Describe(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: retire: %w", err)
	}
	if st.PrimaryVersion == v.Version {
		return fmt.Errorf("%w: %s wraps the project's new data keys", ErrPrimaryVersion, v)
	}
	return nil
}

// RotateProjectIntermediate makes a new version of project's own chain of
// intermediate keys (one call to the project's KEK, to wrap it), the one
// its new data keys are wrapped under; Rewrap then moves its data keys to
// it locally, and RetireKEK retires the old version. ErrNotFound when the
// project is not bound to a KEK of its own.
func (s *Store) RotateProjectIntermediate(ctx context.Context, project string) (KEKVersion, error) {
	if err := checkProject(project); err != nil {
		return KEKVersion{}, err
	}
	chainID, err := s.binding(ctx, project)
	if err != nil {
		return KEKVersion{}, err
	}
	if chainID == "" {
		return KEKVersion{}, fmt.Errorf("%w: project %q is not bound to a KEK of its own", ErrNotFound, project)
	}
	c, err := s.chain(ctx, project, chainID)
	if err != nil {
		return KEKVersion{}, err
	}
	ver, err := c.ik.Rotate(ctx)
	if err != nil {
		return KEKVersion{}, fmt.Errorf("pgstore: rotate project %q's intermediate key: %w", project, err)
	}
	v := KEKVersion{Provider: hierarchy.Scheme, KeyID: chainID, Version: ver}
	id, err := s.kekRowFor(ctx, s.pool, v.Provider, v.KeyID, v.Version)
	if err != nil {
		return v, err
	}
	if err := s.event(ctx, s.pool, "ik.rotate", project, id, nil, 1, map[string]any{"version": v.String()}); err != nil {
		return v, err
	}
	return v, nil
}
