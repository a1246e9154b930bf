package pgstore

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
)

// Defaults for Config fields left zero.
const (
	// DefaultBudget is the number of encryptions one data key may perform,
	// envelope.DefaultMaxMessages (2^24): the chance that two random 96-bit
	// nonces under one key collide stays below 2^-49.
	DefaultBudget = int64(envelope.DefaultMaxMessages)
	// DefaultReserveChunk is how many encryptions a process reserves from a
	// data key's budget per database round trip.
	DefaultReserveChunk = 1024
	// DefaultCacheEntries bounds the unwrapped data keys kept in memory:
	// 2^17 (131,072), so a process serving 100,000 active projects keeps
	// each one's key and does not thrash. Each costs about 1.3 kB of heap
	// (the AES-GCM key schedule, the cache entry and its TTL timer;
	// measured by BenchmarkScale, docs/BENCHMARKS.md): some 170 MB when
	// full. Memory is used only by keys actually loaded.
	DefaultCacheEntries = 1 << 17
	// DefaultCacheTTL is how long an unwrapped data key stays cached.
	DefaultCacheTTL = 10 * time.Minute
)

// Bounds on what Put accepts.
const (
	MaxProjectLen = 256     // bytes of a project id
	MaxNameLen    = 1024    // bytes of a secret name
	MaxValueLen   = 1 << 20 // bytes of a secret value (1 MiB)
)

// Config configures a Store.
type Config struct {
	// Schema holding the tables; DefaultSchema ("keybroker") when empty.
	// Lower-case letters, digits and underscores only.
	Schema string
	// KEK is the deployment's key-encryption key. With the key hierarchy
	// (the default) it wraps the intermediate keys (package
	// pgstore/hierarchy), which wrap the data keys; with DirectKEK it wraps
	// the data keys itself. Either way it unwraps data keys wrapped
	// directly under it (databases from before the hierarchy, until
	// Rewrap). Pass a *provider.Keyring to read keys wrapped by other
	// backends while moving between them; any other provider is used as a
	// keyring of one. Required.
	KEK provider.KEKProvider
	// DirectKEK turns the key hierarchy off for this Store: every data key
	// is wrapped by KEK itself, so each process calls the key service once
	// per data key per CacheTTL, and the key service's audit log shows
	// each project's unwraps (docs/SECURITY.md, Key hierarchy). Data keys
	// already under intermediate keys stay readable; Rewrap moves them
	// back under KEK.
	DirectKEK bool
	// IntermediateRotateAfter is the age after which a new intermediate
	// key version is made (by the next data key created);
	// hierarchy.DefaultRotateAfter (30 days) when zero, only on demand
	// (RotateIntermediate) when negative. Ignored with DirectKEK.
	IntermediateRotateAfter time.Duration
	// Budget is the number of encryptions (Puts, re-encryptions, migrated
	// rows) one data key may perform before the project gets a new one;
	// DefaultBudget when zero, at most envelope.MaxMessagesLimit (2^32). It
	// is counted in data_keys.messages across every process. A data key
	// keeps the budget of the Store that created it (data_keys.budget), and
	// a Store reserves within the smaller of that and its own Budget, so
	// processes configured differently never take a key past either.
	// Give every process of a fleet, the operator's CLI included
	// (--budget / KEYBROKER_BUDGET), the same Budget.
	Budget int64
	// ReserveChunk is how many encryptions a process reserves from the
	// budget at a time; DefaultReserveChunk when zero, at most Budget.
	// Reserved encryptions a process does not use are lost, never reused.
	ReserveChunk int64
	// CacheEntries and CacheTTL bound the cache of unwrapped data keys;
	// DefaultCacheEntries and DefaultCacheTTL when zero.
	CacheEntries int
	CacheTTL     time.Duration
	// Actor names who acts, recorded in key_events (for example a user or
	// service name). Optional.
	Actor string
	// Logger receives one line per key-management step (never secrets).
	// Discarded when nil.
	Logger *slog.Logger
	// ReadPool, when set, serves Get and GetMany from a hot standby of the
	// database pool reaches (a read replica), to take reads off the
	// primary; everything else stays on pool. Each read takes the secret
	// and its data key's wrapped form in one statement on the standby; a
	// secret the standby does not have (a Put not yet replayed there, or a
	// name that does not exist), one that does not open there (its data key
	// not yet replayed, or wrapped there under a KEK version since retired)
	// and any error of the standby's are read again from pool, whose answer
	// is returned. A read so returns what the primary holds, or held at the
	// standby's replay position: a process always reads back the secrets it
	// created, but an update it made may read as the previous value until
	// the standby replays it, unless its writes wait for the standby's
	// replay (synchronous_commit = remote_apply, with the standby in
	// synchronous_standby_names; docs/OPERATIONS.md). Stores returned by In
	// read from their transaction, never from ReadPool. New does not take
	// ownership of ReadPool. Optional.
	ReadPool *pgxpool.Pool
	// Observer, when set, is told of every Put, Get and GetMany (for
	// metrics and traces; telemetry.Telemetry.StoreObserver is one).
	// Optional.
	Observer Observer
	// TenantKEKSchemes lists the provider URL schemes a project's own KEK
	// (SetProjectKEK) may name; DefaultTenantKEKSchemes when nil. The
	// local scheme is refused whatever this says: a database row never
	// chooses a file this process reads (see CheckTenantKEKURL).
	TenantKEKSchemes []string
	// OpenTenantKEK opens the provider a project's binding names, after
	// CheckTenantKEKURL accepted it; provider.Open when nil. A deployment
	// that must pin what tenants may name (hosts, accounts) checks it
	// here.
	OpenTenantKEK func(ctx context.Context, rawURL string) (provider.KEKProvider, error)
}

