package envelope

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/profullstack/keybroker/provider"
)

// Errors. ErrDecrypt is the only error a failed decryption returns.
var (
	// ErrDecrypt means an envelope did not decrypt: it was altered,
	// truncated, malformed, moved to another aad, or its DEK did not unwrap.
	// It says nothing about which; no plaintext is returned with it.
	ErrDecrypt = errors.New("envelope: message authentication failed")
	// ErrKeyDestroyed is returned by operations on a DataKey after Destroy
	// (or, for a key from a KeyCache, after eviction and the release of its
	// last lease).
	ErrKeyDestroyed = errors.New("envelope: data key destroyed")
	// ErrKeyExhausted is returned by SealWithKeyID when the DataKey has
	// sealed its maximum number of messages or is older than its maximum
	// age. Make a new DataKey.
	ErrKeyExhausted = errors.New("envelope: data key message budget exhausted")
	// ErrClosed is returned by an Envelope after Close.
	ErrClosed = errors.New("envelope: closed")
)

// Budget defaults. See doc.go, section Nonces, for the arithmetic.
const (
	// DefaultMaxMessages is how many messages a DEK seals before a fresh
	// one is made: 2^24. With random 96-bit nonces the chance that any two
	// of them collide is below 2^-49.
	DefaultMaxMessages = 1 << 24
	// DefaultMaxAge is how long a DEK seals before a fresh one is made.
	DefaultMaxAge = 24 * time.Hour
	// MaxMessagesLimit is the largest budget an Option accepts: 2^32, the
	// NIST SP 800-38D limit for random 96-bit nonces under one key.
	MaxMessagesLimit = 1 << 32
)

// DataKey is an unwrapped 256-bit DEK ready for AES-256-GCM. It is safe for
// concurrent use. Sealing is limited by a message budget (a count and an
// age, both counted from when this DataKey value was made in this process).
type DataKey struct {
	// aead is nil once the key is destroyed. Operations load it once, so a
	// concurrent Destroy lets them finish and fails later ones.
	aead atomic.Pointer[gcm]
	// state holds destroyedBit and the number of outstanding KeyCache
	// leases; the key is dropped when destroyed with no lease left.
	state atomic.Uint64
	// sealed counts budget reservations; expired is set by a timer at the
	// key's maximum age.
	sealed      atomic.Uint64
	maxMessages uint64
	expired     atomic.Bool
	stopTimer   func() bool // nil: no age limit

	releaseFn func() // k.release, made once so leases do not allocate
}

type gcm struct{ cipher.AEAD }

const destroyedBit = 1 << 63

// newAEAD is the one AES-256-GCM construction in this package: a 32-byte
// key, the standard 96-bit nonce and 128-bit tag. Envelopes and the
// Wycheproof test both go through it, sealGCM and openGCM.
func newAEAD(key []byte) (cipher.AEAD, error) {
	if len(key) != DEKSize {
		return nil, fmt.Errorf("envelope: data key length %d, want %d", len(key), DEKSize)
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("envelope: %w", err)
	}
	return cipher.NewGCM(b)
}

// sealGCM appends the encryption of plaintext to dst. nonce must be
// NonceSize bytes and unique under the key; only the Wycheproof test passes
// a nonce it did not draw from NewNonce's source.
func sealGCM(a cipher.AEAD, dst, nonce, plaintext, aad []byte) []byte {
	return a.Seal(dst, nonce, plaintext, aad)
}

// openGCM appends the decryption of ct to dst, or returns ErrDecrypt and
// nothing: crypto/cipher zeroes the output of a failed Open.
func openGCM(a cipher.AEAD, dst, nonce, ct, aad []byte) ([]byte, error) {
	if len(nonce) != NonceSize || len(ct) < TagSize {
		return nil, ErrDecrypt
	}
	pt, err := a.Open(dst, nonce, ct, aad)
	if err != nil {
		return nil, ErrDecrypt
	}
	return pt, nil
}

// NewNonce returns NonceSize bytes from crypto/rand, the same source the
// package draws every nonce from.
func NewNonce() ([]byte, error) {
	n := make([]byte, NonceSize)
	if _, err := rand.Read(n); err != nil {
		return nil, fmt.Errorf("envelope: nonce: %w", err)
	}
	return n, nil
}

