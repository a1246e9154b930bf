package bench

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"

	wrapping "github.com/hashicorp/go-kms-wrapping/v2"
	gkwaead "github.com/hashicorp/go-kms-wrapping/wrappers/aead/v2"
	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/keyset"
	"github.com/tink-crypto/tink-go/v2/tink"
	"gocloud.dev/secrets/localsecrets"
	"google.golang.org/protobuf/proto"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// AAD is the associated data every contender that supports it binds: a
// project and secret name, as pgstore binds them.
var AAD = []byte("project-4711/webhooks/stripe-signing-secret")

// Contender is one way of turning a secret into storable bytes and back.
type Contender struct {
	Name string
	// Seal encrypts plaintext; Open reverses it. Both are safe for
	// concurrent use.
	Seal func(ctx context.Context, plaintext []byte) ([]byte, error)
	Open func(ctx context.Context, ciphertext []byte) ([]byte, error)
	// Calls, if set, returns how many key-service calls this instance
	// made: KEK provider Wrap/Unwrap calls, or direct API requests.
	Calls func() int64
	// Requests, if set, returns how many HTTP requests reached the key
	// service through this contender's CountingProxy.
	Requests func() int64
	// Reset, if set, returns a fresh instance of the contender sharing the
	// same key: no cached data keys, counters at zero. Calls of the new
	// instance count only its own requests.
	Reset func() (*Contender, error)
	// Close releases what the contender holds (cached keys, clients).
	Close func()
}

func noClose() {}

// Names of the contenders, as printed.
const (
	NameRaw        = "raw AES-256-GCM"
	NameKeybroker  = "keybroker envelope"
	NameTink       = "Tink KMS envelope AEAD"
	NameGKW        = "go-kms-wrapping AEAD"
	NameGKWEnv     = "go-kms-wrapping envelope"
	NameLocalsecrs = "gocloud localsecrets"
)

