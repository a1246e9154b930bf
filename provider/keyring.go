package provider

import (
	"context"
	"errors"
	"fmt"
)

// Keyring is a KEKProvider made of one primary provider, which wraps, and
// any number of decrypt-only providers. Unwrap routes each wrapped key to the
// provider whose Ref matches what the key records, so data wrapped under a
// backend a deployment is moving away from stays readable until it has
// been rewrapped.
type Keyring struct {
	primary KEKProvider
	all     map[KeyRef]KEKProvider
	order   []KEKProvider
}

var (
	_ KEKProvider = (*Keyring)(nil)
	_ Rewrapper   = (*Keyring)(nil)
)

// NewKeyring returns a Keyring that wraps with primary and unwraps with
// primary or any of decryptOnly. Two providers with the same Ref are an
// error: the keyring could not tell which one a wrapped key needs.
func NewKeyring(primary KEKProvider, decryptOnly ...KEKProvider) (*Keyring, error) {
	if primary == nil {
		return nil, errors.New("provider: keyring: nil primary provider")
	}
	k := &Keyring{primary: primary, all: map[KeyRef]KEKProvider{}}
	for i, p := range append([]KEKProvider{primary}, decryptOnly...) {
		if p == nil {
			return nil, fmt.Errorf("provider: keyring: decrypt-only provider %d is nil", i)
		}
		ref := p.Ref()
		if _, dup := k.all[ref]; dup {
			return nil, fmt.Errorf("provider: keyring: two providers for key %s", ref)
		}
		k.all[ref] = p
		k.order = append(k.order, p)
	}
	return k, nil
}

// Primary returns the provider that wraps.
func (k *Keyring) Primary() KEKProvider { return k.primary }

// Providers returns the primary provider followed by the decrypt-only ones.
func (k *Keyring) Providers() []KEKProvider { return append([]KEKProvider(nil), k.order...) }

// Ref returns the primary provider's Ref.
func (k *Keyring) Ref() KeyRef { return k.primary.Ref() }

// Refresh calls Refresh on every provider of the keyring that is a
// Refresher, and returns the first error (after trying them all).
func (k *Keyring) Refresh(ctx context.Context) error {
	var first error
	for _, p := range k.order {
		if r, ok := p.(Refresher); ok {
			if err := r.Refresh(ctx); err != nil && first == nil {
				first = err
			}
		}
	}
	return first
}

// Wrap wraps under the primary provider.
func (k *Keyring) Wrap(ctx context.Context, dek, aad []byte) (*WrappedKey, error) {
	return k.primary.Wrap(ctx, dek, aad)
}

// Unwrap unwraps with the provider that wk names.
func (k *Keyring) Unwrap(ctx context.Context, wk *WrappedKey, aad []byte) ([]byte, error) {
	p, err := k.lookup(wk)
	if err != nil {
		return nil, err
	}
	return p.Unwrap(ctx, wk, aad)
}

// Lookup returns the provider that can unwrap wk.
func (k *Keyring) Lookup(wk *WrappedKey) (KEKProvider, error) { return k.lookup(wk) }

func (k *Keyring) lookup(wk *WrappedKey) (KEKProvider, error) {
	if err := wk.Validate(); err != nil {
		return nil, &Error{Op: "unwrap", Kind: ErrInvalidCiphertext, Err: err}
	}
	p, ok := k.all[wk.Ref()]
	if !ok {
		return nil, &Error{Provider: wk.Provider, Op: "unwrap", Kind: ErrKeyNotFound,
			Err: fmt.Errorf("keyring has no provider for key %s", wk.Ref())}
	}
	return p, nil
}

// NeedsRewrap reports whether wk was wrapped by something other than the
// primary provider's current version. primaryVersion is the primary's
// current version as Describe or Rotate reported it; empty means unknown,
// in which case only the provider is compared.
func (k *Keyring) NeedsRewrap(wk *WrappedKey, primaryVersion string) bool {
	if wk.Ref() != k.primary.Ref() {
		return true
	}
	return primaryVersion != "" && wk.Version != primaryVersion
}

// Rewrap re-encrypts wk under the primary provider's current version. When
// wk already belongs to the primary provider and it is a Rewrapper, the key
// service does it without releasing the DEK; otherwise (moving between
// backends) the DEK is unwrapped, wrapped by the primary and cleared.
func (k *Keyring) Rewrap(ctx context.Context, wk *WrappedKey, aad []byte) (*WrappedKey, error) {
	p, err := k.lookup(wk)
	if err != nil {
		return nil, err
	}
	if p == k.primary {
		if rw, ok := p.(Rewrapper); ok {
			return rw.Rewrap(ctx, wk, aad)
		}
	}
	dek, err := p.Unwrap(ctx, wk, aad)
	if err != nil {
		return nil, err
	}
	defer Clear(dek)
	return k.primary.Wrap(ctx, dek, aad)
}
