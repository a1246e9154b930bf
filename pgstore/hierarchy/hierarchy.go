package hierarchy

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/provider"
)

// Scheme is the provider name recorded in every WrappedKey (and kek row)
// of a data key wrapped under an intermediate key.
const Scheme = "intermediate"

// Defaults for Config fields left zero.
const (
	// DefaultKeyID names the deployment's chain of intermediate keys.
	DefaultKeyID = "default"
	// DefaultSchema is pgstore.DefaultSchema.
	DefaultSchema = "keybroker"
	// DefaultRotateAfter is the age of the current intermediate key after
	// which the next Wrap makes a new version.
	DefaultRotateAfter = 30 * 24 * time.Hour
	// DefaultCacheTTL is how long an unwrapped intermediate key, and what
	// this process knows of the current version, is kept before the
	// database (and, for the key, the key service) is asked again.
	DefaultCacheTTL = 10 * time.Minute
)

// MaxKeyIDLen bounds Config.KeyID (the table's CHECK).
const MaxKeyIDLen = 128

// Sizes of the wrapped form of a data key under an intermediate key.
const (
	formatVersion = 1
	keySize       = 32
	nonceSize     = 12
	tagSize       = 16
)

// Purpose strings of the two associated data layouts (docs/STORAGE.md).
const (
	ikPurpose   = "keybroker/ik/v1"     // an IK wrapped under the KEK
	wrapPurpose = "keybroker/ik-dek/v1" // a data key wrapped under an IK
)

// ErrClosed is returned by a Provider after Close.
var ErrClosed = errors.New("hierarchy: closed")

// Config configures a Provider.
type Config struct {
	// Pool reaches the database holding pgstore's schema (migrated to a
	// version that has intermediate_keys). Required.
	Pool *pgxpool.Pool
	// Schema is the (unquoted) pgstore schema; DefaultSchema when empty.
	Schema string
	// KeyID names the chain of intermediate keys, 1..MaxKeyIDLen bytes;
	// DefaultKeyID when empty. A chain is wrapped under one KEK: a
	// deployment uses one, and a project bound to another KEK would use a
	// chain of its own.
	KeyID string
	// KEK wraps new intermediate keys and unwraps stored ones: the
	// deployment's provider, a *provider.Keyring while moving between
	// backends. Required.
	KEK provider.KEKProvider
	// RotateAfter is the age of the current version after which Wrap
	// makes the next one; DefaultRotateAfter when zero, never (Rotate
	// only) when negative.
	RotateAfter time.Duration
	// CacheTTL bounds how long an unwrapped intermediate key is kept in
	// memory, and how long the current version read from the database is
	// trusted; DefaultCacheTTL when zero.
	CacheTTL time.Duration
	// Actor is recorded in key_events. Optional.
	Actor string
	// Logger receives one line per key created, rotated or rewrapped.
	// Discarded when nil.
	Logger *slog.Logger
}

// Provider is a provider.KEKProvider whose keys are the intermediate keys
// of one chain. It also implements provider.Rotator, Rewrapper (locally),
// Describer, Refresher and Retirer. Safe for concurrent use, by any number
// of processes sharing the database.
type Provider struct {
	pool        *pgxpool.Pool
	q           string
	keyID       string
	kek         *provider.Keyring
	rotateAfter time.Duration
	ttl         time.Duration
	actor       pgtype.Text
	log         *slog.Logger
	now         func() time.Time

	mu      sync.RWMutex
	keys    map[uint32]*ikey // unwrapped, by version
	cur     uint32           // the current version as last read; 0: not read
	curDue  time.Time        // when cur is due for rotation (zero: never)
	curRead time.Time        // when cur was read
	closed  bool

	// load serialises reads of the table and calls to the key service, so
	// concurrent misses make one call, not one each.
	load sync.Mutex
}

// ikey is one unwrapped intermediate key: the AES-GCM key schedule only,
// the raw bytes are cleared once it is built.
type ikey struct {
	aead   cipher.AEAD
	loaded time.Time
}

