package providertest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/profullstack/keybroker/provider"
)

// Harness adapts a backend to the suite.
type Harness struct {
	// NewKey returns a provider for a fresh KEK that no other call returned,
	// with one or more key versions. It registers its own cleanup with t.
	NewKey func(ctx context.Context, t *testing.T) provider.KEKProvider

	// Rotate, if set, makes a new primary version of p's key and returns
	// it. If nil, p must implement provider.Rotator; the suite fails (it
	// does not skip) when it cannot rotate.
	Rotate func(ctx context.Context, t *testing.T, p provider.KEKProvider) string

	// Reopen, if set, returns a second handle on p's key that shares
	// nothing with p but the key service (its own client, connection and
	// caches), as another process of the fleet would open it. The suite
	// then checks that p follows a rotation made through that handle: p's
	// next Wrap is under the new version, p unwraps what the other handle
	// wrapped under it, and p's Describe reports it. Without Reopen that
	// check is skipped.
	Reopen func(ctx context.Context, t *testing.T, p provider.KEKProvider) provider.KEKProvider

	// VersionLabelCached says the backend labels wrapped keys with a cached
	// reading of the current version that Describe refreshes (AWS KMS, whose
	// Encrypt does not say which key material it used). The rotation checks
	// then call Describe before they look at the version Wrap recorded.
	VersionLabelCached bool

	// Goroutines and OpsPerGoroutine size the concurrency test (defaults 8
	// and 25).
	Goroutines, OpsPerGoroutine int
}

// Run runs the conformance suite as subtests of t.
func Run(t *testing.T, h Harness) {
	if h.NewKey == nil {
		t.Fatal("providertest: Harness.NewKey is nil")
	}
	s := &suite{h: h}
	t.Run("RoundTrip", s.roundTrip)
	t.Run("WrapsDiffer", s.wrapsDiffer)
	t.Run("WrongAAD", s.wrongAAD)
	t.Run("TamperedCiphertext", s.tampered)
	t.Run("TamperedMetadata", s.tamperedMetadata)
	t.Run("OtherKey", s.otherKey)
	t.Run("MalformedInput", s.malformed)
	t.Run("CanceledContext", s.canceled)
	t.Run("Rotation", s.rotation)
	t.Run("RotationElsewhere", s.rotationElsewhere)
	t.Run("Concurrent", s.concurrent)
}

type suite struct{ h Harness }

func newDEK(t *testing.T) []byte {
	t.Helper()
	dek := make([]byte, 32)
	if _, err := rand.Read(dek); err != nil {
		t.Fatal(err)
	}
	return dek
}

func (s *suite) wrap(t *testing.T, p provider.KEKProvider, dek, aad []byte) *provider.WrappedKey {
	t.Helper()
	wk, err := p.Wrap(context.Background(), dek, aad)
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	if wk == nil {
		t.Fatal("Wrap returned nil wrapped key and nil error")
	}
	return wk
}

// checkFailure asserts that an Unwrap that must fail did so with one of the
// portable kinds, returned no key, and did not leak the DEK in its message.
func checkFailure(t *testing.T, what string, got []byte, err error, dek []byte) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: Unwrap succeeded, want an error", what)
	}
	if got != nil {
		t.Fatalf("%s: Unwrap returned %d key bytes along with error %v", what, len(got), err)
	}
	if !errors.Is(err, provider.ErrInvalidCiphertext) && !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("%s: error %q matches neither ErrInvalidCiphertext nor ErrKeyNotFound", what, err)
	}
	assertNoSecret(t, err.Error(), dek)
}

func assertNoSecret(t *testing.T, msg string, secret []byte) {
	t.Helper()
	if len(secret) == 0 {
		return // every message "contains" the empty string
	}
	for _, enc := range []string{string(secret), hex.EncodeToString(secret), base64.StdEncoding.EncodeToString(secret), base64.RawURLEncoding.EncodeToString(secret)} {
		if strings.Contains(msg, enc) {
			t.Fatalf("error message contains key material: %q", msg)
		}
	}
}

