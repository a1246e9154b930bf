package envelope

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"sync/atomic"

	"github.com/profullstack/keybroker/provider"
)

// testKEK is a real KEK provider, AES-256-GCM under fixed key bytes, so a
// golden envelope made with it stays decryptable. It stands in for
// provider/local, which another package provides.
type testKEK struct {
	ref  provider.KeyRef
	aead cipher.AEAD
}

var _ provider.KEKProvider = (*testKEK)(nil)

const testKEKVersion = "1"

func newTestKEK(keyID string, key []byte) *testKEK {
	b, err := aes.NewCipher(key)
	if err != nil {
		panic(err)
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return &testKEK{ref: provider.KeyRef{Provider: "testkek", KeyID: keyID}, aead: a}
}

// goldenKEK is the KEK of testdata/golden.kbe: key bytes 0x00..0x1f.
func goldenKEK() *testKEK {
	key := make([]byte, 32)
	for i := range key {
		key[i] = byte(i)
	}
	return newTestKEK("golden", key)
}

func (k *testKEK) Ref() provider.KeyRef { return k.ref }

// bind puts the key reference into the wrap's associated data, so a
// wrapped key relabelled as another key or version does not unwrap.
func (k *testKEK) bind(aad []byte) []byte {
	return append([]byte(k.ref.String()+"\x00"+testKEKVersion+"\x00"), aad...)
}

func (k *testKEK) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	if err := ctx.Err(); err != nil {
		return nil, &provider.Error{Provider: k.ref.Provider, Op: "wrap", Kind: provider.ErrUnavailable, Err: err}
	}
	if err := provider.CheckDEK(k.ref.Provider, dek); err != nil {
		return nil, err
	}
	nonce := make([]byte, 12)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	ct := k.aead.Seal(nonce, nonce, dek, k.bind(aad))
	return &provider.WrappedKey{Provider: k.ref.Provider, KeyID: k.ref.KeyID, Version: testKEKVersion, Ciphertext: ct}, nil
}

func (k *testKEK) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, &provider.Error{Provider: k.ref.Provider, Op: "unwrap", Kind: provider.ErrUnavailable, Err: err}
	}
	if err := provider.CheckWrappedKey(k.ref, "unwrap", wk); err != nil {
		return nil, err
	}
	if wk.Version != testKEKVersion {
		return nil, &provider.Error{Provider: k.ref.Provider, Op: "unwrap", Kind: provider.ErrKeyNotFound}
	}
	if len(wk.Ciphertext) < 12+16 {
		return nil, &provider.Error{Provider: k.ref.Provider, Op: "unwrap", Kind: provider.ErrInvalidCiphertext}
	}
	dek, err := k.aead.Open(nil, wk.Ciphertext[:12], wk.Ciphertext[12:], k.bind(aad))
	if err != nil {
		return nil, &provider.Error{Provider: k.ref.Provider, Op: "unwrap", Kind: provider.ErrInvalidCiphertext}
	}
	return dek, nil
}

// countingKEK counts the calls that reach a real provider, and remembers
// the DEK slices Unwrap returned so tests can check they were cleared.
type countingKEK struct {
	provider.KEKProvider
	wraps, unwraps atomic.Int64
	returned       atomic.Pointer[[]byte]
	fail           atomic.Pointer[error] // when set, calls fail with it
	gate           chan struct{}         // when set, calls wait for it to close
}

func (c *countingKEK) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	c.wraps.Add(1)
	if c.gate != nil {
		<-c.gate
	}
	if e := c.fail.Load(); e != nil {
		return nil, *e
	}
	return c.KEKProvider.Wrap(ctx, dek, aad)
}

func (c *countingKEK) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	c.unwraps.Add(1)
	if c.gate != nil {
		<-c.gate
	}
	if e := c.fail.Load(); e != nil {
		return nil, *e
	}
	dek, err := c.KEKProvider.Unwrap(ctx, wk, aad)
	if err == nil {
		c.returned.Store(&dek)
	}
	return dek, err
}

func (c *countingKEK) setFail(err error) { c.fail.Store(&err) }

func isZero(b []byte) bool { return bytes.Equal(b, make([]byte, len(b))) }

var errTest = errors.New("test failure")