// Store keeps secrets encrypted in PostgreSQL. It is safe for concurrent
// use, and several processes may share one database.
type Store struct {
	pool    *pgxpool.Pool
	schema  string            // unquoted
	q       string            // quoted schema, for SQL
	keyring *provider.Keyring // the deployment's KEK (Config.KEK)
	// dek wraps and unwraps data keys: the hierarchy as primary and the
	// deployment's providers decrypt-only, or (DirectKEK) the
	// deployment's providers, the hierarchy decrypt-only.
	dek    *provider.Keyring
	ik     *hierarchy.Provider // decrypt-only with DirectKEK
	direct bool                // Config.DirectKEK
	budget int64
	chunk  int64
	cache  *envelope.KeyCache
	actor  string
	log    *slog.Logger
	obs    Observer
	// rls: row-level security applies to the pool's role, so statements
	// must name their project (see scoped).
	rls bool
	// tenants holds the chains of projects bound to their own KEK.
	tenants *tenants

	// db runs the statements on secrets (Put, Get, GetMany, Delete, List):
	// pool, or the caller's transaction in a Store returned by In. Data key
	// reservations and creation always run on pool, in transactions of
	// their own (see In).
	db DB
	// read serves Get and GetMany first (Config.ReadPool), or is nil.
	read DB

	res *reservations
}

// reservations holds this process's reservation per project and scope,
// shared by a Store and the Stores its In returns.
type reservations struct {
	mu   sync.Mutex
	keys map[scopeKey]*projectKey
}

// scopeKey names a project's data keys of one scope (see migration 005):
// secretsScope for encrypted_secrets, one per declared column (pgcolumn).
type scopeKey struct{ project, scope string }

// secretsScope is the data_keys.scope of the keys encrypted_secrets uses.
const secretsScope = ""

// projectKey is this process's reservation on a project's active data key:
// it may encrypt under id while next < end without asking the database.
type projectKey struct {
	mu        sync.Mutex
	id        [16]byte
	valid     bool
	next, end int64
}

