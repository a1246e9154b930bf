package provider

import (
	"context"
	"errors"
	"fmt"
)

// KEKProvider wraps and unwraps data keys under a key-encryption key held by
// a key service. Implementations are safe for concurrent use.
type KEKProvider interface {
	// Ref names the KEK this provider wraps under. It is stable across key
	// versions and is recorded in every WrappedKey the provider returns, so
	// a Keyring can route an Unwrap to the provider that can serve it.
	Ref() KeyRef

	// Wrap encrypts dek under the provider's current primary key version,
	// binding aad to the result. The returned WrappedKey records the
	// provider, key id and key version. dek is not retained.
	Wrap(ctx context.Context, dek, aad []byte) (*WrappedKey, error)

	// Unwrap decrypts wk with the same aad that was given to Wrap and
	// returns the DEK. The caller owns the returned slice and should clear
	// it when done. Any tampering, wrong aad or wrong key yields an error
	// that matches ErrInvalidCiphertext or ErrKeyNotFound; it never returns
	// a partial key.
	Unwrap(ctx context.Context, wk *WrappedKey, aad []byte) ([]byte, error)
}

// KeyRef identifies a KEK independently of its versions.
type KeyRef struct {
	// Provider is the backend's registered scheme, for example "local",
	// "awskms", "gcpkms" or "vault".
	Provider string
	// KeyID names the key within the backend: a keyring id, a key ARN, a
	// CryptoKey resource name, a Transit mount and key name.
	KeyID string
}

func (r KeyRef) String() string { return r.Provider + ":" + r.KeyID }

// WrappedKey is a DEK encrypted under one version of a KEK. It holds no
// secret: it is safe to store beside the data the DEK protects.
type WrappedKey struct {
	Provider   string // backend scheme, as in KeyRef.Provider
	KeyID      string // as in KeyRef.KeyID
	Version    string // the key version that wrapped Ciphertext; opaque to callers
	Ciphertext []byte // the backend's wrapped form of the DEK
}

// Ref returns the KEK reference recorded in wk.
func (wk *WrappedKey) Ref() KeyRef { return KeyRef{Provider: wk.Provider, KeyID: wk.KeyID} }

// Bounds on the fields of a WrappedKey. Backends never produce more; parsers
// reject more before allocating.
const (
	MaxProviderLen   = 32
	MaxKeyIDLen      = 1024
	MaxVersionLen    = 256
	MaxCiphertextLen = 8192
)

// Validate reports whether wk's fields are present and within bounds. It
// names the offending field but never echoes its contents.
func (wk *WrappedKey) Validate() error {
	switch {
	case wk == nil:
		return errors.New("provider: wrapped key is nil")
	case wk.Provider == "" || len(wk.Provider) > MaxProviderLen:
		return fmt.Errorf("provider: wrapped key: provider name length %d out of range 1..%d", len(wk.Provider), MaxProviderLen)
	case wk.KeyID == "" || len(wk.KeyID) > MaxKeyIDLen:
		return fmt.Errorf("provider: wrapped key: key id length %d out of range 1..%d", len(wk.KeyID), MaxKeyIDLen)
	case len(wk.Version) > MaxVersionLen:
		return fmt.Errorf("provider: wrapped key: version length %d exceeds %d", len(wk.Version), MaxVersionLen)
	case len(wk.Ciphertext) == 0 || len(wk.Ciphertext) > MaxCiphertextLen:
		return fmt.Errorf("provider: wrapped key: ciphertext length %d out of range 1..%d", len(wk.Ciphertext), MaxCiphertextLen)
	}
	return nil
}

// Clone returns a deep copy of wk.
func (wk *WrappedKey) Clone() *WrappedKey {
	c := *wk
	c.Ciphertext = append([]byte(nil), wk.Ciphertext...)
	return &c
}

// Rotator is implemented by providers that can create a new primary key
// version. Keys wrapped under earlier versions still unwrap.
type Rotator interface {
	// Rotate makes a new key version primary and returns its version.
	Rotate(ctx context.Context) (version string, err error)
}

// Rewrapper is implemented by providers that can re-encrypt a wrapped key to
// the current primary version inside the key service, so the DEK never
// reaches the caller. aad must be the aad given to Wrap; it is kept.
type Rewrapper interface {
	Rewrap(ctx context.Context, wk *WrappedKey, aad []byte) (*WrappedKey, error)
}

// Describer is implemented by providers that can report their state.
type Describer interface {
	// Describe asks the key service for the key's current state. A key
	// service that cannot be reached yields an error matching
	// ErrUnavailable, not a Status with Reachable false.
	Describe(ctx context.Context) (Status, error)
}

// Retirer is implemented by providers whose key versions can be retired:
// after Retire, keys wrapped under version no longer unwrap. Retirement is
// always explicit; rotation never retires.
type Retirer interface {
	Retire(ctx context.Context, version string) error
}

// Refresher is implemented by providers whose key material or primary
// version can change outside this process (a keyring file another process
// rotates or retires). Refresh re-reads that state now; it returns an error
// only when the new state cannot be read, in which case the provider keeps
// what it had. Providers backed by a key service that tracks versions
// itself (Vault, AWS KMS, Cloud KMS) need not implement it.
type Refresher interface {
	Refresh(ctx context.Context) error
}

// Status is what a Describer reports.
type Status struct {
	Ref            KeyRef
	PrimaryVersion string   // the version Wrap uses now
	Versions       []string // versions that can still unwrap, when the backend can list them
	Reachable      bool
}

// Clear overwrites b with zeros. Use it on DEKs once they are no longer
// needed. The Go runtime may have copied the bytes elsewhere (for example
// when a slice grew); Clear narrows the window, it cannot close it.
func Clear(b []byte) { clear(b) }

// Bounds on DEK length accepted by Wrap. keybroker makes 32-byte DEKs.
const (
	MinDEKLen = 16
	MaxDEKLen = 64
)

// CheckDEK is for backends: it reports a DEK whose length is out of bounds,
// naming the length, never the bytes.
func CheckDEK(scheme string, dek []byte) error {
	if len(dek) < MinDEKLen || len(dek) > MaxDEKLen {
		return &Error{Provider: scheme, Op: "wrap", Err: fmt.Errorf("DEK length %d out of range %d..%d", len(dek), MinDEKLen, MaxDEKLen)}
	}
	return nil
}

// CheckWrappedKey is for backends: it validates wk and checks that it names
// ref, returning an *Error of kind ErrInvalidCiphertext or ErrKeyNotFound.
func CheckWrappedKey(ref KeyRef, op string, wk *WrappedKey) error {
	if err := wk.Validate(); err != nil {
		return &Error{Provider: ref.Provider, Op: op, Kind: ErrInvalidCiphertext, Err: err}
	}
	if wk.Ref() != ref {
		return &Error{Provider: ref.Provider, Op: op, Kind: ErrKeyNotFound, Err: errors.New("wrapped key names another key")}
	}
	return nil
}