func (s *suite) roundTrip(t *testing.T) {
	ctx := context.Background()
	p := s.h.NewKey(ctx, t)
	ref := p.Ref()
	if ref.Provider == "" || ref.KeyID == "" {
		t.Fatalf("Ref() = %+v, want provider and key id", ref)
	}
	for _, aad := range [][]byte{nil, []byte("project=42"), bytes.Repeat([]byte{0xa5}, 1024)} {
		dek := newDEK(t)
		orig := bytes.Clone(dek)
		wk := s.wrap(t, p, dek, aad)
		if !bytes.Equal(dek, orig) {
			t.Fatal("Wrap modified the caller's DEK")
		}
		if err := wk.Validate(); err != nil {
			t.Fatalf("wrapped key does not validate: %v", err)
		}
		if wk.Ref() != ref {
			t.Fatalf("wrapped key names %v, provider is %v", wk.Ref(), ref)
		}
		if wk.Version == "" {
			t.Fatal("wrapped key has no version")
		}
		if bytes.Contains(wk.Ciphertext, dek) {
			t.Fatal("wrapped key contains the DEK in the clear")
		}
		got, err := p.Unwrap(ctx, wk, aad)
		if err != nil {
			t.Fatalf("Unwrap: %v", err)
		}
		if !bytes.Equal(got, dek) {
			t.Fatal("Unwrap returned a different DEK")
		}
		// The caller owns the result: clearing it must not affect later unwraps.
		clear(got)
		again, err := p.Unwrap(ctx, wk, aad)
		if err != nil || !bytes.Equal(again, dek) {
			t.Fatalf("second Unwrap after clearing the first result: %v", err)
		}
	}
}

func (s *suite) wrapsDiffer(t *testing.T) {
	p := s.h.NewKey(context.Background(), t)
	dek := newDEK(t)
	a := s.wrap(t, p, dek, []byte("aad"))
	b := s.wrap(t, p, dek, []byte("aad"))
	if bytes.Equal(a.Ciphertext, b.Ciphertext) {
		t.Fatal("two wraps of the same DEK produced identical ciphertexts")
	}
}

func (s *suite) wrongAAD(t *testing.T) {
	ctx := context.Background()
	p := s.h.NewKey(ctx, t)
	dek := newDEK(t)
	wk := s.wrap(t, p, dek, []byte("project=1"))
	for _, aad := range [][]byte{nil, []byte("project=2"), []byte("project=1 "), []byte("Project=1")} {
		got, err := p.Unwrap(ctx, wk, aad)
		checkFailure(t, fmt.Sprintf("aad %q", aad), got, err, dek)
	}
	wk = s.wrap(t, p, dek, nil)
	got, err := p.Unwrap(ctx, wk, []byte("x"))
	checkFailure(t, "aad added", got, err, dek)
}

func (s *suite) tampered(t *testing.T) {
	ctx := context.Background()
	p := s.h.NewKey(ctx, t)
	dek := newDEK(t)
	aad := []byte("tamper")
	wk := s.wrap(t, p, dek, aad)
	for i := range wk.Ciphertext {
		for _, delta := range []byte{0x01, 0x80} {
			bad := wk.Clone()
			bad.Ciphertext[i] ^= delta
			got, err := p.Unwrap(ctx, bad, aad)
			checkFailure(t, fmt.Sprintf("byte %d ^ %#x", i, delta), got, err, dek)
		}
	}
	for _, n := range []int{1, len(wk.Ciphertext) / 2, len(wk.Ciphertext) - 1} {
		bad := wk.Clone()
		bad.Ciphertext = bad.Ciphertext[:n]
		got, err := p.Unwrap(ctx, bad, aad)
		checkFailure(t, fmt.Sprintf("truncated to %d", n), got, err, dek)
	}
	bad := wk.Clone()
	bad.Ciphertext = append(bad.Ciphertext, 0)
	got, err := p.Unwrap(ctx, bad, aad)
	checkFailure(t, "extended by one byte", got, err, dek)
}

func (s *suite) tamperedMetadata(t *testing.T) {
	ctx := context.Background()
	p := s.h.NewKey(ctx, t)
	dek := newDEK(t)
	wk := s.wrap(t, p, dek, nil)

	bad := wk.Clone()
	bad.KeyID += "-other"
	got, err := p.Unwrap(ctx, bad, nil)
	checkFailure(t, "key id changed", got, err, dek)

	bad = wk.Clone()
	bad.Provider = "other"
	got, err = p.Unwrap(ctx, bad, nil)
	checkFailure(t, "provider changed", got, err, dek)
}

