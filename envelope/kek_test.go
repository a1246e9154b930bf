package envelope

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// goldenKeyring is a provider/local keyring whose only key is the bytes
// 0x00..0x1f: the KEK of testdata/golden.kbe.
const goldenKeyring = `{"id":"golden","primary":1,"keys":[{"version":1,"key":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}]}`

// goldenKEK returns a real local provider over the golden keyring.
func goldenKEK(t testing.TB) *local.Provider {
	t.Helper()
	t.Setenv("KEYBROKER_ENVELOPE_TEST_KEYRING", goldenKeyring)
	p, err := local.FromEnv("KEYBROKER_ENVELOPE_TEST_KEYRING")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// newKEK returns a real local provider over a fresh random key.
func newKEK(t testing.TB, id string) *local.Provider {
	t.Helper()
	p, err := local.Generate(id)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// countingKEK counts the calls that reach a real provider, and remembers
// the DEK slices passed to Wrap and returned by Unwrap so tests can check
// they were cleared.
type countingKEK struct {
	provider.KEKProvider
	wraps, unwraps atomic.Int64
	returned       atomic.Pointer[[]byte] // the DEK the last Unwrap returned
	given          atomic.Pointer[[]byte] // the DEK the last Wrap was given
	fail           atomic.Pointer[error]  // when set, calls fail with it
	gate           chan struct{}          // when set, calls wait for it to close
	entered        chan struct{}          // when set, calls send on it first
}

func (c *countingKEK) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	c.wraps.Add(1)
	if c.entered != nil {
		c.entered <- struct{}{}
	}
	if c.gate != nil {
		<-c.gate
	}
	if e := c.fail.Load(); e != nil {
		return nil, *e
	}
	c.given.Store(&dek)
	return c.KEKProvider.Wrap(ctx, dek, aad)
}

func (c *countingKEK) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	c.unwraps.Add(1)
	if c.entered != nil {
		c.entered <- struct{}{}
	}
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
