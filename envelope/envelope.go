package envelope

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/profullstack/keybroker/provider"
)

// Cache defaults for Envelope's decryption cache.
const (
	DefaultCacheEntries = 1024
	DefaultCacheTTL     = 10 * time.Minute
)

// Option configures New, NewDataKey and UnwrapDataKey.
type Option func(*config) error

type config struct {
	maxMessages  uint64
	maxAge       time.Duration
	cacheEntries int
	cacheTTL     time.Duration
	wrapAAD      []byte
	clock        clock
}

func newConfig(opts []Option) (*config, error) {
	c := &config{
		maxMessages:  DefaultMaxMessages,
		maxAge:       DefaultMaxAge,
		cacheEntries: DefaultCacheEntries,
		cacheTTL:     DefaultCacheTTL,
		clock:        realClock{},
	}
	for _, o := range opts {
		if err := o(c); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// WithMaxMessages sets how many messages one DEK seals: 1..MaxMessagesLimit.
func WithMaxMessages(n uint64) Option {
	return func(c *config) error {
		if n < 1 || n > MaxMessagesLimit {
			return fmt.Errorf("envelope: max messages %d out of range 1..%d", n, uint64(MaxMessagesLimit))
		}
		c.maxMessages = n
		return nil
	}
}

// WithMaxAge sets how long one DEK seals; 0 means no age limit.
func WithMaxAge(d time.Duration) Option {
	return func(c *config) error {
		if d < 0 {
			return fmt.Errorf("envelope: negative max age %v", d)
		}
		c.maxAge = d
		return nil
	}
}

// WithCacheEntries bounds how many unwrapped DEKs an Envelope keeps for
// decryption (at least 1).
func WithCacheEntries(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("envelope: cache entries %d below 1", n)
		}
		c.cacheEntries = n
		return nil
	}
}

// WithCacheTTL sets how long an unwrapped DEK stays cached after it was
// unwrapped (more than 0).
func WithCacheTTL(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("envelope: cache TTL %v not positive", d)
		}
		c.cacheTTL = d
		return nil
	}
}

// WithWrapAAD sets the associated data the KEK provider binds to every DEK
// an Envelope wraps, for example a tenant id, so a blob copied to another
// tenant's Envelope does not unwrap. Default: none. It must be the same for
// Encrypt and Decrypt.
func WithWrapAAD(aad []byte) Option {
	return func(c *config) error {
		if len(aad) > MaxAADLen {
			return fmt.Errorf("envelope: wrap aad length %d exceeds %d", len(aad), MaxAADLen)
		}
		c.wrapAAD = append([]byte(nil), aad...)
		return nil
	}
}

// withClock replaces the real clock, for tests of the age budget and cache
// TTL.
func withClock(clk clock) Option {
	return func(c *config) error { c.clock = clk; return nil }
}

// Envelope encrypts payloads into self-contained envelopes: each carries
// the wrapped DEK that protects it, so only the KEK provider is needed to
// decrypt. One DEK seals many messages until its budget (WithMaxMessages,
// WithMaxAge) is spent, then a fresh one is made and wrapped. Unwrapped DEKs
// are cached for decryption (WithCacheEntries, WithCacheTTL). Safe for
// concurrent use.
type Envelope struct {
	kek     provider.KEKProvider
	cfg     *config
	openCfg *config // cfg without a max age: cached DEKs only open

	active atomic.Pointer[activeKey]
	// rotate is a one-slot semaphore held while a DEK is made: concurrent
	// callers wait on it (or their ctx) and reuse the winner's DEK.
	rotate chan struct{}
	closed bool // guarded by rotate

	cache *KeyCache
}

type activeKey struct {
	key *DataKey
	ref []byte // the encoded inline reference to key's wrapped DEK
}