func (s *suite) otherKey(t *testing.T) {
	ctx := context.Background()
	a := s.h.NewKey(ctx, t)
	b := s.h.NewKey(ctx, t)
	if a.Ref() == b.Ref() {
		t.Fatalf("Harness.NewKey returned the same key twice: %v", a.Ref())
	}
	dek := newDEK(t)
	wk := s.wrap(t, a, dek, nil)

	got, err := b.Unwrap(ctx, wk, nil)
	checkFailure(t, "key A's wrapped key given to key B", got, err, dek)

	// Relabelled as B's: the key service must still refuse it.
	relabelled := wk.Clone()
	relabelled.KeyID = b.Ref().KeyID
	got, err = b.Unwrap(ctx, relabelled, nil)
	checkFailure(t, "key A's ciphertext relabelled as key B's", got, err, dek)
}

func (s *suite) malformed(t *testing.T) {
	ctx := context.Background()
	p := s.h.NewKey(ctx, t)
	ref := p.Ref()
	for name, wk := range map[string]*provider.WrappedKey{
		"nil":               nil,
		"empty ciphertext":  {Provider: ref.Provider, KeyID: ref.KeyID, Version: "1"},
		"oversized":         {Provider: ref.Provider, KeyID: ref.KeyID, Version: "1", Ciphertext: make([]byte, provider.MaxCiphertextLen+1)},
		"garbage":           {Provider: ref.Provider, KeyID: ref.KeyID, Version: "1", Ciphertext: []byte("not a wrapped key at all")},
		"unknown version":   {Provider: ref.Provider, KeyID: ref.KeyID, Version: "999999", Ciphertext: []byte("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")},
		"oversized version": {Provider: ref.Provider, KeyID: ref.KeyID, Version: strings.Repeat("9", provider.MaxVersionLen+1), Ciphertext: []byte("x")},
	} {
		got, err := p.Unwrap(ctx, wk, nil)
		checkFailure(t, name, got, err, nil)
	}
	for _, n := range []int{0, 15} {
		if _, err := p.Wrap(ctx, make([]byte, n), nil); err == nil {
			t.Errorf("Wrap of a %d-byte DEK succeeded, want an error", n)
		}
	}
}