var (
	_ provider.KEKProvider = (*Provider)(nil)
	_ provider.Rotator     = (*Provider)(nil)
	_ provider.Rewrapper   = (*Provider)(nil)
	_ provider.Describer   = (*Provider)(nil)
	_ provider.Refresher   = (*Provider)(nil)
	_ provider.Retirer     = (*Provider)(nil)
)

// New returns a Provider. It makes no call: the first Wrap reads the
// current version, creating version 1 if the chain has none.
func New(cfg Config) (*Provider, error) {
	if cfg.Pool == nil {
		return nil, errors.New("hierarchy: Config.Pool is nil")
	}
	if cfg.KEK == nil {
		return nil, errors.New("hierarchy: Config.KEK is nil")
	}
	if cfg.Schema == "" {
		cfg.Schema = DefaultSchema
	}
	if cfg.KeyID == "" {
		cfg.KeyID = DefaultKeyID
	}
	if len(cfg.KeyID) > MaxKeyIDLen {
		return nil, fmt.Errorf("hierarchy: Config.KeyID is %d bytes, more than %d", len(cfg.KeyID), MaxKeyIDLen)
	}
	if cfg.CacheTTL < 0 {
		return nil, fmt.Errorf("hierarchy: Config.CacheTTL %v is negative", cfg.CacheTTL)
	}
	if cfg.RotateAfter == 0 {
		cfg.RotateAfter = DefaultRotateAfter
	}
	if cfg.CacheTTL == 0 {
		cfg.CacheTTL = DefaultCacheTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	kr, ok := cfg.KEK.(*provider.Keyring)
	if !ok {
		var err error
		if kr, err = provider.NewKeyring(cfg.KEK); err != nil {
			return nil, fmt.Errorf("hierarchy: %w", err)
		}
	}
	return &Provider{
		pool: cfg.Pool, q: pgx.Identifier{cfg.Schema}.Sanitize(), keyID: cfg.KeyID, kek: kr,
		rotateAfter: cfg.RotateAfter, ttl: cfg.CacheTTL,
		actor: pgtype.Text{String: cfg.Actor, Valid: cfg.Actor != ""}, log: cfg.Logger,
		now: time.Now, keys: map[uint32]*ikey{},
	}, nil
}

// Ref is {Scheme, Config.KeyID}.
func (p *Provider) Ref() provider.KeyRef { return provider.KeyRef{Provider: Scheme, KeyID: p.keyID} }

// KEK returns the keyring intermediate keys are wrapped under.
func (p *Provider) KEK() *provider.Keyring { return p.kek }

// Close drops the unwrapped intermediate keys (the Go runtime cannot
// promise their key schedules are overwritten; see envelope's doc, Key
// material in memory). Later calls fail with ErrClosed.
func (p *Provider) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	clear(p.keys)
	p.cur = 0
}

func opErr(op string, kind, err error) error {
	return &provider.Error{Provider: Scheme, Op: op, Kind: kind, Err: err}
}

// dbErr is a database error reading or writing intermediate keys, as the
// provider's error: ErrAccessDenied when the role lacks the privilege
// (the grants in pgstore's doc), else ErrUnavailable (the database may be
// back on a retry). Never the bare error, which pgstore would take for a
// corrupt key.
func dbErr(op, what string, err error) error {
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "42501" {
		return opErr(op, provider.ErrAccessDenied, fmt.Errorf("%s: %w", what, err))
	}
	return opErr(op, provider.ErrUnavailable, fmt.Errorf("%s: %w", what, err))
}

// ikAAD is the associated data an IK is wrapped under the KEK with:
// u32(15) "keybroker/ik/v1" u32(len(key_id)) key_id u32(4) u32(version).
func ikAAD(keyID string, version uint32) []byte {
	b := appendField(nil, []byte(ikPurpose))
	b = appendField(b, []byte(keyID))
	return appendField(b, binary.BigEndian.AppendUint32(nil, version))
}

