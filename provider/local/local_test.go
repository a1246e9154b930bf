package local_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
	"github.com/profullstack/keybroker/provider/providertest"
)

var keySeq atomic.Int64

func newID() string { return fmt.Sprintf("test-%d", keySeq.Add(1)) }

func rotate(ctx context.Context, t *testing.T, p provider.KEKProvider) string {
	t.Helper()
	v, err := p.(*local.Provider).Rotate(ctx)
	if err != nil {
		t.Fatalf("Rotate: %v", err)
	}
	return v
}

// TestConformance runs the suite on an in-memory keyring.
func TestConformance(t *testing.T) {
	providertest.Run(t, providertest.Harness{
		NewKey: func(ctx context.Context, t *testing.T) provider.KEKProvider {
			p, err := local.Generate(newID())
			if err != nil {
				t.Fatal(err)
			}
			return p
		},
		Rotate: rotate,
	})
}

// TestConformanceFile runs the suite on keyrings opened through provider.Open
// from files, so every rotation is persisted; Reopen opens the file again.
func TestConformanceFile(t *testing.T) {
	var paths sync.Map // provider.KEKProvider -> its keyring file
	providertest.Run(t, providertest.Harness{
		NewKey: func(ctx context.Context, t *testing.T) provider.KEKProvider {
			g, err := local.Generate(newID())
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(t.TempDir(), "keyring.json")
			if err := g.Save(path); err != nil {
				t.Fatal(err)
			}
			p, err := provider.Open(ctx, "local://"+path)
			if err != nil {
				t.Fatal(err)
			}
			paths.Store(p, path)
			return p
		},
		Reopen: func(ctx context.Context, t *testing.T, p provider.KEKProvider) provider.KEKProvider {
			path, _ := paths.Load(p)
			q, err := provider.Open(ctx, "local://"+path.(string))
			if err != nil {
				t.Fatal(err)
			}
			return q
		},
		Rotate: rotate,
	})
}
