package gcpkms_test

import (
	"context"
	"testing"

	"cloud.google.com/go/kms/apiv1/kmspb"
)

// Each benchmark pairs the provider with a baseline measured in the same
// run: the bare client library call to the same in-process server, without
// checksums or response checks. The difference is this package's overhead;
// the absolute numbers are loopback gRPC, not Cloud KMS latency.

func BenchmarkWrap(b *testing.B) {
	e := newEnv(b)
	p := e.newKey(b)
	ctx := context.Background()
	dek, aad := newDEK(b), []byte("project=42")
	b.Run("baseline=client.Encrypt", func(b *testing.B) {
		req := &kmspb.EncryptRequest{Name: p.Ref().KeyID, Plaintext: dek, AdditionalAuthenticatedData: aad}
		for b.Loop() {
			if _, err := e.client.Encrypt(ctx, req); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("gcpkms.Wrap", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Wrap(ctx, dek, aad); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkUnwrap(b *testing.B) {
	e := newEnv(b)
	p := e.newKey(b)
	ctx := context.Background()
	aad := []byte("project=42")
	wk, err := p.Wrap(ctx, newDEK(b), aad)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("baseline=client.Decrypt", func(b *testing.B) {
		req := &kmspb.DecryptRequest{Name: p.Ref().KeyID, Ciphertext: wk.Ciphertext, AdditionalAuthenticatedData: aad}
		for b.Loop() {
			if _, err := e.client.Decrypt(ctx, req); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("gcpkms.Unwrap", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Unwrap(ctx, wk, aad); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkRewrap compares rewrapping a key the primary version wrapped
// (UsedPrimary: one Decrypt, no Encrypt) with one an older version wrapped
// (Decrypt then Encrypt), the baseline.
func BenchmarkRewrap(b *testing.B) {
	e := newEnv(b)
	p := e.newKey(b)
	ctx := context.Background()
	aad := []byte("project=42")
	old, err := p.Wrap(ctx, newDEK(b), aad)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := p.Rotate(ctx); err != nil {
		b.Fatal(err)
	}
	cur, err := p.Wrap(ctx, newDEK(b), aad)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("baseline=stale-version", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Rewrap(ctx, old, aad); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("current-version", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Rewrap(ctx, cur, aad); err != nil {
				b.Fatal(err)
			}
		}
	})
}