// wrapAD is the GCM additional data of a data key wrapped under version of
// chain keyID: u32(19) "keybroker/ik-dek/v1" u32(len(key_id)) key_id
// u32(4) u32(version) u32(len(aad)) aad, where aad is the caller's (for
// pgstore, the wrap-aad of docs/STORAGE.md).
func wrapAD(keyID string, version uint32, aad []byte) []byte {
	b := make([]byte, 0, 4+len(wrapPurpose)+4+len(keyID)+8+4+len(aad))
	b = appendField(b, []byte(wrapPurpose))
	b = appendField(b, []byte(keyID))
	b = appendField(b, binary.BigEndian.AppendUint32(nil, version))
	return appendField(b, aad)
}

func appendField(b, f []byte) []byte {
	return append(binary.BigEndian.AppendUint32(b, uint32(len(f))), f...)
}

func newAEAD(key []byte) (cipher.AEAD, error) {
	if len(key) != keySize {
		return nil, fmt.Errorf("intermediate key of %d bytes, want %d", len(key), keySize)
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// Wrap wraps dek under the current intermediate key (creating version 1,
// or the next version when the current one is older than RotateAfter):
// 01 || nonce (12 random bytes) || AES-256-GCM(dek) || tag, bound to the
// chain, the version and aad. It calls the key service only when this
// process has not got the current key unwrapped (once per CacheTTL) or
// makes a new one.
func (p *Provider) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	if err := provider.CheckDEK(Scheme, dek); err != nil {
		return nil, err
	}
	v, k, err := p.current(ctx)
	if err != nil {
		return nil, err
	}
	return p.seal(v, k, dek, aad)
}

func (p *Provider) seal(v uint32, k *ikey, dek, aad []byte) (*provider.WrappedKey, error) {
	out := make([]byte, 1+nonceSize, 1+nonceSize+len(dek)+tagSize)
	out[0] = formatVersion
	if _, err := rand.Read(out[1:]); err != nil {
		return nil, opErr("wrap", nil, err)
	}
	out = k.aead.Seal(out, out[1:1+nonceSize], dek, wrapAD(p.keyID, v, aad))
	return &provider.WrappedKey{Provider: Scheme, KeyID: p.keyID, Version: strconv.FormatUint(uint64(v), 10), Ciphertext: out}, nil
}

// Unwrap unwraps a data key wrapped by Wrap (in any process). A version
// the table no longer holds is ErrKeyNotFound; altered bytes, another
// aad, chain or version are ErrInvalidCiphertext; the key service's
// errors unwrapping the intermediate key are returned as they are
// (errors.Is finds their kind).
func (p *Provider) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	return p.open(ctx, "unwrap", wk, aad)
}

func (p *Provider) open(ctx context.Context, op string, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	if err := provider.CheckWrappedKey(p.Ref(), op, wk); err != nil {
		return nil, err
	}
	v, ok := parseVersion(wk.Version)
	ct := wk.Ciphertext
	if !ok || len(ct) < 1+nonceSize+provider.MinDEKLen+tagSize || len(ct) > 1+nonceSize+provider.MaxDEKLen+tagSize || ct[0] != formatVersion {
		return nil, opErr(op, provider.ErrInvalidCiphertext, errors.New("malformed wrapped key"))
	}
	k, err := p.version(ctx, op, v)
	if err != nil {
		return nil, err
	}
	dek, err := k.aead.Open(nil, ct[1:1+nonceSize], ct[1+nonceSize:], wrapAD(p.keyID, v, aad))
	if err != nil {
		return nil, opErr(op, provider.ErrInvalidCiphertext, errors.New("authentication failed"))
	}
	return dek, nil
}

// Rewrap re-encrypts wk under the current intermediate key in this
// process, without the key service when both keys are unwrapped already:
// this is what makes rewrapping data keys to a new intermediate key fast.
func (p *Provider) Rewrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) (*provider.WrappedKey, error) {
	dek, err := p.open(ctx, "rewrap", wk, aad)
	if err != nil {
		return nil, err
	}
	defer provider.Clear(dek)
	v, k, err := p.current(ctx)
	if err != nil {
		return nil, err
	}
	return p.seal(v, k, dek, aad)
}

func parseVersion(s string) (uint32, bool) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 0 || strconv.FormatUint(n, 10) != s {
		return 0, false
	}
	return uint32(n), true
}

func (p *Provider) fresh(k *ikey, now time.Time) bool { return k != nil && now.Sub(k.loaded) < p.ttl }