// newDataKey takes ownership of dek: it expands it into the AES key schedule
// and clears it, so the raw bytes live only as long as that takes.
func newDataKey(dek []byte, cfg *config) (*DataKey, error) {
	defer provider.Clear(dek)
	a, err := newAEAD(dek)
	if err != nil {
		return nil, err
	}
	k := &DataKey{maxMessages: cfg.maxMessages}
	k.aead.Store(&gcm{a})
	k.releaseFn = k.release
	if cfg.maxAge > 0 {
		k.stopTimer = cfg.clock.AfterFunc(cfg.maxAge, func() { k.expired.Store(true) })
	}
	return k, nil
}

// NewDataKey makes a fresh DEK from crypto/rand and wraps it under kek with
// wrapAAD. It honours WithMaxMessages and WithMaxAge (defaults
// DefaultMaxMessages and DefaultMaxAge) and ignores other options. Store the
// WrappedKey; the DataKey never leaves the process. Call Destroy when done
// with it: that also stops the timer that enforces its maximum age.
func NewDataKey(ctx context.Context, kek provider.KEKProvider, wrapAAD []byte, opts ...Option) (*DataKey, *provider.WrappedKey, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, nil, err
	}
	return newWrappedDataKey(ctx, kek, wrapAAD, cfg)
}

func newWrappedDataKey(ctx context.Context, kek provider.KEKProvider, wrapAAD []byte, cfg *config) (*DataKey, *provider.WrappedKey, error) {
	if kek == nil {
		return nil, nil, errors.New("envelope: nil KEK provider")
	}
	dek := make([]byte, DEKSize)
	defer provider.Clear(dek)
	if _, err := rand.Read(dek); err != nil {
		return nil, nil, fmt.Errorf("envelope: data key: %w", err)
	}
	wk, err := kek.Wrap(ctx, dek, wrapAAD)
	if err != nil {
		return nil, nil, fmt.Errorf("envelope: wrap data key: %w", err)
	}
	if err := wk.Validate(); err != nil {
		return nil, nil, fmt.Errorf("envelope: wrap data key: %w", err)
	}
	k, err := newDataKey(dek, cfg)
	if err != nil {
		return nil, nil, err
	}
	return k, wk, nil
}

// UnwrapDataKey unwraps wk under kek with the wrapAAD given when it was
// made. A provider failure is returned wrapped (errors.Is finds the
// provider's portable error); a DEK of the wrong length is an error. It
// honours WithMaxMessages and WithMaxAge; the budget starts afresh, so a
// store that seals more messages under a reloaded DEK must count them
// itself.
func UnwrapDataKey(ctx context.Context, kek provider.KEKProvider, wk *provider.WrappedKey, wrapAAD []byte, opts ...Option) (*DataKey, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	return unwrapDataKey(ctx, kek, wk, wrapAAD, cfg)
}

func unwrapDataKey(ctx context.Context, kek provider.KEKProvider, wk *provider.WrappedKey, wrapAAD []byte, cfg *config) (*DataKey, error) {
	if kek == nil {
		return nil, errors.New("envelope: nil KEK provider")
	}
	dek, err := kek.Unwrap(ctx, wk, wrapAAD)
	if err != nil {
		return nil, fmt.Errorf("envelope: unwrap data key: %w", err)
	}
	return newDataKey(dek, cfg)
}

// Destroy drops the key: later operations return ErrKeyDestroyed.
// Operations already running finish. A key leased from a KeyCache is
// dropped when its last lease is released. Destroy is idempotent. See
// doc.go, section Key material in memory, for what dropping can and cannot
// erase.
func (k *DataKey) Destroy() {
	old := k.state.Or(destroyedBit)
	if old&destroyedBit != 0 {
		return
	}
	if k.stopTimer != nil {
		k.stopTimer()
	}
	if old == 0 {
		k.aead.Store(nil)
	}
}

// lease keeps k's key until release; it fails once k is destroyed.
func (k *DataKey) lease() bool {
	for {
		s := k.state.Load()
		if s&destroyedBit != 0 {
			return false
		}
		if k.state.CompareAndSwap(s, s+1) {
			return true
		}
	}
}