// New returns an Envelope that wraps DEKs under kek.
func New(kek provider.KEKProvider, opts ...Option) (*Envelope, error) {
	if kek == nil {
		return nil, errors.New("envelope: nil KEK provider")
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	c := NewKeyCache(cfg.cacheEntries, cfg.cacheTTL)
	c.clock = cfg.clock
	openCfg := *cfg
	openCfg.maxAge = 0
	return &Envelope{kek: kek, cfg: cfg, openCfg: &openCfg, rotate: make(chan struct{}, 1), cache: c}, nil
}

// Encrypt seals plaintext (at most MaxPlaintextLen bytes) with aad (at most
// MaxAADLen bytes; for example project id and secret name) into a
// self-contained envelope. The same aad must be given to Decrypt. It calls
// the KEK provider only when a fresh DEK is needed; concurrent callers then
// share one Wrap call.
func (e *Envelope) Encrypt(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	for {
		a := e.active.Load()
		var g *gcm
		if a != nil {
			// Loaded before reserving, so a reservation is never wasted on
			// a key that a concurrent rotation destroys: Destroy lets
			// operations that hold the AEAD finish.
			g = a.key.aead.Load()
		}
		if g == nil || !a.key.reserve() {
			if err := e.newActive(ctx, a); err != nil {
				return nil, err
			}
			continue
		}
		return seal(g, a.ref, plaintext, aad)
	}
}

// newActive replaces old as the active DEK, unless another caller already
// did.
func (e *Envelope) newActive(ctx context.Context, old *activeKey) error {
	select {
	case e.rotate <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("envelope: %w", ctx.Err())
	}
	defer func() { <-e.rotate }()
	if e.closed {
		return ErrClosed
	}
	if e.active.Load() != old {
		return nil
	}
	k, wk, err := newWrappedDataKey(ctx, e.kek, e.cfg.wrapAAD, e.cfg)
	if err != nil {
		return err
	}
	ref, err := inlineRef(wk)
	if err != nil {
		k.Destroy()
		return err
	}
	e.active.Store(&activeKey{key: k, ref: ref})
	if old != nil {
		old.key.Destroy()
	}
	return nil
}

// Decrypt opens an envelope made by Encrypt, with the same aad. Every
// failure to authenticate (altered or truncated blob, wrong aad, a DEK that
// does not unwrap under this Envelope's KEK and wrap aad) returns ErrDecrypt
// and no plaintext. Only failures that say nothing about the blob are
// returned otherwise, wrapped: ctx errors, ErrClosed, and the provider
// errors matching provider.ErrUnavailable, ErrAccessDenied or
// ErrKeyDisabled, so callers can tell an outage from tampering.
func (e *Envelope) Decrypt(ctx context.Context, blob, aad []byte) ([]byte, error) {
	var v view
	if parseView(blob, &v) != nil || v.kind != refInline || len(aad) > MaxAADLen {
		return nil, ErrDecrypt
	}
	k, release, ok := e.cache.lookup(v.ref)
	if !ok {
		var err error
		if k, release, err = e.load(ctx, &v); err != nil {
			return nil, err
		}
	}
	defer release()
	return open(k.aead.Load(), &v, aad)
}

// load is Decrypt's cache miss: it unwraps v's DEK once however many
// callers want it at the same time.
func (e *Envelope) load(ctx context.Context, v *view) (*DataKey, func(), error) {
	wk := &provider.WrappedKey{
		Provider:   string(v.provider),
		KeyID:      string(v.keyID),
		Version:    string(v.version),
		Ciphertext: append([]byte(nil), v.wrapped...),
	}
	k, release, err := e.cache.Get(ctx, string(v.ref), func(ctx context.Context) (*DataKey, error) {
		return unwrapDataKey(ctx, e.kek, wk, e.cfg.wrapAAD, e.openCfg)
	})
	if err != nil {
		return nil, nil, UnwrapFailure(err)
	}
	return k, release, nil
}

// UnwrapFailure is what a decryption reports when the data key it needs
// did not unwrap with error err: err itself when it says nothing about the
// wrapped key — ctx's errors, ErrClosed, and provider errors matching
// provider.ErrUnavailable, ErrAccessDenied or ErrKeyDisabled — so an outage
// or a configuration change is not mistaken for tampering; otherwise (a
// wrapped key altered, truncated, moved to other wrap aad, naming a key or
// version the KEK does not have, or unwrapping to a key of the wrong
// length) ErrDecrypt, which says nothing about which. Decrypt and stores
// that keep wrapped keys apart from their envelopes (pgstore) both use it.
// UnwrapFailure(nil) is nil.
func UnwrapFailure(err error) error {
	switch {
	case err == nil, errors.Is(err, ErrClosed), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, provider.ErrUnavailable), errors.Is(err, provider.ErrAccessDenied), errors.Is(err, provider.ErrKeyDisabled):
		return err
	}
	return ErrDecrypt
}

// Close destroys the active DEK and every cached DEK. Later calls return
// ErrClosed. Close is idempotent and returns nil.
func (e *Envelope) Close() error {
	e.rotate <- struct{}{}
	defer func() { <-e.rotate }()
	if e.closed {
		return nil
	}
	e.closed = true
	if a := e.active.Swap(nil); a != nil {
		a.key.Destroy()
	}
	e.cache.Close()
	return nil
}