// current returns the current version and its key, reading the table
// (and creating or rotating) when what this process knows is older than
// CacheTTL or due for rotation.
func (p *Provider) current(ctx context.Context) (uint32, *ikey, error) {
	if v, k, ok, err := p.cachedCurrent(); ok || err != nil {
		return v, k, err
	}
	p.load.Lock()
	defer p.load.Unlock()
	if v, k, ok, err := p.cachedCurrent(); ok || err != nil {
		return v, k, err
	}
	for range 8 {
		row, found, err := p.readCurrent(ctx)
		if err != nil {
			return 0, nil, err
		}
		if found && !row.due {
			k, err := p.unwrapRow(ctx, "wrap", row)
			if err != nil {
				return 0, nil, err
			}
			p.setCurrent(row)
			return row.version, k, nil
		}
		next := uint32(1)
		if found {
			next = row.version + 1
		}
		if _, err := p.create(ctx, next); err != nil {
			return 0, nil, err
		}
		// Made by this call or by another process meanwhile: read again.
	}
	return 0, nil, opErr("wrap", provider.ErrUnavailable, errors.New("intermediate key: too much contention creating a version"))
}

func (p *Provider) cachedCurrent() (uint32, *ikey, bool, error) {
	now := p.now()
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closed {
		return 0, nil, false, ErrClosed
	}
	if p.cur == 0 || now.Sub(p.curRead) >= p.ttl || (!p.curDue.IsZero() && !now.Before(p.curDue)) {
		return 0, nil, false, nil
	}
	k := p.keys[p.cur]
	if !p.fresh(k, now) {
		return 0, nil, false, nil
	}
	return p.cur, k, true, nil
}

func (p *Provider) setCurrent(r row) {
	now := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cur, p.curRead, p.curDue = r.version, now, time.Time{}
	if p.rotateAfter > 0 {
		// The row's age as the database measured it, so processes with
		// skewed clocks agree on when a version is due.
		p.curDue = now.Add(p.rotateAfter - r.age)
	}
}

// row is one intermediate_keys row with the kek row that wrapped it.
type row struct {
	version uint32
	wk      provider.WrappedKey
	kekID   int64
	age     time.Duration
	due     bool
}

func (p *Provider) rowQuery(where string) string {
	return `SELECT i.version, i.wrapped_key, k.provider, k.key_id, k.key_version, i.kek_id,
  extract(epoch FROM now() - i.created_at)::float8
FROM ` + p.q + `.intermediate_keys i JOIN ` + p.q + `.kek k ON k.id = i.kek_id
WHERE i.key_id = $1 ` + where
}

func (p *Provider) scanRow(r pgx.Row) (row, error) {
	var (
		x   row
		v   int32
		age float64
	)
	err := r.Scan(&v, &x.wk.Ciphertext, &x.wk.Provider, &x.wk.KeyID, &x.wk.Version, &x.kekID, &age)
	x.version = uint32(v)
	x.age = time.Duration(age * float64(time.Second))
	x.due = p.rotateAfter > 0 && x.age >= p.rotateAfter
	return x, err
}

func (p *Provider) readCurrent(ctx context.Context) (row, bool, error) {
	r, err := p.scanRow(p.pool.QueryRow(ctx, p.rowQuery("ORDER BY i.version DESC LIMIT 1"), p.keyID))
	if errors.Is(err, pgx.ErrNoRows) {
		return r, false, nil
	}
	if err != nil {
		return r, false, dbErr("wrap", "read current intermediate key", err)
	}
	return r, true, nil
}

