package local_test

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"path/filepath"
	"testing"

	"github.com/profullstack/keybroker/provider/local"
)

// The baselines are a bare AES-256-GCM Seal and Open of a 32-byte key with a
// random nonce: what Wrap and Unwrap cost beyond them is this package's
// bookkeeping (locking, additional data, WrappedKey). "local-file" is the
// same keyring opened from a file: the difference from "local" is the stat
// each call makes to follow the file.

func benchSetup(b *testing.B) (*local.Provider, cipher.AEAD, []byte, []byte) {
	b.Helper()
	p, err := local.Generate("bench")
	if err != nil {
		b.Fatal(err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	block, err := aes.NewCipher(key)
	if err != nil {
		b.Fatal(err)
	}
	aead, err := cipher.NewGCMWithRandomNonce(block)
	if err != nil {
		b.Fatal(err)
	}
	dek := make([]byte, 32)
	rand.Read(dek)
	return p, aead, dek, []byte("project=42/secret=stripe")
}

// fileBacked saves p and opens the file.
func fileBacked(b *testing.B, p *local.Provider) *local.Provider {
	b.Helper()
	path := filepath.Join(b.TempDir(), "keyring.json")
	if err := p.Save(path); err != nil {
		b.Fatal(err)
	}
	f, err := local.OpenFile(path)
	if err != nil {
		b.Fatal(err)
	}
	return f
}

func BenchmarkWrap(b *testing.B) {
	p, aead, dek, aad := benchSetup(b)
	f := fileBacked(b, p)
	ctx := context.Background()
	for name, p := range map[string]*local.Provider{"local": p, "local-file": f} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := p.Wrap(ctx, dek, aad); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("baseline-gcm-seal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			aead.Seal(nil, nil, dek, aad)
		}
	})
}

func BenchmarkUnwrap(b *testing.B) {
	p, aead, dek, aad := benchSetup(b)
	ctx := context.Background()
	wk, err := p.Wrap(ctx, dek, aad)
	if err != nil {
		b.Fatal(err)
	}
	sealed := aead.Seal(nil, nil, dek, aad)
	f := fileBacked(b, p)
	for name, p := range map[string]*local.Provider{"local": p, "local-file": f} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := p.Unwrap(ctx, wk, aad); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("baseline-gcm-open", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := aead.Open(nil, nil, sealed, aad); err != nil {
				b.Fatal(err)
			}
		}
	})
}
