package bench

import (
	"context"
	"sync/atomic"

	"github.com/profullstack/keybroker/provider"
)

// CountingProvider is a provider.KEKProvider that counts the Wrap and
// Unwrap calls it passes on to the provider it decorates: with a remote
// provider, each is one key-service request.
type CountingProvider struct {
	provider.KEKProvider
	wraps, unwraps atomic.Int64
}

var _ provider.KEKProvider = (*CountingProvider)(nil)

// NewCountingProvider decorates p.
func NewCountingProvider(p provider.KEKProvider) *CountingProvider {
	return &CountingProvider{KEKProvider: p}
}

// Wrap counts the call and passes it on.
func (c *CountingProvider) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	c.wraps.Add(1)
	return c.KEKProvider.Wrap(ctx, dek, aad)
}

// Unwrap counts the call and passes it on.
func (c *CountingProvider) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	c.unwraps.Add(1)
	return c.KEKProvider.Unwrap(ctx, wk, aad)
}

// Calls returns how many Wrap and Unwrap calls were made.
func (c *CountingProvider) Calls() int64 { return c.wraps.Load() + c.unwraps.Load() }