// version returns the unwrapped key of version v, reading and unwrapping
// it on a miss.
func (p *Provider) version(ctx context.Context, op string, v uint32) (*ikey, error) {
	now := p.now()
	p.mu.RLock()
	k, closed := p.keys[v], p.closed
	p.mu.RUnlock()
	if closed {
		return nil, ErrClosed
	}
	if p.fresh(k, now) {
		return k, nil
	}
	p.load.Lock()
	defer p.load.Unlock()
	p.mu.RLock()
	k = p.keys[v]
	p.mu.RUnlock()
	if p.fresh(k, p.now()) {
		return k, nil
	}
	r, err := p.scanRow(p.pool.QueryRow(ctx, p.rowQuery("AND i.version = $2"), p.keyID, int32(min(v, math.MaxInt32))))
	if errors.Is(err, pgx.ErrNoRows) {
		p.drop(v)
		return nil, opErr(op, provider.ErrKeyNotFound, fmt.Errorf("intermediate key %s@%d does not exist (retired?)", p.keyID, v))
	}
	if err != nil {
		return nil, dbErr(op, "read intermediate key", err)
	}
	return p.unwrapRow(ctx, op, r)
}

func (p *Provider) drop(v uint32) {
	p.mu.Lock()
	delete(p.keys, v)
	p.mu.Unlock()
}

// unwrapRow unwraps r's key with the KEK (unless this process holds it
// unwrapped and fresh) and caches it. p.load must be held.
func (p *Provider) unwrapRow(ctx context.Context, op string, r row) (*ikey, error) {
	now := p.now()
	p.mu.RLock()
	k := p.keys[r.version]
	p.mu.RUnlock()
	if p.fresh(k, now) {
		return k, nil
	}
	raw, err := p.kek.Unwrap(ctx, &r.wk, ikAAD(p.keyID, r.version))
	if err != nil {
		return nil, opErr(op, nil, fmt.Errorf("unwrap intermediate key %s@%d: %w", p.keyID, r.version, err))
	}
	return p.keep(r.version, raw, now)
}

// keep builds the key schedule of raw, clears raw and caches the key.
func (p *Provider) keep(v uint32, raw []byte, now time.Time) (*ikey, error) {
	defer provider.Clear(raw)
	a, err := newAEAD(raw)
	if err != nil {
		return nil, opErr("unwrap", provider.ErrInvalidCiphertext, err)
	}
	k := &ikey{aead: a, loaded: now}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, ErrClosed
	}
	p.keys[v] = k
	return k, nil
}

// create makes version v: a random key wrapped under the KEK, recorded
// with add_intermediate_key, which inserts it only if v is the next
// version and nobody made it first. It reports whether this call made it.
// p.load must be held.
func (p *Provider) create(ctx context.Context, v uint32) (bool, error) {
	for attempt := 0; ; attempt++ {
		made, err := p.tryCreate(ctx, v)
		var pe *pgconn.PgError
		if attempt == 0 && errors.As(err, &pe) && pe.Code == "KB001" {
			// The KEK version we wrapped under was retired by another
			// process: read the keyring again, once.
			if rerr := p.kek.Refresh(ctx); rerr == nil {
				continue
			}
		}
		if err != nil {
			return false, opErr("wrap", nil, fmt.Errorf("create intermediate key %s@%d: %w", p.keyID, v, err))
		}
		return made, nil
	}
}

func (p *Provider) tryCreate(ctx context.Context, v uint32) (bool, error) {
	raw := make([]byte, keySize)
	defer provider.Clear(raw)
	if _, err := rand.Read(raw); err != nil {
		return false, err
	}
	wk, err := p.kek.Wrap(ctx, raw, ikAAD(p.keyID, v))
	if err != nil {
		return false, err
	}
	kekID, err := p.recordKEK(ctx, wk.Provider, wk.KeyID, wk.Version)
	if err != nil {
		return false, err
	}
	var made bool
	if err := p.pool.QueryRow(ctx, `SELECT `+p.q+`.add_intermediate_key($1, $2, $3, $4, $5)`,
		p.keyID, int32(v), kekID, wk.Ciphertext, p.actor).Scan(&made); err != nil {
		return false, err
	}
	if made {
		if _, err := p.keep(v, append([]byte(nil), raw...), p.now()); err != nil {
			return false, err
		}
		p.log.Info("hierarchy: created intermediate key", "key", p.keyID, "version", v, "kek", wk.Ref().String(), "kek_version", wk.Version)
	}
	return made, nil
}