// New returns a Store on pool. The schema must already be migrated to this
// build's version (see Migrate); New checks it and fails with
// ErrSchemaVersion otherwise. It fails with ErrPooler when pool reaches
// PostgreSQL through a connection pooler in a mode that breaks there (see
// ParseConfig). New does not take ownership of pool.
func New(ctx context.Context, pool *pgxpool.Pool, cfg Config) (*Store, error) {
	if pool == nil {
		return nil, fmt.Errorf("%w: nil pool", ErrInvalidArgument)
	}
	if cfg.Schema == "" {
		cfg.Schema = DefaultSchema
	}
	if err := checkSchema(cfg.Schema); err != nil {
		return nil, err
	}
	if cfg.KEK == nil {
		return nil, fmt.Errorf("%w: Config.KEK is nil", ErrInvalidArgument)
	}
	kr, ok := cfg.KEK.(*provider.Keyring)
	if !ok {
		var err error
		if kr, err = provider.NewKeyring(cfg.KEK); err != nil {
			return nil, fmt.Errorf("pgstore: %w", err)
		}
	}
	if cfg.Budget == 0 {
		cfg.Budget = DefaultBudget
	}
	if cfg.ReserveChunk == 0 {
		cfg.ReserveChunk = min(DefaultReserveChunk, cfg.Budget)
	}
	switch {
	case cfg.Budget < 1 || cfg.Budget > envelope.MaxMessagesLimit:
		return nil, fmt.Errorf("%w: Config.Budget %d out of range 1..%d", ErrInvalidArgument, cfg.Budget, int64(envelope.MaxMessagesLimit))
	case cfg.ReserveChunk < 1 || cfg.ReserveChunk > cfg.Budget:
		return nil, fmt.Errorf("%w: Config.ReserveChunk %d out of range 1..%d", ErrInvalidArgument, cfg.ReserveChunk, cfg.Budget)
	case cfg.CacheEntries < 0:
		return nil, fmt.Errorf("%w: Config.CacheEntries %d is negative", ErrInvalidArgument, cfg.CacheEntries)
	case cfg.CacheTTL < 0:
		return nil, fmt.Errorf("%w: Config.CacheTTL %v is negative", ErrInvalidArgument, cfg.CacheTTL)
	}
	if cfg.CacheEntries == 0 {
		cfg.CacheEntries = DefaultCacheEntries
	}
	if cfg.CacheTTL == 0 {
		cfg.CacheTTL = DefaultCacheTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := checkExecMode(ctx, pool); err != nil {
		return nil, err
	}
	if cfg.ReadPool != nil {
		if err := checkExecMode(ctx, cfg.ReadPool); err != nil {
			return nil, err
		}
	}
	if err := checkVersion(ctx, pool, cfg.Schema); err != nil {
		return nil, err
	}
	var rls bool
	if err := pool.QueryRow(ctx, `SELECT row_security_active($1::regclass)`, pgx.Identifier{cfg.Schema, "encrypted_secrets"}.Sanitize()).Scan(&rls); err != nil {
		return nil, fmt.Errorf("pgstore: check row-level security: %w", err)
	}
	// The hierarchy makes no call until used: with DirectKEK it only
	// unwraps data keys an earlier configuration wrapped under it.
	ik, err := hierarchy.New(hierarchy.Config{Pool: pool, Schema: cfg.Schema, KEK: kr, RotateAfter: cfg.IntermediateRotateAfter,
		CacheTTL: cfg.CacheTTL, Actor: cfg.Actor, Logger: cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	tn, err := newTenants(cfg)
	if err != nil {
		return nil, err
	}
	ps := append([]provider.KEKProvider{ik}, kr.Providers()...)
	if cfg.DirectKEK {
		ps = append(kr.Providers(), ik)
	}
	dek, err := provider.NewKeyring(ps[0], ps[1:]...)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	st := &Store{
		dek:     dek,
		ik:      ik,
		direct:  cfg.DirectKEK,
		rls:     rls,
		pool:    pool,
		db:      pool,
		schema:  cfg.Schema,
		q:       pgx.Identifier{cfg.Schema}.Sanitize(),
		keyring: kr,
		budget:  cfg.Budget,
		chunk:   cfg.ReserveChunk,
		cache:   envelope.NewKeyCache(cfg.CacheEntries, cfg.CacheTTL),
		actor:   cfg.Actor,
		log:     cfg.Logger,
		obs:     cfg.Observer,
		res:     &reservations{keys: map[scopeKey]*projectKey{}},
		tenants: tn,
	}
	if cfg.ReadPool != nil {
		st.read = cfg.ReadPool
	}
	return st, nil
}

// Migrate brings the Store's schema to the latest version; see the
// package-level Migrate.
func (s *Store) Migrate(ctx context.Context) error { return Migrate(ctx, s.pool, s.schema) }

// Close destroys the cached data keys and intermediate keys. It does not
// close the pool.
func (s *Store) Close() error {
	s.cache.Close()
	s.ik.Close()
	s.tenants.close()
	return nil
}

// Keyring returns the deployment's KEK keyring (Config.KEK).
func (s *Store) Keyring() *provider.Keyring { return s.keyring }

// DirectKEK reports Config.DirectKEK: whether data keys are wrapped
// under the KEK itself rather than under intermediate keys.
func (s *Store) DirectKEK() bool { return s.direct }

// Hierarchy returns the intermediate-key provider data keys are wrapped
// under (with Config.DirectKEK, the one that unwraps those an earlier
// configuration wrapped under it).
func (s *Store) Hierarchy() *hierarchy.Provider { return s.ik }

// Schema returns the (unquoted) schema name.
func (s *Store) Schema() string { return s.schema }

func checkProject(project string) error {
	if project == "" || len(project) > MaxProjectLen || !utf8.ValidString(project) || hasNUL(project) {
		return fmt.Errorf("%w: project id must be 1..%d bytes of UTF-8 without NUL", ErrInvalidArgument, MaxProjectLen)
	}
	return nil
}

func checkName(name string) error {
	if name == "" || len(name) > MaxNameLen || !utf8.ValidString(name) || hasNUL(name) {
		return fmt.Errorf("%w: secret name must be 1..%d bytes of UTF-8 without NUL", ErrInvalidArgument, MaxNameLen)
	}
	return nil
}

func hasNUL(s string) bool { return strings.IndexByte(s, 0) >= 0 }

// dataKeyOpts lifts envelope's per-process budget: the database counts
// every encryption under a data key (Config.Budget), across processes.
var dataKeyOpts = []envelope.Option{envelope.WithMaxMessages(envelope.MaxMessagesLimit), envelope.WithMaxAge(0)}

func uuidParam(id [16]byte) pgtype.UUID { return pgtype.UUID{Bytes: id, Valid: true} }

// cacheID is the cache key of data key id of project. The project is part
// of it so that a data_keys row relabelled to another project is never
// served from a key cached for the first: it must unwrap under its new
// project's wrap aad, which it does not. The id has a fixed length, so the
// concatenation is unambiguous.
func cacheID(project string, id [16]byte) string { return string(id[:]) + project }

// setProject is the first statement of every project-scoped batch: it names
// the project for row-level security, for the current transaction only.
const setProject = "SELECT set_config('keybroker.project_id', $1, true)"

// scoped runs queue's statements in one batch: one round trip and one
// implicit transaction. When row-level security applies to the Store's
// role, setProject comes first; otherwise it is left out, saving its cost.
func (s *Store) scoped(ctx context.Context, project string, queue func(b *pgx.Batch)) error {
	return s.scopedOn(ctx, s.pool, project, queue)
}

// scopedOn is scoped on db: the pool, or the caller's transaction (s.db).
func (s *Store) scopedOn(ctx context.Context, db DB, project string, queue func(b *pgx.Batch)) error {
	b := &pgx.Batch{}
	if s.rls {
		b.Queue(setProject, project)
	}
	queue(b)
	return db.SendBatch(ctx, b).Close()
}

// put is Put without the Observer.
func (s *Store) put(ctx context.Context, project, name string, value []byte) error {
	if err := checkProject(project); err != nil {
		return err
	}
	if err := checkName(name); err != nil {
		return err
	}
	if len(value) > MaxValueLen {
		return fmt.Errorf("%w: secret value is %d bytes, more than %d", ErrInvalidArgument, len(value), MaxValueLen)
	}
	aad := secretAAD(project, name)
	// The insert names the data key only if its row still exists, belongs
	// to the project and is not retired, reading it FOR KEY SHARE (the
	// lock the foreign key check takes anyway). Reencrypt locks the keys it
	// retires FOR UPDATE (and a destroy deletes them), which conflicts: a
	// Put racing them waits, re-checks the committed row and stores
	// nothing; it then redoes the encryption under a fresh reservation.
	// Budget reservations and rewraps (non-key updates) do not conflict. A
	// spent key is accepted: its reservations were granted within the
	// budget, and refusing them would make the holder of a key's last
	// reservation always retry.
	for attempt := 1; ; attempt++ {
		id, blob, nonce, err := s.seal(ctx, project, secretsScope, value, aad)
		if err != nil {
			return err
		}
		var stored bool
		err = s.scopedOn(ctx, s.db, project, func(b *pgx.Batch) {
			b.Queue(`INSERT INTO `+s.q+`.encrypted_secrets AS s (project_id, name, encrypted_data, nonce, data_key_id)
SELECT $1, $2, $3, $4, d.id FROM `+s.q+`.data_keys d WHERE d.id = $5 AND d.project_id = $1 AND d.state <> 'retired' FOR KEY SHARE
ON CONFLICT (project_id, name) DO UPDATE
SET encrypted_data = EXCLUDED.encrypted_data, nonce = EXCLUDED.nonce,
    data_key_id = EXCLUDED.data_key_id, updated_at = now()`,
				project, name, blob, nonce, uuidParam(id)).Exec(func(ct pgconn.CommandTag) error { stored = ct.RowsAffected() == 1; return nil })
		})
		if err != nil {
			return fmt.Errorf("pgstore: put %q: %w", name, err)
		}
		if stored {
			return nil
		}
		s.forget(project, secretsScope, id)
		if attempt == maxWriteAttempts {
			return fmt.Errorf("%w: put %q in project %q: data key retired or removed on each of %d attempts", ErrNoActiveKey, name, project, attempt)
		}
	}
}

// seal encrypts plaintext under the project's active data key, taking one
// encryption from this process's reservation.
func (s *Store) seal(ctx context.Context, project, scope string, plaintext, aad []byte) (id [16]byte, blob, nonce []byte, err error) {
	id, dk, release, err := s.reserve(ctx, project, scope)
	if err != nil {
		return id, nil, nil, err
	}
	blob, err = envelope.SealWithKeyID(dk, id[:], plaintext, aad)
	release()
	if err != nil {
		return id, nil, nil, fmt.Errorf("pgstore: encrypt: %w", err)
	}
	h, err := envelope.ParseHeader(blob)
	if err != nil {
		return id, nil, nil, fmt.Errorf("pgstore: encrypt: %w", err)
	}
	return id, blob, h.Nonce, nil
}

// get is Get without the Observer.
func (s *Store) get(ctx context.Context, project, name string) ([]byte, error) {
	if err := checkProject(project); err != nil {
		return nil, err
	}
	if err := checkName(name); err != nil {
		return nil, err
	}
	if s.read != nil {
		if pt, ok := s.getReplica(ctx, project, name); ok {
			return pt, nil
		}
	}
	var (
		blob, nonce, wrapped []byte
		id                   pgtype.UUID
		prov, keyID, version pgtype.Text
		found                bool
	)
	// The data key's wrapped form comes in the same round trip, so a cache
	// miss costs a local unwrap under the key hierarchy, not a second
	// query; it is used only on a miss (open). The joins are primary-key
	// lookups; a data key row that is missing leaves wrapped NULL, and open
	// then reads it, finds nothing and reports ErrDecrypt.
	err := s.scopedOn(ctx, s.db, project, func(b *pgx.Batch) {
		b.Queue(`SELECT s.encrypted_data, s.nonce, s.data_key_id, d.wrapped_dek, k.provider, k.key_id, k.key_version
FROM `+s.q+`.encrypted_secrets s
LEFT JOIN `+s.q+`.data_keys d ON d.id = s.data_key_id AND d.project_id = s.project_id
LEFT JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE s.project_id = $1 AND s.name = $2`,
			project, name).QueryRow(func(r pgx.Row) error {
			err := r.Scan(&blob, &nonce, &id, &wrapped, &prov, &keyID, &version)
			if errors.Is(err, pgx.ErrNoRows) {
				return nil
			}
			found = err == nil
			return err
		})
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: get %q: %w", name, err)
	}
	if !found {
		return nil, fmt.Errorf("%w: %q in project %q", ErrNotFound, name, project)
	}
	var wk *provider.WrappedKey
	if wrapped != nil && prov.Valid && keyID.Valid && version.Valid {
		wk = &provider.WrappedKey{Provider: prov.String, KeyID: keyID.String, Version: version.String, Ciphertext: wrapped}
	}
	pt, err := s.open(ctx, project, id.Bytes, wk, blob, nonce, secretAAD(project, name))
	if err != nil {
		return nil, fmt.Errorf("pgstore: get %q: %w", name, err)
	}
	return pt, nil
}

// open checks that blob's header names data key id and carries nonce, then
// decrypts it with the data key (cached, or unwrapped from wk).
func (s *Store) open(ctx context.Context, project string, id [16]byte, wk *provider.WrappedKey, blob, nonce, aad []byte) ([]byte, error) {
	h, err := envelope.ParseHeader(blob)
	if err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare(h.KeyID, id[:]) != 1 || subtle.ConstantTimeCompare(h.Nonce, nonce) != 1 {
		return nil, envelope.ErrDecrypt
	}
	dk, release, err := s.dataKey(ctx, project, id, wk)
	if err != nil {
		return nil, err
	}
	defer release()
	return envelope.OpenWithKey(dk, blob, aad)
}

// dataKey returns the unwrapped data key id of project from the cache,
// unwrapping wk (or, when wk is nil, the row read from data_keys) on a miss,
// and the function releasing the cache's lease on it. A data key that does
// not unwrap under project and id (its wrapped form or kek row altered,
// moved or missing, a key version the keyring lacks) is the bare
// envelope.ErrDecrypt, exactly what an altered ciphertext gives, so the
// two cannot be told apart; an unreachable key service, access denied, a
// disabled key and ctx's errors are returned as they are
// (envelope.UnwrapFailure), as are database errors.
func (s *Store) dataKey(ctx context.Context, project string, id [16]byte, wk *provider.WrappedKey) (*envelope.DataKey, func(), error) {
	return s.cache.Get(ctx, cacheID(project, id), func(ctx context.Context) (*envelope.DataKey, error) {
		if wk == nil {
			var err error
			if wk, err = s.loadWrapped(ctx, project, id); err != nil {
				return nil, err
			}
		}
		kp, err := s.unwrapperFor(ctx, project, wk)
		if err != nil {
			return nil, err
		}
		dk, err := envelope.UnwrapDataKey(ctx, kp, wk, wrapAAD(project, id), dataKeyOpts...)
		if err != nil {
			return nil, envelope.UnwrapFailure(err)
		}
		return dk, nil
	})
}

// loadWrapped reads data key id of project and the kek row that wrapped
// it. No such row of that project (a foreign key bypassed, a constraint
// dropped, a partial restore, a row relabelled to another project) is
// envelope.ErrDecrypt: the secret naming it cannot be decrypted.
func (s *Store) loadWrapped(ctx context.Context, project string, id [16]byte) (*provider.WrappedKey, error) {
	wk := &provider.WrappedKey{}
	var found bool
	err := s.scoped(ctx, project, func(b *pgx.Batch) {
		b.Queue(`SELECT d.wrapped_dek, k.provider, k.key_id, k.key_version
FROM `+s.q+`.data_keys d JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE d.id = $1 AND d.project_id = $2`, uuidParam(id), project).QueryRow(func(r pgx.Row) error {
			err := r.Scan(&wk.Ciphertext, &wk.Provider, &wk.KeyID, &wk.Version)
			if errors.Is(err, pgx.ErrNoRows) {
				return nil
			}
			found = err == nil
			return err
		})
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: load data key: %w", err)
	}
	if !found {
		return nil, envelope.ErrDecrypt
	}
	return wk, nil
}

// Delete removes the secret name of project, or returns an error matching
// ErrNotFound.
func (s *Store) Delete(ctx context.Context, project, name string) error {
	if err := checkProject(project); err != nil {
		return err
	}
	if err := checkName(name); err != nil {
		return err
	}
	var n int64
	err := s.scopedOn(ctx, s.db, project, func(b *pgx.Batch) {
		b.Queue(`DELETE FROM `+s.q+`.encrypted_secrets WHERE project_id = $1 AND name = $2`, project, name).
			Exec(func(ct pgconn.CommandTag) error { n = ct.RowsAffected(); return nil })
	})
	if err != nil {
		return fmt.Errorf("pgstore: delete %q: %w", name, err)
	}
	if n == 0 {
		return fmt.Errorf("%w: %q in project %q", ErrNotFound, name, project)
	}
	return nil
}

// SecretInfo describes a stored secret without its value.
type SecretInfo struct {
	Name      string
	DataKeyID [16]byte
	CreatedAt time.Time
	UpdatedAt time.Time
}

// List returns the project's secrets sorted by name, without values.
func (s *Store) List(ctx context.Context, project string) ([]SecretInfo, error) {
	if err := checkProject(project); err != nil {
		return nil, err
	}
	var out []SecretInfo
	err := s.scopedOn(ctx, s.db, project, func(b *pgx.Batch) {
		b.Queue(`SELECT name, data_key_id, created_at, updated_at FROM `+s.q+`.encrypted_secrets
WHERE project_id = $1 ORDER BY name`, project).Query(func(rows pgx.Rows) error {
			var (
				si SecretInfo
				id pgtype.UUID
			)
			_, err := pgx.ForEachRow(rows, []any{&si.Name, &id, &si.CreatedAt, &si.UpdatedAt}, func() error {
				si.DataKeyID = id.Bytes
				out = append(out, si)
				return nil
			})
			return err
		})
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: list: %w", err)
	}
	return out, nil
}

// WithProject runs fn in a transaction in which the keybroker.project_id
// setting names project, so row-level security (see the package doc)
// limits fn's statements to that project's rows when the session's role is
// subject to it. The transaction commits if fn returns nil and rolls back
// otherwise. However fn ends (nil, an error, a panic) and whatever it ran
// (set_config(..., false), SET, its own COMMIT), the pooled connection goes
// back to the pool with keybroker.project_id reset for the session, or is
// closed if it cannot be reset: the next user of the connection never
// inherits a project.
func WithProject(ctx context.Context, pool *pgxpool.Pool, project string, fn func(pgx.Tx) error) error {
	if err := checkProject(project); err != nil {
		return err
	}
	if pool == nil || fn == nil {
		return fmt.Errorf("%w: nil pool or function", ErrInvalidArgument)
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: acquire connection: %w", err)
	}
	defer releaseUnscoped(ctx, conn)
	return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, setProject, project); err != nil {
			return fmt.Errorf("pgstore: set project: %w", err)
		}
		return fn(tx)
	})
}

// releaseUnscoped returns conn to its pool after resetting the session's
// keybroker.project_id. It runs after the transaction has ended (committed,
// rolled back, or abandoned by a panic), outside any transaction, so the
// RESET cannot be undone by one; a connection on which it fails (broken,
// busy, still in a transaction) is closed, and the pool then drops it.
func releaseUnscoped(ctx context.Context, conn *pgxpool.Conn) {
	ctx = context.WithoutCancel(ctx)
	if _, err := conn.Exec(ctx, "RESET keybroker.project_id"); err != nil {
		conn.Conn().Close(ctx)
	}
	conn.Release()
}

// project returns this process's reservation state for project's data
// keys of scope.
func (s *Store) project(project, scope string) *projectKey {
	s.res.mu.Lock()
	defer s.res.mu.Unlock()
	k := scopeKey{project, scope}
	pk := s.res.keys[k]
	if pk == nil {
		pk = &projectKey{}
		s.res.keys[k] = pk
	}
	return pk
}

// forget drops this process's reservation on data key id of project's
// scope.
func (s *Store) forget(project, scope string, id [16]byte) {
	pk := s.project(project, scope)
	pk.mu.Lock()
	if pk.valid && pk.id == id {
		pk.valid = false
	}
	pk.mu.Unlock()
	s.cache.Remove(cacheID(project, id))
}

// reserve takes one encryption from the budget of project's active data
// key, creating the key when the project has none or its key is spent.
// The caller must call the returned release function.
func (s *Store) reserve(ctx context.Context, project, scope string) ([16]byte, *envelope.DataKey, func(), error) {
	pk := s.project(project, scope)
	pk.mu.Lock()
	defer pk.mu.Unlock()
	reloaded := false
	for {
		if pk.valid && pk.next < pk.end {
			pk.next++
			dk, release, err := s.dataKey(ctx, project, pk.id, nil)
			if errors.Is(err, envelope.ErrDecrypt) && !reloaded {
				// The key's row may be gone (deleted behind pgstore's back):
				// ask the database for a reservation again, once, which
				// finds or creates the project's active key. Any other
				// error (a lost connection, an unreachable key service) is
				// the caller's to see.
				reloaded, pk.valid = true, false
				continue
			}
			if err != nil {
				return pk.id, nil, nil, fmt.Errorf("pgstore: active data key: %w", err)
			}
			return pk.id, dk, release, nil
		}
		if pk.valid {
			granted, err := s.reserveChunk(ctx, project, pk.id)
			if err != nil {
				return pk.id, nil, nil, err
			}
			if granted > 0 {
				pk.next, pk.end = 0, granted
				continue
			}
			pk.valid = false
		}
		id, err := s.activeKey(ctx, project, scope)
		if err != nil {
			return id, nil, nil, err
		}
		pk.id, pk.valid, pk.next, pk.end = id, true, 0, 0
	}
}

// reserveChunk reserves up to s.chunk encryptions of data key id and
// returns how many it got: zero when the key is spent or no longer active,
// in which case a spent key is marked so.
func (s *Store) reserveChunk(ctx context.Context, project string, id [16]byte) (int64, error) {
	var granted int64
	err := s.scoped(ctx, project, func(b *pgx.Batch) {
		// The key's own budget (set by its creator) caps every process's
		// reservation, whatever that process's Config.Budget. The row is
		// locked by a statement of its own before the UPDATE (the batch is
		// one implicit transaction), so the count read is the one the
		// UPDATE changes: an UPDATE joining the row to a locking subquery
		// of itself locked the one tuple twice in one statement, which
		// deadlocked two concurrent reservations of the same key
		// (SQLSTATE 40P01).
		var before, after int64
		var locked, updated bool
		b.Queue(`SELECT messages FROM `+s.q+`.data_keys WHERE id = $1 FOR NO KEY UPDATE`, uuidParam(id)).QueryRow(func(r pgx.Row) error {
			err := r.Scan(&before)
			if errors.Is(err, pgx.ErrNoRows) {
				return nil
			}
			locked = err == nil
			return err
		})
		b.Queue(`UPDATE `+s.q+`.data_keys SET messages = LEAST(messages + $2, budget, $3)
WHERE id = $1 AND state = 'active' AND messages < LEAST(budget, $3)
RETURNING messages`, uuidParam(id), s.chunk, s.budget).QueryRow(func(r pgx.Row) error {
			err := r.Scan(&after)
			if errors.Is(err, pgx.ErrNoRows) {
				return nil
			}
			updated = err == nil
			if updated && locked {
				granted = after - before
			}
			return err
		})
		b.Queue(`UPDATE `+s.q+`.data_keys SET state = 'spent' WHERE id = $1 AND state = 'active' AND messages >= LEAST(budget, $2)`, uuidParam(id), s.budget)
	})
	if err != nil {
		return 0, fmt.Errorf("pgstore: reserve data key budget: %w", err)
	}
	return granted, nil
}

// activeKey returns the project's active data key, creating one if there
// is none. Concurrent creators race on the one-active-key index; losers
// destroy their key and look again (the winner's key may already be spent
// when the budget is small, hence the loop).
func (s *Store) activeKey(ctx context.Context, project, scope string) ([16]byte, error) {
	var id [16]byte
	for range 16 {
		found, err := s.findActive(ctx, project, scope, &id)
		if err != nil || found {
			return id, err
		}
		created, err := s.createKey(ctx, project, scope, &id)
		if err != nil || created {
			return id, err
		}
	}
	return id, fmt.Errorf("pgstore: project %q: could not get an active data key: too much contention", project)
}

// createKey makes, wraps and stores a new active data key for project,
// unless another one became active first (created false). When the
// database refuses the key because its KEK version is retired (another
// process retired it), the keyring is refreshed and a fresh key wrapped
// once more; a second refusal is ErrRetiredVersion.
func (s *Store) createKey(ctx context.Context, project, scope string, id *[16]byte) (created bool, err error) {
	created, err = s.tryCreateKey(ctx, project, scope, id)
	if !errors.Is(err, ErrRetiredVersion) {
		return created, err
	}
	s.log.Warn("pgstore: primary KEK version is retired; refreshing the keyring", "project", project)
	if rerr := s.dek.Refresh(ctx); rerr != nil {
		return false, fmt.Errorf("%w (refreshing the keyring failed: %v)", err, rerr)
	}
	created, err = s.tryCreateKey(ctx, project, scope, id)
	if errors.Is(err, ErrRetiredVersion) {
		return false, fmt.Errorf("%w, still after refreshing the keyring", err)
	}
	return created, err
}

func (s *Store) tryCreateKey(ctx context.Context, project, scope string, id *[16]byte) (created bool, err error) {
	if _, err := rand.Read(id[:]); err != nil {
		return false, fmt.Errorf("pgstore: new data key id: %w", err)
	}
	wrapper, err := s.wrapperFor(ctx, project)
	if err != nil {
		return false, err
	}
	dk, wk, err := envelope.NewDataKey(ctx, wrapper, wrapAAD(project, *id), dataKeyOpts...)
	if err != nil {
		return false, fmt.Errorf("pgstore: new data key: %w", err)
	}
	kekID, err := s.kekRow(ctx, wk)
	if err != nil {
		dk.Destroy()
		return false, err
	}
	err = s.scoped(ctx, project, func(b *pgx.Batch) {
		b.Queue(`INSERT INTO `+s.q+`.data_keys (id, project_id, kek_id, wrapped_dek, budget, scope) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (project_id, scope) WHERE state = 'active' DO NOTHING`, uuidParam(*id), project, kekID, wk.Ciphertext, s.budget, scope).
			Exec(func(ct pgconn.CommandTag) error { created = ct.RowsAffected() == 1; return nil })
		b.Queue(`INSERT INTO `+s.q+`.key_events (event, project_id, kek_id, data_key_id, count, actor)
SELECT 'dek.create', $1, $2, $3, 1, $4 WHERE EXISTS (SELECT 1 FROM `+s.q+`.data_keys WHERE id = $3)`,
			project, kekID, uuidParam(*id), s.actorParam())
	})
	if err != nil || !created {
		dk.Destroy()
		if pgCode(err) == sqlstateTenant {
			// The project's binding changed since wrapperFor read it: the
			// caller looks again, and the next attempt reads it anew.
			s.log.Info("pgstore: project's KEK binding changed while creating a data key; retrying", "project", project)
			return false, nil
		}
		if pgCode(err) == sqlstateRetired {
			return false, fmt.Errorf("%w: %s@%s", ErrRetiredVersion, wk.Ref(), wk.Version)
		}
		if serr := shreddedError(err, project); serr != nil {
			return false, serr
		}
		if err != nil {
			return false, fmt.Errorf("pgstore: store new data key: %w", err)
		}
		return false, nil
	}
	// Seed the cache with the key we hold rather than unwrapping it again.
	_, release, err := s.cache.Get(ctx, cacheID(project, *id), func(context.Context) (*envelope.DataKey, error) { return dk, nil })
	if err != nil {
		dk.Destroy()
		return false, fmt.Errorf("pgstore: %w", err)
	}
	release()
	s.log.Info("pgstore: created data key", "project", project, "kek", wk.Ref().String(), "kek_version", wk.Version)
	return true, nil
}

func (s *Store) findActive(ctx context.Context, project, scope string, id *[16]byte) (bool, error) {
	var found bool
	err := s.scoped(ctx, project, func(b *pgx.Batch) {
		b.Queue(`SELECT id FROM `+s.q+`.data_keys WHERE project_id = $1 AND scope = $2 AND state = 'active'`, project, scope).
			QueryRow(func(r pgx.Row) error {
				var u pgtype.UUID
				err := r.Scan(&u)
				if errors.Is(err, pgx.ErrNoRows) {
					return nil
				}
				*id, found = u.Bytes, err == nil
				return err
			})
	})
	if err != nil {
		return false, fmt.Errorf("pgstore: find active data key: %w", err)
	}
	return found, nil
}

// kekRow returns the id of the kek row for wk's provider, key and version,
// recording it first if it is new.
func (s *Store) kekRow(ctx context.Context, wk *provider.WrappedKey) (int64, error) {
	return s.kekRowFor(ctx, s.pool, wk.Provider, wk.KeyID, wk.Version)
}

type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// kekRowFor returns the id of the kek row for the version through
// record_kek (migration 003), which inserts a new row with its kek.record
// event: the only way a role other than the owner can create one.
func (s *Store) kekRowFor(ctx context.Context, q querier, prov, keyID, version string) (int64, error) {
	var id int64
	if err := q.QueryRow(ctx, `SELECT `+s.q+`.record_kek($1, $2, $3, $4)`, prov, keyID, version, s.actorParam()).Scan(&id); err != nil {
		return 0, fmt.Errorf("pgstore: record kek version: %w", err)
	}
	return id, nil
}

func (s *Store) actorParam() pgtype.Text { return pgtype.Text{String: s.actor, Valid: s.actor != ""} }
