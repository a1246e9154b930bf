package envelope

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/profullstack/keybroker/provider"
)

func newTestEnvelope(t testing.TB, kek provider.KEKProvider, opts ...Option) *Envelope {
	t.Helper()
	e, err := New(kek, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

func mustEncrypt(t testing.TB, e *Envelope, pt, aad []byte) []byte {
	t.Helper()
	blob, err := e.Encrypt(context.Background(), pt, aad)
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	return blob
}

func TestRoundTripInline(t *testing.T) {
	ctx := context.Background()
	e := newTestEnvelope(t, goldenKEK(t), WithWrapAAD([]byte("tenant-1")))
	for _, n := range []int{0, 1, 255, 4096} {
		pt := bytes.Repeat([]byte{'p'}, n)
		aad := []byte("project-1/secret-a")
		blob := mustEncrypt(t, e, pt, aad)
		if len(blob) != len(pt)+TagSize+headerLenOf(t, blob) {
			t.Fatalf("blob length %d for plaintext %d", len(blob), n)
		}
		got, err := e.Decrypt(ctx, blob, aad)
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("Decrypt(%d bytes) = %d bytes, %v", n, len(got), err)
		}
		h, err := ParseHeader(blob)
		if err != nil {
			t.Fatal(err)
		}
		if h.Version != Version || h.Algorithm != AES256GCM || h.WrappedKey == nil || h.KeyID != nil || len(h.Nonce) != NonceSize {
			t.Fatalf("header %+v", h)
		}
		if h.WrappedKey.Provider != "local" || h.WrappedKey.KeyID != "golden" || h.WrappedKey.Version != "1" {
			t.Fatalf("wrapped key ref %s version %q", h.WrappedKey.Ref(), h.WrappedKey.Version)
		}
	}
	// A second Envelope over the same KEK and wrap aad reads the blob; one
	// with another wrap aad (another tenant) does not.
	blob := mustEncrypt(t, e, []byte("x"), nil)
	other := newTestEnvelope(t, goldenKEK(t), WithWrapAAD([]byte("tenant-1")))
	if got, err := other.Decrypt(ctx, blob, nil); err != nil || string(got) != "x" {
		t.Fatalf("other Envelope: %q, %v", got, err)
	}
	tenant2 := newTestEnvelope(t, goldenKEK(t), WithWrapAAD([]byte("tenant-2")))
	if got, err := tenant2.Decrypt(ctx, blob, nil); err != ErrDecrypt || got != nil {
		t.Fatalf("other tenant: %q, %v; want ErrDecrypt", got, err)
	}
}

func headerLenOf(t testing.TB, blob []byte) int {
	var v view
	if err := parseView(blob, &v); err != nil {
		t.Fatal(err)
	}
	return len(v.header)
}

func TestRoundTripExternal(t *testing.T) {
	ctx := context.Background()
	kek := goldenKEK(t)
	ckek := &countingKEK{KEKProvider: kek}
	k, wk, err := NewDataKey(ctx, ckek, []byte("tenant-1"))
	if err != nil {
		t.Fatal(err)
	}
	blob, err := SealWithKeyID(k, []byte("dek-42"), []byte("hello"), []byte("p1/s1"))
	if err != nil {
		t.Fatal(err)
	}
	h, err := ParseHeader(blob)
	if err != nil || string(h.KeyID) != "dek-42" || h.WrappedKey != nil {
		t.Fatalf("ParseHeader = %+v, %v", h, err)
	}
	k2, err := UnwrapDataKey(ctx, ckek, wk, []byte("tenant-1"))
	if err != nil {
		t.Fatal(err)
	}
	// The raw DEK is cleared once expanded, on both paths.
	for what, p := range map[string]*atomic.Pointer[[]byte]{"Wrap": &ckek.given, "Unwrap": &ckek.returned} {
		if dek := p.Load(); dek == nil || len(*dek) != DEKSize || !isZero(*dek) {
			t.Fatalf("the DEK given to or returned by %s was not cleared", what)
		}
	}
	got, err := OpenWithKey(k2, blob, []byte("p1/s1"))
	if err != nil || string(got) != "hello" {
		t.Fatalf("OpenWithKey = %q, %v", got, err)
	}
	if _, err := UnwrapDataKey(ctx, kek, wk, []byte("tenant-2")); !errors.Is(err, provider.ErrInvalidCiphertext) {
		t.Fatalf("unwrap with other wrap aad: %v", err)
	}
	// An external-key envelope is not something Envelope.Decrypt opens, and
	// an inline one is not something OpenWithKey opens.
	e := newTestEnvelope(t, kek, WithWrapAAD([]byte("tenant-1")))
	if _, err := e.Decrypt(ctx, blob, []byte("p1/s1")); err != ErrDecrypt {
		t.Fatalf("Decrypt(external blob) = %v", err)
	}
	if _, err := OpenWithKey(k2, mustEncrypt(t, e, []byte("x"), nil), nil); err != ErrDecrypt {
		t.Fatalf("OpenWithKey(inline blob) = %v", err)
	}
	k2.Destroy()
	if _, err := OpenWithKey(k2, blob, []byte("p1/s1")); err != ErrKeyDestroyed {
		t.Fatalf("OpenWithKey after Destroy = %v", err)
	}
	if _, err := SealWithKeyID(k2, []byte("dek-42"), nil, nil); err != ErrKeyDestroyed {
		t.Fatalf("SealWithKeyID after Destroy = %v", err)
	}
	for _, id := range [][]byte{nil, {}, bytes.Repeat([]byte{1}, MaxKeyIDLen+1)} {
		if _, err := SealWithKeyID(k, id, nil, nil); err == nil {
			t.Fatalf("SealWithKeyID with key id of %d bytes succeeded", len(id))
		}
	}
}

func TestParseMarshal(t *testing.T) {
	e := newTestEnvelope(t, goldenKEK(t))
	inline := mustEncrypt(t, e, []byte("payload"), []byte("aad"))
	k, _, err := NewDataKey(context.Background(), goldenKEK(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	external, err := SealWithKeyID(k, []byte("id"), []byte("payload"), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, blob := range [][]byte{inline, external} {
		m, err := Parse(blob)
		if err != nil {
			t.Fatal(err)
		}
		out, err := m.MarshalBinary()
		if err != nil || !bytes.Equal(out, blob) {
			t.Fatalf("MarshalBinary(Parse(blob)) differs: %v", err)
		}
		if len(m.Ciphertext) != len("payload")+TagSize {
			t.Fatalf("ciphertext length %d", len(m.Ciphertext))
		}
	}
}

func TestLimits(t *testing.T) {
	ctx := context.Background()
	e := newTestEnvelope(t, goldenKEK(t))
	if _, err := e.Encrypt(ctx, make([]byte, MaxPlaintextLen+1), nil); err == nil {
		t.Fatal("Encrypt of MaxPlaintextLen+1 bytes succeeded")
	}
	if _, err := e.Encrypt(ctx, nil, make([]byte, MaxAADLen+1)); err == nil {
		t.Fatal("Encrypt with MaxAADLen+1 bytes of aad succeeded")
	}
	blob := mustEncrypt(t, e, nil, make([]byte, MaxAADLen))
	if _, err := e.Decrypt(ctx, blob, make([]byte, MaxAADLen)); err != nil {
		t.Fatalf("Decrypt with MaxAADLen aad: %v", err)
	}
	for _, o := range []Option{WithMaxMessages(0), WithMaxMessages(MaxMessagesLimit + 1), WithMaxAge(-1),
		WithCacheEntries(0), WithCacheTTL(0), WithWrapAAD(make([]byte, MaxAADLen+1))} {
		if _, err := New(goldenKEK(t), o); err == nil {
			t.Fatal("New accepted an out-of-range option")
		}
	}
	if _, err := New(nil); err == nil {
		t.Fatal("New(nil) succeeded")
	}
}

func TestClose(t *testing.T) {
	ctx := context.Background()
	e, err := New(goldenKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	blob := mustEncrypt(t, e, []byte("x"), nil)
	if _, err := e.Decrypt(ctx, blob, nil); err != nil {
		t.Fatal(err)
	}
	active := e.active.Load().key
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if active.aead.Load() != nil {
		t.Fatal("active DEK still usable after Close")
	}
	if _, err := e.Encrypt(ctx, []byte("x"), nil); err != ErrClosed {
		t.Fatalf("Encrypt after Close = %v", err)
	}
	if _, err := e.Decrypt(ctx, blob, nil); err != ErrClosed {
		t.Fatalf("Decrypt after Close = %v", err)
	}
}

// TestBadKeys: a DEK of the wrong length or a missing provider is a clear
// error, and an Envelope treats a wrong-length DEK as a failed decryption.
func TestBadKeys(t *testing.T) {
	ctx := context.Background()
	kek := newKEK(t, "bad")
	wk, err := kek.Wrap(ctx, make([]byte, 16), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := UnwrapDataKey(ctx, kek, wk, nil); err == nil || err.Error() != "envelope: data key length 16, want 32" {
		t.Fatalf("UnwrapDataKey of a 16-byte DEK: %v", err)
	}
	if _, _, err := NewDataKey(ctx, nil, nil); err == nil {
		t.Fatal("NewDataKey with a nil provider succeeded")
	}
	if _, err := UnwrapDataKey(ctx, nil, wk, nil); err == nil {
		t.Fatal("UnwrapDataKey with a nil provider succeeded")
	}
	if _, _, err := NewDataKey(ctx, kek, nil, WithMaxMessages(0)); err == nil {
		t.Fatal("NewDataKey accepted a zero budget")
	}
	m := &Message{Header: Header{Version: Version, Algorithm: AES256GCM, WrappedKey: wk, Nonce: make([]byte, NonceSize)}, Ciphertext: make([]byte, TagSize)}
	blob, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newTestEnvelope(t, kek).Decrypt(ctx, blob, nil); err != ErrDecrypt {
		t.Fatalf("Decrypt with a 16-byte inline DEK: %v", err)
	}
}