// InProcess returns the in-process contenders, the baseline first.
func InProcess() ([]*Contender, error) {
	var out []*Contender
	for _, f := range []func() (*Contender, error){NewRaw, NewKeybroker, NewTink, NewGoKMSWrapping, NewGoKMSWrappingEnvelope, NewLocalSecrets} {
		c, err := f()
		if err != nil {
			for _, c := range out {
				c.Close()
			}
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// NewRaw is the baseline: crypto/cipher AES-256-GCM with a random 96-bit
// nonce drawn by the standard library and prepended to the ciphertext.
func NewRaw() (*Contender, error) {
	key := make([]byte, 32)
	rand.Read(key)
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	g, err := cipher.NewGCMWithRandomNonce(b)
	if err != nil {
		return nil, err
	}
	return &Contender{
		Name:  NameRaw,
		Seal:  func(_ context.Context, pt []byte) ([]byte, error) { return g.Seal(nil, nil, pt, AAD), nil },
		Open:  func(_ context.Context, ct []byte) ([]byte, error) { return g.Open(nil, nil, ct, AAD) },
		Close: noClose,
	}, nil
}

// NewKeybroker is keybroker's self-contained envelope under a local KEK:
// one DEK, wrapped once, seals every message (the default budget is 2^24
// messages) and stays cached for decryption.
func NewKeybroker() (*Contender, error) {
	kek, err := local.Generate("bench")
	if err != nil {
		return nil, err
	}
	c, err := Keybroker(NameKeybroker, NewCountingProvider(kek))
	if err != nil {
		return nil, err
	}
	c.Calls = nil // an in-process KEK is no key service
	return c, nil
}

// Keybroker returns keybroker's envelope over kek. Calls reports kek's
// Wrap and Unwrap calls; Reset gives a fresh Envelope (empty cache, fresh
// counter) over the same key.
func Keybroker(name string, kek *CountingProvider) (*Contender, error) {
	e, err := envelope.New(kek)
	if err != nil {
		return nil, err
	}
	return &Contender{
		Name:  name,
		Seal:  func(ctx context.Context, pt []byte) ([]byte, error) { return e.Encrypt(ctx, pt, AAD) },
		Open:  func(ctx context.Context, ct []byte) ([]byte, error) { return e.Decrypt(ctx, ct, AAD) },
		Calls: kek.Calls,
		Reset: func() (*Contender, error) { return Keybroker(name, NewCountingProvider(kek.KEKProvider)) },
		Close: func() { e.Close() },
	}, nil
}

// NewTink is Tink's KMS envelope AEAD with an AES-256-GCM DEK template and
// an in-process AES-256-GCM Tink AEAD as the KEK: every message gets a
// fresh DEK, wrapped by the KEK, as Tink's design prescribes.
func NewTink() (*Contender, error) {
	h, err := keyset.NewHandle(aead.AES256GCMKeyTemplate())
	if err != nil {
		return nil, err
	}
	kek, err := aead.New(h)
	if err != nil {
		return nil, err
	}
	var a tink.AEAD = aead.NewKMSEnvelopeAEAD2(aead.AES256GCMKeyTemplate(), kek)
	return &Contender{
		Name:  NameTink,
		Seal:  func(_ context.Context, pt []byte) ([]byte, error) { return a.Encrypt(pt, AAD) },
		Open:  func(_ context.Context, ct []byte) ([]byte, error) { return a.Decrypt(ct, AAD) },
		Close: noClose,
	}, nil
}

// newGKWWrapper is go-kms-wrapping v2's AEAD wrapper over a random
// AES-256-GCM key.
func newGKWWrapper() (*gkwaead.Wrapper, error) {
	key := make([]byte, 32)
	rand.Read(key)
	w := gkwaead.NewWrapper()
	if _, err := w.SetConfig(context.Background(), wrapping.WithKeyId("bench"), gkwaead.WithKey(key)); err != nil {
		return nil, fmt.Errorf("go-kms-wrapping: %w", err)
	}
	return w, nil
}

// NewGoKMSWrapping is go-kms-wrapping v2's AEAD wrapper with a random
// AES-256-GCM key. Its BlobInfo is protobuf-marshalled to give storable
// bytes, as Vault stores it.
func NewGoKMSWrapping() (*Contender, error) {
	w, err := newGKWWrapper()
	if err != nil {
		return nil, err
	}
	return &Contender{
		Name: NameGKW,
		Seal: func(ctx context.Context, pt []byte) ([]byte, error) {
			bi, err := w.Encrypt(ctx, pt, wrapping.WithAad(AAD))
			if err != nil {
				return nil, err
			}
			return proto.Marshal(bi)
		},
		Open: func(ctx context.Context, ct []byte) ([]byte, error) {
			var bi wrapping.BlobInfo
			if err := proto.Unmarshal(ct, &bi); err != nil {
				return nil, err
			}
			return w.Decrypt(ctx, &bi, wrapping.WithAad(AAD))
		},
		Close: noClose,
	}, nil
}

// NewGoKMSWrappingEnvelope is go-kms-wrapping v2's envelope as Vault's KMS
// seals use it: EnvelopeEncrypt seals the payload (with the associated
// data) under a fresh AES-256-GCM DEK per message, the AEAD wrapper (a
// random AES-256-GCM key, standing in for the KMS) encrypts that DEK, and
// a BlobInfo carrying the ciphertext, IV and wrapped key is
// protobuf-marshalled to give storable bytes. As in Vault's seals, the
// associated data binds the payload only, not the wrapped DEK.
func NewGoKMSWrappingEnvelope() (*Contender, error) {
	w, err := newGKWWrapper()
	if err != nil {
		return nil, err
	}
	return &Contender{
		Name: NameGKWEnv,
		Seal: func(ctx context.Context, pt []byte) ([]byte, error) {
			env, err := wrapping.EnvelopeEncrypt(pt, wrapping.WithAad(AAD))
			if err != nil {
				return nil, err
			}
			wk, err := w.Encrypt(ctx, env.Key)
			provider.Clear(env.Key)
			if err != nil {
				return nil, err
			}
			wkb, err := proto.Marshal(wk)
			if err != nil {
				return nil, err
			}
			return proto.Marshal(&wrapping.BlobInfo{
				Ciphertext: env.Ciphertext,
				Iv:         env.Iv,
				KeyInfo:    &wrapping.KeyInfo{KeyId: "bench", WrappedKey: wkb},
			})
		},
		Open: func(ctx context.Context, ct []byte) ([]byte, error) {
			var bi, wk wrapping.BlobInfo
			if err := proto.Unmarshal(ct, &bi); err != nil {
				return nil, err
			}
			if bi.KeyInfo == nil {
				return nil, errors.New("go-kms-wrapping: no key info")
			}
			if err := proto.Unmarshal(bi.KeyInfo.WrappedKey, &wk); err != nil {
				return nil, err
			}
			dek, err := w.Decrypt(ctx, &wk)
			if err != nil {
				return nil, err
			}
			defer provider.Clear(dek)
			return wrapping.EnvelopeDecrypt(&wrapping.EnvelopeInfo{Key: dek, Iv: bi.Iv, Ciphertext: bi.Ciphertext}, wrapping.WithAad(AAD))
		},
		Close: noClose,
	}, nil
}

// NewLocalSecrets is gocloud.dev's localsecrets keeper (NaCl secretbox,
// XSalsa20-Poly1305) with a random key. It takes no associated data.
func NewLocalSecrets() (*Contender, error) {
	key, err := localsecrets.NewRandomKey()
	if err != nil {
		return nil, err
	}
	k := localsecrets.NewKeeper(key)
	return &Contender{
		Name:  NameLocalsecrs,
		Seal:  func(ctx context.Context, pt []byte) ([]byte, error) { return k.Encrypt(ctx, pt) },
		Open:  func(ctx context.Context, ct []byte) ([]byte, error) { return k.Decrypt(ctx, ct) },
		Close: func() { k.Close() },
	}, nil
}

// RoundTrip seals and opens pt with c and checks the result, and that a
// ciphertext with its middle byte flipped fails to open. (The middle, not
// the last byte: go-kms-wrapping's marshalled BlobInfo ends with a key id
// that is not authenticated.)
func RoundTrip(ctx context.Context, c *Contender, pt []byte) error {
	ct, err := c.Seal(ctx, pt)
	if err != nil {
		return fmt.Errorf("%s: seal: %w", c.Name, err)
	}
	got, err := c.Open(ctx, ct)
	if err != nil {
		return fmt.Errorf("%s: open: %w", c.Name, err)
	}
	if string(got) != string(pt) {
		return fmt.Errorf("%s: opened %d bytes that differ from the %d sealed", c.Name, len(got), len(pt))
	}
	bad := append([]byte(nil), ct...)
	bad[len(bad)/2] ^= 1
	if _, err := c.Open(ctx, bad); err == nil {
		return fmt.Errorf("%s: a ciphertext with its middle byte flipped opened", c.Name)
	}
	return nil
}