func (k *DataKey) release() {
	if k.state.Add(^uint64(0)) == destroyedBit {
		k.aead.Store(nil)
	}
}

// reserve counts one message against the budget. It reports false when the
// budget is spent (the count then stays above the limit, so every later
// reservation fails too) or the key has reached its maximum age.
func (k *DataKey) reserve() bool {
	return k.sealed.Add(1) <= k.maxMessages && !k.expired.Load()
}

// aadPool holds scratch buffers for the GCM associated data
// (header || len(aad) || aad), so sealing allocates only its output.
var aadPool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

const maxPooledAAD = 16 << 10

// gcmAAD builds header || uint32(len(aad)) || aad in a pooled buffer; call
// put with the result when done.
func gcmAAD(header, aad []byte) (*[]byte, []byte) {
	p := aadPool.Get().(*[]byte)
	b := append((*p)[:0], header...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(aad)))
	b = append(b, aad...)
	*p = b
	return p, b
}

func putAAD(p *[]byte) {
	if cap(*p) <= maxPooledAAD {
		aadPool.Put(p)
	}
}

// seal writes an envelope with the given key reference under a. It does not
// check the budget.
func seal(a cipher.AEAD, ref, plaintext, aad []byte) ([]byte, error) {
	if len(plaintext) > MaxPlaintextLen {
		return nil, fmt.Errorf("envelope: plaintext length %d exceeds %d", len(plaintext), MaxPlaintextLen)
	}
	if len(aad) > MaxAADLen {
		return nil, fmt.Errorf("envelope: aad length %d exceeds %d", len(aad), MaxAADLen)
	}
	ctLen := len(plaintext) + TagSize
	hl := headerLen(ref)
	out := make([]byte, hl, hl+ctLen)
	copy(out, magic)
	out[len(magic)] = Version
	out[len(magic)+1] = byte(AES256GCM)
	copy(out[len(magic)+2:], ref)
	nonce := out[hl-trailerLen : hl-4]
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("envelope: nonce: %w", err)
	}
	binary.BigEndian.PutUint32(out[hl-4:], uint32(ctLen))
	p, gaad := gcmAAD(out, aad)
	out = sealGCM(a, out, nonce, plaintext, gaad)
	putAAD(p)
	return out, nil
}

// open decrypts a parsed envelope under a.
func open(a cipher.AEAD, v *view, aad []byte) ([]byte, error) {
	if len(aad) > MaxAADLen {
		return nil, ErrDecrypt
	}
	p, gaad := gcmAAD(v.header, aad)
	pt, err := openGCM(a, make([]byte, 0, len(v.ct)-TagSize), v.nonce, v.ct, gaad)
	putAAD(p)
	return pt, err
}

// SealWithKeyID encrypts plaintext under k into an envelope whose header
// names keyID (1..MaxKeyIDLen bytes), the id under which the caller stores
// k's WrappedKey. aad (at most MaxAADLen bytes) is authenticated with the
// header and must be given again to OpenWithKey. It counts one message
// against k's budget and returns ErrKeyExhausted when the budget is spent.
func SealWithKeyID(k *DataKey, keyID, plaintext, aad []byte) ([]byte, error) {
	var buf [2 + MaxKeyIDLen]byte // keeps the reference off the heap
	ref, err := appendExternalRef(buf[:0], keyID)
	if err != nil {
		return nil, err
	}
	a := k.aead.Load()
	if a == nil {
		return nil, ErrKeyDestroyed
	}
	if !k.reserve() {
		return nil, ErrKeyExhausted
	}
	return seal(a, ref, plaintext, aad)
}

// OpenWithKey decrypts an envelope made by SealWithKeyID under k, with the
// same aad. Any failure (malformed blob, wrong key, wrong aad, altered
// bytes, an envelope with an inline key) returns ErrDecrypt and no
// plaintext; a destroyed k returns ErrKeyDestroyed. It does not check that
// the header's key id is the one k was loaded for: the key itself decides.
func OpenWithKey(k *DataKey, blob, aad []byte) ([]byte, error) {
	a := k.aead.Load()
	if a == nil {
		return nil, ErrKeyDestroyed
	}
	var v view
	if parseView(blob, &v) != nil || v.kind != refExternal {
		return nil, ErrDecrypt
	}
	return open(a, &v, aad)
}