func (p *Provider) recordKEK(ctx context.Context, prov, keyID, version string) (int64, error) {
	var id int64
	if err := p.pool.QueryRow(ctx, `SELECT `+p.q+`.record_kek($1, $2, $3, $4)`, prov, keyID, version, p.actor).Scan(&id); err != nil {
		return 0, fmt.Errorf("record kek version: %w", err)
	}
	return id, nil
}

// Rotate makes a version newer than the current one current and returns
// it: the next version, made by this call (one key-service call, to wrap
// it), or — when another process made that version at the same moment —
// the one it made, which serves as well and saves a key. Versions stay
// contiguous: the database takes one of two racing inserts of a version.
func (p *Provider) Rotate(ctx context.Context) (string, error) {
	p.load.Lock()
	defer p.load.Unlock()
	r, found, err := p.readCurrent(ctx)
	if err != nil {
		return "", err
	}
	next := uint32(1)
	if found {
		next = r.version + 1
	}
	made, err := p.create(ctx, next)
	if err != nil {
		return "", err
	}
	if !made {
		if r, _, err = p.readCurrent(ctx); err != nil {
			return "", err
		}
		next = r.version
	}
	p.mu.Lock()
	p.cur = 0 // the next Wrap reads (and unwraps) the current version
	p.mu.Unlock()
	p.log.Info("hierarchy: rotated intermediate key", "key", p.keyID, "version", next, "made_here", made)
	return strconv.FormatUint(uint64(next), 10), nil
}

// Describe reads the chain's versions from the database (no key-service
// call) and makes the highest the one this process wraps under.
func (p *Provider) Describe(ctx context.Context) (provider.Status, error) {
	st := provider.Status{Ref: p.Ref(), Reachable: true}
	vs, err := p.versions(ctx)
	if err != nil {
		return st, err
	}
	for _, v := range vs {
		st.Versions = append(st.Versions, strconv.FormatUint(uint64(v), 10))
	}
	if len(vs) > 0 {
		st.PrimaryVersion = st.Versions[len(vs)-1]
	}
	return st, nil
}

// Refresh re-reads the chain: the current version, and which versions
// still exist (keys of versions retired elsewhere are dropped).
func (p *Provider) Refresh(ctx context.Context) error {
	_, err := p.versions(ctx)
	return err
}

func (p *Provider) versions(ctx context.Context) ([]uint32, error) {
	rows, err := p.pool.Query(ctx, `SELECT version, extract(epoch FROM now() - created_at)::float8 FROM `+p.q+`.intermediate_keys WHERE key_id = $1 ORDER BY version`, p.keyID)
	if err != nil {
		return nil, dbErr("describe", "read intermediate keys", err)
	}
	var (
		vs  []uint32
		v   int32
		age float64
	)
	if _, err := pgx.ForEachRow(rows, []any{&v, &age}, func() error { vs = append(vs, uint32(v)); return nil }); err != nil {
		return nil, dbErr("describe", "read intermediate keys", err)
	}
	p.mu.Lock()
	for n := range p.keys {
		if !containsVersion(vs, n) {
			delete(p.keys, n)
		}
	}
	p.cur = 0 // the next Wrap reads the current version again
	p.mu.Unlock()
	return vs, nil
}

func containsVersion(vs []uint32, v uint32) bool {
	for _, x := range vs {
		if x == v {
			return true
		}
	}
	return false
}

// Retire deletes version from the table, which makes every data key still
// wrapped under it undecryptable (pgstore.Store.RetireKEK refuses to get
// here while any is). The current version cannot be retired.
func (p *Provider) Retire(ctx context.Context, version string) error {
	v, ok := parseVersion(version)
	if !ok {
		return opErr("retire", provider.ErrKeyNotFound, fmt.Errorf("version %q is not a version number", version))
	}
	p.load.Lock()
	defer p.load.Unlock()
	ct, err := p.pool.Exec(ctx, `DELETE FROM `+p.q+`.intermediate_keys WHERE key_id = $1 AND version = $2
AND version < (SELECT max(version) FROM `+p.q+`.intermediate_keys WHERE key_id = $1)`, p.keyID, int32(min(v, math.MaxInt32)))
	if err != nil {
		return opErr("retire", provider.ErrUnavailable, err)
	}
	if ct.RowsAffected() == 0 {
		var exists bool
		if err := p.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+p.q+`.intermediate_keys WHERE key_id = $1 AND version = $2)`,
			p.keyID, int32(min(v, math.MaxInt32))).Scan(&exists); err != nil {
			return opErr("retire", provider.ErrUnavailable, err)
		}
		if exists {
			return opErr("retire", nil, fmt.Errorf("intermediate key %s@%d is the current version", p.keyID, v))
		}
	}
	p.drop(v)
	return nil
}