func (s *suite) canceled(t *testing.T) {
	p := s.h.NewKey(context.Background(), t)
	dek := newDEK(t)
	wk := s.wrap(t, p, dek, nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.Wrap(ctx, dek, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Wrap with a canceled context: got %v, want context.Canceled", err)
	}
	got, err := p.Unwrap(ctx, wk, nil)
	if !errors.Is(err, context.Canceled) || got != nil {
		t.Errorf("Unwrap with a canceled context: got %v, want context.Canceled", err)
	}
	if provider.IsRetryable(err) {
		t.Errorf("a canceled context is reported as retryable: %v", err)
	}
}

func (s *suite) rotate(ctx context.Context, t *testing.T, p provider.KEKProvider) string {
	t.Helper()
	if s.h.Rotate != nil {
		return s.h.Rotate(ctx, t, p)
	}
	r, ok := p.(provider.Rotator)
	if !ok {
		t.Fatalf("%T implements no provider.Rotator and the harness sets no Rotate", p)
	}
	v, err := r.Rotate(ctx)
	if err != nil {
		t.Fatalf("Rotate: %v", err)
	}
	return v
}

func (s *suite) rotation(t *testing.T) {
	ctx := context.Background()
	p := s.h.NewKey(ctx, t)
	aad := []byte("rotation")
	dek1 := newDEK(t)
	wk1 := s.wrap(t, p, dek1, aad)

	v2 := s.rotate(ctx, t, p)
	if v2 == "" || v2 == wk1.Version {
		t.Fatalf("rotation returned version %q, was %q", v2, wk1.Version)
	}
	dek2 := newDEK(t)
	wk2 := s.wrap(t, p, dek2, aad)
	if wk2.Version != v2 {
		t.Fatalf("wrap after rotation reports version %q, want %q", wk2.Version, v2)
	}
	for _, c := range []struct {
		wk  *provider.WrappedKey
		dek []byte
	}{{wk1, dek1}, {wk2, dek2}} {
		got, err := p.Unwrap(ctx, c.wk, aad)
		if err != nil || !bytes.Equal(got, c.dek) {
			t.Fatalf("unwrap of version %q after rotation: %v", c.wk.Version, err)
		}
	}
	if d, ok := p.(provider.Describer); ok {
		st, err := d.Describe(ctx)
		if err != nil {
			t.Fatalf("Describe: %v", err)
		}
		if st.PrimaryVersion != v2 || !st.Reachable || st.Ref != p.Ref() {
			t.Fatalf("Describe after rotation = %+v, want primary %q, reachable, ref %v", st, v2, p.Ref())
		}
	}
	if rw, ok := p.(provider.Rewrapper); ok {
		nwk, err := rw.Rewrap(ctx, wk1, aad)
		if err != nil {
			t.Fatalf("Rewrap: %v", err)
		}
		if nwk.Version != v2 || nwk.Ref() != p.Ref() {
			t.Fatalf("Rewrap produced version %q of %v, want %q of %v", nwk.Version, nwk.Ref(), v2, p.Ref())
		}
		got, err := p.Unwrap(ctx, nwk, aad)
		if err != nil || !bytes.Equal(got, dek1) {
			t.Fatalf("unwrap of rewrapped key: %v", err)
		}
		if _, err := rw.Rewrap(ctx, wk1, []byte("other aad")); err == nil {
			t.Fatal("Rewrap with the wrong aad succeeded")
		}
	}
}

func (s *suite) rotationElsewhere(t *testing.T) {
	if s.h.Reopen == nil {
		t.Skip("the harness sets no Reopen")
	}
	ctx := context.Background()
	p := s.h.NewKey(ctx, t)
	aad := []byte("rotated elsewhere")
	dek1, dek2 := newDEK(t), newDEK(t)
	wk1 := s.wrap(t, p, dek1, aad)

	q := s.h.Reopen(ctx, t, p)
	if q.Ref() != p.Ref() {
		t.Fatalf("Reopen returned a handle on %v, want %v", q.Ref(), p.Ref())
	}
	v2 := s.rotate(ctx, t, q)
	if v2 == "" || v2 == wk1.Version {
		t.Fatalf("rotation through the other handle returned version %q, was %q", v2, wk1.Version)
	}
	wk2 := s.wrap(t, q, dek2, aad)

	describe := func() {
		t.Helper()
		if d, ok := p.(provider.Describer); ok {
			st, err := d.Describe(ctx)
			if err != nil || st.PrimaryVersion != v2 {
				t.Fatalf("Describe after a rotation elsewhere = %+v, %v; want primary %q", st, err, v2)
			}
		}
	}
	if s.h.VersionLabelCached {
		describe()
	}
	if wk := s.wrap(t, p, dek1, aad); wk.Version != v2 {
		t.Fatalf("Wrap after a rotation elsewhere used version %q, want %q", wk.Version, v2)
	}
	got, err := p.Unwrap(ctx, wk2, aad)
	if err != nil || !bytes.Equal(got, dek2) {
		t.Fatalf("unwrap of a key the other handle wrapped under version %q: %v", wk2.Version, err)
	}
	got, err = q.Unwrap(ctx, wk1, aad)
	if err != nil || !bytes.Equal(got, dek1) {
		t.Fatalf("the other handle's unwrap of version %q: %v", wk1.Version, err)
	}
	describe()
}

func (s *suite) concurrent(t *testing.T) {
	ctx := context.Background()
	p := s.h.NewKey(ctx, t)
	g, n := s.h.Goroutines, s.h.OpsPerGoroutine
	if g <= 0 {
		g = 8
	}
	if n <= 0 {
		n = 25
	}
	var wg sync.WaitGroup
	errs := make(chan error, g)
	for i := 0; i < g; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < n; j++ {
				dek := make([]byte, 32)
				rand.Read(dek)
				aad := []byte(fmt.Sprintf("g%d-op%d", i, j))
				wk, err := p.Wrap(ctx, dek, aad)
				if err != nil {
					errs <- fmt.Errorf("goroutine %d op %d: Wrap: %w", i, j, err)
					return
				}
				got, err := p.Unwrap(ctx, wk, aad)
				if err != nil {
					errs <- fmt.Errorf("goroutine %d op %d: Unwrap: %w", i, j, err)
					return
				}
				if !bytes.Equal(got, dek) {
					errs <- fmt.Errorf("goroutine %d op %d: DEK mismatch", i, j)
					return
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