// RewrapResult is what RewrapKEK did.
type RewrapResult struct {
	Rewrapped int // intermediate keys rewrapped to the KEK's primary
	Total     int // intermediate keys of the chain
}

// RewrapKEK rewraps every intermediate key of the chain not wrapped under
// the KEK keyring's primary provider and version (when the primary is a
// provider.Describer; otherwise every key is rewrapped) to it: after a KEK
// rotation or a move to another backend, one key-service call per
// intermediate key, whatever the number of data keys. Each key is updated
// only if it is still under the version this call read (a concurrent
// RewrapKEK's result stands), with its ik.rewrap event.
func (p *Provider) RewrapKEK(ctx context.Context) (RewrapResult, error) {
	var res RewrapResult
	primaryVersion := ""
	if d, ok := p.kek.Primary().(provider.Describer); ok {
		st, err := d.Describe(ctx)
		if err != nil {
			return res, fmt.Errorf("hierarchy: rewrap: %w", err)
		}
		primaryVersion = st.PrimaryVersion
	}
	rows, err := p.pool.Query(ctx, p.rowQuery("ORDER BY i.version"), p.keyID)
	if err != nil {
		return res, fmt.Errorf("hierarchy: rewrap: %w", err)
	}
	var todo []row
	for rows.Next() {
		r, err := p.scanRow(rows)
		if err != nil {
			rows.Close()
			return res, fmt.Errorf("hierarchy: rewrap: %w", err)
		}
		todo = append(todo, r)
	}
	if err := rows.Err(); err != nil {
		return res, fmt.Errorf("hierarchy: rewrap: %w", err)
	}
	res.Total = len(todo)
	for _, r := range todo {
		if primaryVersion != "" && !p.kek.NeedsRewrap(&r.wk, primaryVersion) {
			continue
		}
		nwk, err := p.kek.Rewrap(ctx, &r.wk, ikAAD(p.keyID, r.version))
		if err != nil {
			return res, fmt.Errorf("hierarchy: rewrap intermediate key %s@%d: %w", p.keyID, r.version, err)
		}
		if nwk.Ref() == r.wk.Ref() && nwk.Version == r.wk.Version && primaryVersion != "" {
			continue
		}
		kid, err := p.recordKEK(ctx, nwk.Provider, nwk.KeyID, nwk.Version)
		if err != nil {
			return res, fmt.Errorf("hierarchy: rewrap: %w", err)
		}
		from := r.wk.Ref().String() + "@" + r.wk.Version
		to := nwk.Ref().String() + "@" + nwk.Version
		var n int
		err = p.pool.QueryRow(ctx, `WITH u AS (
  UPDATE `+p.q+`.intermediate_keys SET wrapped_key = $3, kek_id = $4, rewrapped_at = now()
  WHERE key_id = $1 AND version = $2 AND kek_id = $5 RETURNING version),
e AS (INSERT INTO `+p.q+`.key_events (event, kek_id, count, actor, detail)
  SELECT 'ik.rewrap', $4, 1, $6, jsonb_build_object('version', 'intermediate:' || $1 || '@' || $2, 'from', $7::text, 'to', $8::text) FROM u)
SELECT count(*) FROM u`, p.keyID, int32(r.version), nwk.Ciphertext, kid, r.kekID, p.actor, from, to).Scan(&n)
		if err != nil {
			return res, fmt.Errorf("hierarchy: rewrap intermediate key %s@%d: %w", p.keyID, r.version, err)
		}
		res.Rewrapped += n
		if n > 0 {
			p.log.Info("hierarchy: rewrapped intermediate key", "key", p.keyID, "version", r.version, "from", from, "to", to)
		}
	}
	return res, nil
}
