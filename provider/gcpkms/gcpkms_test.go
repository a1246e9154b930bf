package gcpkms_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	kms "cloud.google.com/go/kms/apiv1"
	"cloud.google.com/go/kms/apiv1/kmspb"
	"github.com/googleapis/gax-go/v2/apierror"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/gcpkms"
	"github.com/profullstack/keybroker/provider/gcpkms/kmstest"
	"github.com/profullstack/keybroker/provider/providertest"
)

const (
	location = "projects/keybroker-test/locations/us-east1"
	ring     = location + "/keyRings/test"
)

// env is one fake Cloud KMS with a key ring and a real client talking to it.
type env struct {
	srv    *kmstest.Server
	client *kms.KeyManagementClient
	seq    atomic.Int64
}

func newEnv(t testing.TB) *env {
	t.Helper()
	srv, err := kmstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	ctx := context.Background()
	client, err := kms.NewKeyManagementClient(ctx, srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	if _, err := client.CreateKeyRing(ctx, &kmspb.CreateKeyRingRequest{Parent: location, KeyRingId: "test", KeyRing: &kmspb.KeyRing{}}); err != nil {
		t.Fatal(err)
	}
	return &env{srv: srv, client: client}
}

// createKey creates a fresh CryptoKey on the fake server and returns its name.
func (e *env) createKey(t testing.TB, skipInitial bool) string {
	t.Helper()
	k, err := e.client.CreateCryptoKey(context.Background(), &kmspb.CreateCryptoKeyRequest{
		Parent:                     ring,
		CryptoKeyId:                fmt.Sprintf("key-%d", e.seq.Add(1)),
		CryptoKey:                  &kmspb.CryptoKey{Purpose: kmspb.CryptoKey_ENCRYPT_DECRYPT},
		SkipInitialVersionCreation: skipInitial,
	})
	if err != nil {
		t.Fatal(err)
	}
	return k.Name
}

func (e *env) newKey(t testing.TB) *gcpkms.Provider {
	t.Helper()
	p, err := gcpkms.New(e.client, e.createKey(t, false))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// wrapped makes a fresh key and wraps a fresh DEK under it with aad.
func (e *env) wrapped(t testing.TB, aad []byte) (*gcpkms.Provider, []byte, *provider.WrappedKey) {
	t.Helper()
	p := e.newKey(t)
	dek := newDEK(t)
	wk, err := p.Wrap(context.Background(), dek, aad)
	if err != nil {
		t.Fatal(err)
	}
	return p, dek, wk
}

// intercept installs f for the rest of the test.
func (e *env) intercept(t *testing.T, f grpc.UnaryServerInterceptor) {
	e.srv.SetInterceptor(f)
	t.Cleanup(func() { e.srv.SetInterceptor(nil) })
}

// counter counts calls of one RPC and lets mutate change the first n
// responses (n < 0: all of them) or replace them with an error.
type counter struct {
	mu    sync.Mutex
	calls int
}

func (c *counter) n() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls
}

func (e *env) onMethod(t *testing.T, method string, n int, mutate func(resp any) error) *counter {
	c := &counter{}
	e.intercept(t, func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if !strings.HasSuffix(info.FullMethod, "/"+method) {
			return h(ctx, req)
		}
		c.mu.Lock()
		c.calls++
		hit := n < 0 || c.calls <= n
		c.mu.Unlock()
		resp, err := h(ctx, req)
		if err != nil || !hit {
			return resp, err
		}
		if err := mutate(resp); err != nil {
			return nil, err
		}
		return resp, nil
	})
	return c
}

func failWith(code codes.Code) func(any) error {
	return func(any) error { return status.Error(code, "injected "+code.String()) }
}

func newDEK(t testing.TB) []byte {
	dek := make([]byte, 32)
	if _, err := rand.Read(dek); err != nil {
		t.Fatal(err)
	}
	return dek
}

func TestConformance(t *testing.T) {
	e := newEnv(t)
	providertest.Run(t, providertest.Harness{
		NewKey: func(ctx context.Context, t *testing.T) provider.KEKProvider { return e.newKey(t) },
		// Another client with its own connection to the same server.
		Reopen: func(ctx context.Context, t *testing.T, p provider.KEKProvider) provider.KEKProvider {
			client, err := kms.NewKeyManagementClient(ctx, e.srv.ClientOptions()...)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Close() })
			q, err := gcpkms.New(client, p.Ref().KeyID)
			if err != nil {
				t.Fatal(err)
			}
			return q
		},
	})
}

func TestEncryptResponseIntegrity(t *testing.T) {
	e := newEnv(t)
	p := e.newKey(t)
	ctx := context.Background()
	aad := []byte("tenant=7")
	for _, c := range []struct {
		name   string
		mutate func(*kmspb.EncryptResponse)
	}{
		{"ciphertext checksum", func(r *kmspb.EncryptResponse) { r.CiphertextCrc32C.Value ^= 1 }},
		{"ciphertext checksum missing", func(r *kmspb.EncryptResponse) { r.CiphertextCrc32C = nil }},
		{"ciphertext corrupted", func(r *kmspb.EncryptResponse) { r.Ciphertext[len(r.Ciphertext)/2] ^= 0x40 }},
		{"plaintext not verified", func(r *kmspb.EncryptResponse) { r.VerifiedPlaintextCrc32C = false }},
		{"aad not verified", func(r *kmspb.EncryptResponse) { r.VerifiedAdditionalAuthenticatedDataCrc32C = false }},
		{"other key", func(r *kmspb.EncryptResponse) { r.Name = strings.Replace(r.Name, "/cryptoKeys/", "/cryptoKeys/x", 1) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			mutate := func(r any) error { c.mutate(r.(*kmspb.EncryptResponse)); return nil }
			// Always corrupted: Wrap gives up after a bounded number of attempts.
			calls := e.onMethod(t, "Encrypt", -1, mutate)
			wk, err := p.Wrap(ctx, newDEK(t), aad)
			if wk != nil || !errors.Is(err, gcpkms.ErrIntegrity) || !errors.Is(err, provider.ErrUnavailable) {
				t.Fatalf("Wrap = %v, %v; want ErrIntegrity of kind ErrUnavailable", wk, err)
			}
			if calls.n() != 3 {
				t.Fatalf("Encrypt called %d times, want 3", calls.n())
			}
			// Corrupted once: the second attempt succeeds.
			calls = e.onMethod(t, "Encrypt", 1, mutate)
			dek := newDEK(t)
			wk, err = p.Wrap(ctx, dek, aad)
			if err != nil {
				t.Fatalf("Wrap after one corrupted response: %v", err)
			}
			if calls.n() != 2 {
				t.Fatalf("Encrypt called %d times, want 2", calls.n())
			}
			got, err := p.Unwrap(ctx, wk, aad)
			if err != nil || !bytes.Equal(got, dek) {
				t.Fatalf("Unwrap: %v", err)
			}
		})
	}
}

func TestDecryptResponseIntegrity(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p, dek, wk := e.wrapped(t, nil)
	for _, c := range []struct {
		name   string
		mutate func(*kmspb.DecryptResponse)
	}{
		{"plaintext checksum", func(r *kmspb.DecryptResponse) { r.PlaintextCrc32C.Value ^= 1 }},
		{"plaintext checksum missing", func(r *kmspb.DecryptResponse) { r.PlaintextCrc32C = nil }},
		{"plaintext corrupted", func(r *kmspb.DecryptResponse) { r.Plaintext[0] ^= 1 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			mutate := func(r any) error { c.mutate(r.(*kmspb.DecryptResponse)); return nil }
			calls := e.onMethod(t, "Decrypt", -1, mutate)
			got, err := p.Unwrap(ctx, wk, nil)
			if got != nil || !errors.Is(err, gcpkms.ErrIntegrity) || !provider.IsRetryable(err) {
				t.Fatalf("Unwrap = %d bytes, %v; want retryable ErrIntegrity", len(got), err)
			}
			if calls.n() != 3 {
				t.Fatalf("Decrypt called %d times, want 3", calls.n())
			}
			e.onMethod(t, "Decrypt", 1, mutate)
			got, err = p.Unwrap(ctx, wk, nil)
			if err != nil || !bytes.Equal(got, dek) {
				t.Fatalf("Unwrap after one corrupted response: %v", err)
			}
		})
	}
}

// The fake server checks request checksums as Cloud KMS does.
func TestServerVerifiesRequestChecksums(t *testing.T) {
	e := newEnv(t)
	name := e.createKey(t, false)
	ctx := context.Background()
	_, err := e.client.Encrypt(ctx, &kmspb.EncryptRequest{Name: name, Plaintext: []byte("x"), PlaintextCrc32C: wrapperspb.Int64(1)})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Encrypt with a wrong plaintext checksum: %v, want InvalidArgument", err)
	}
	resp, err := e.client.Encrypt(ctx, &kmspb.EncryptRequest{Name: name, Plaintext: []byte("x")})
	if err != nil || resp.VerifiedPlaintextCrc32C || resp.VerifiedAdditionalAuthenticatedDataCrc32C {
		t.Fatalf("Encrypt without checksums: %v, verified flags %v %v", err, resp.GetVerifiedPlaintextCrc32C(), resp.GetVerifiedAdditionalAuthenticatedDataCrc32C())
	}
	_, err = e.client.Decrypt(ctx, &kmspb.DecryptRequest{Name: name, Ciphertext: resp.Ciphertext, CiphertextCrc32C: wrapperspb.Int64(1)})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Decrypt with a wrong ciphertext checksum: %v, want InvalidArgument", err)
	}
	_, err = e.client.Decrypt(ctx, &kmspb.DecryptRequest{Name: name, Ciphertext: resp.Ciphertext, AdditionalAuthenticatedData: []byte("a"), AdditionalAuthenticatedDataCrc32C: wrapperspb.Int64(1)})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Decrypt with a wrong AAD checksum: %v, want InvalidArgument", err)
	}
	for _, n := range []int{kmstest.MaxPlaintextLen + 1} {
		_, err = e.client.Encrypt(ctx, &kmspb.EncryptRequest{Name: name, Plaintext: make([]byte, n)})
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("Encrypt of %d bytes: %v, want InvalidArgument", n, err)
		}
		_, err = e.client.Encrypt(ctx, &kmspb.EncryptRequest{Name: name, Plaintext: []byte("x"), AdditionalAuthenticatedData: make([]byte, n)})
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("Encrypt with %d bytes of AAD: %v, want InvalidArgument", n, err)
		}
	}
	if _, err = e.client.Encrypt(ctx, &kmspb.EncryptRequest{Name: name, Plaintext: make([]byte, kmstest.MaxPlaintextLen)}); err != nil {
		t.Fatalf("Encrypt of exactly %d bytes: %v", kmstest.MaxPlaintextLen, err)
	}
}

func TestDisabledAndDestroyedVersions(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p, dek, wk := e.wrapped(t, nil)
	if err := p.Retire(ctx, wk.Version); err == nil || !strings.Contains(err.Error(), "primary") {
		t.Fatalf("Retire of the primary version: %v, want a refusal", err)
	}
	if _, err := p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.Retire(ctx, wk.Version); err != nil {
		t.Fatalf("Retire: %v", err)
	}
	if err := p.Retire(ctx, wk.Version); err != nil {
		t.Fatalf("Retire of a version already retired: %v", err)
	}
	checkVersions(t, p, "2", "2")
	got, err := p.Unwrap(ctx, wk, nil)
	if got != nil || !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Unwrap under a disabled version = %v; want ErrKeyDisabled", err)
	}
	var apiErr *apierror.APIError
	if !errors.As(err, &apiErr) || apiErr.GRPCStatus().Code() != codes.FailedPrecondition || status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("native status not reachable from %v", err)
	}
	if provider.IsRetryable(err) {
		t.Fatal("a disabled version is reported as retryable")
	}

	// Re-enabled, it unwraps again: disabling is reversible.
	version := p.Ref().KeyID + "/cryptoKeyVersions/" + wk.Version
	if _, err := e.client.UpdateCryptoKeyVersion(ctx, &kmspb.UpdateCryptoKeyVersionRequest{
		CryptoKeyVersion: &kmspb.CryptoKeyVersion{Name: version, State: kmspb.CryptoKeyVersion_ENABLED},
		UpdateMask:       &fieldmaskpb.FieldMask{Paths: []string{"state"}},
	}); err != nil {
		t.Fatal(err)
	}
	if got, err := p.Unwrap(ctx, wk, nil); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("Unwrap after re-enabling: %v", err)
	}
	checkVersions(t, p, "2", "1", "2")

	if _, err := e.client.DestroyCryptoKeyVersion(ctx, &kmspb.DestroyCryptoKeyVersionRequest{Name: version}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Unwrap(ctx, wk, nil); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Unwrap under a destroyed version = %v; want ErrKeyDisabled", err)
	}
	if err := p.Retire(ctx, wk.Version); err != nil {
		t.Fatalf("Retire of a destroyed version = %v; want success", err)
	}
	checkVersions(t, p, "2", "2")
	for _, v := range []string{"99", "cryptoKeyVersions/1", "0", ""} {
		if err := p.Retire(ctx, v); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Fatalf("Retire(%q) = %v; want ErrKeyNotFound", v, err)
		}
	}
}

// checkVersions asserts what Describe reports.
func checkVersions(t *testing.T, p *gcpkms.Provider, primary string, versions ...string) {
	t.Helper()
	st, err := p.Describe(context.Background())
	if err != nil {
		t.Fatalf("Describe: %v", err)
	}
	if st.PrimaryVersion != primary || !slices.Equal(st.Versions, versions) || !st.Reachable || st.Ref != p.Ref() {
		t.Fatalf("Describe = %+v; want primary %q, versions %q", st, primary, versions)
	}
}

func TestNoPrimaryAndUnknownKey(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p, err := gcpkms.New(e.client, e.createKey(t, true))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Wrap(ctx, newDEK(t), nil); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Wrap with no primary version = %v; want ErrKeyDisabled", err)
	}
	if _, err := p.Describe(ctx); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Describe with no primary version = %v; want ErrKeyDisabled", err)
	}

	p, err = gcpkms.New(e.client, ring+"/cryptoKeys/missing")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Wrap(ctx, newDEK(t), nil); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("Wrap under an unknown key = %v; want ErrKeyNotFound", err)
	}
	if _, err := p.Describe(ctx); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("Describe of an unknown key = %v; want ErrKeyNotFound", err)
	}
}

func TestMalformedNames(t *testing.T) {
	e := newEnv(t)
	for name, want := range map[string]string{
		"":                      "malformed CryptoKey name",
		"projects/p":            "malformed CryptoKey name",
		ring:                    "malformed CryptoKey name",
		ring + "/cryptoKeys/k/": "malformed CryptoKey name",
		ring + "/cryptoKeys/k/cryptoKeyVersions/1":                                "not a CryptoKeyVersion",
		"project/p/locations/l/keyRings/r/cryptoKeys/k":                           `segment 1 is "project"`,
		"projects/p/locations/l/keyRing/r/cryptoKeys/k":                           `segment 5 is "keyRing"`,
		"projects/p/locations/L!/keyRings/r/cryptoKeys/k":                         "invalid locations id",
		"projects/p/locations/l/keyRings/r/cryptoKeys/k.k":                        "invalid cryptoKeys id",
		"projects/p/locations/l/keyRings//cryptoKeys/k":                           "invalid keyRings id",
		"projects/p/locations/l/keyRings/r/cryptoKeys/" + strings.Repeat("k", 64): "invalid cryptoKeys id",
		strings.Repeat("x", provider.MaxKeyIDLen+1):                               "longer than",
	} {
		_, err := gcpkms.New(e.client, name)
		if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("New(%.40q) = %v; want a one-line error containing %q", name, err, want)
		}
		_, err = gcpkms.Open(context.Background(), name, e.srv.ClientOptions()...)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Open(%.40q) = %v; want an error containing %q", name, err, want)
		}
	}
	if _, err := gcpkms.New(nil, ring+"/cryptoKeys/k"); err == nil {
		t.Error("New with a nil client succeeded")
	}
}

func TestOpenURL(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	name := e.createKey(t, false)
	p, err := provider.Open(ctx, "gcpkms://"+name+"?endpoint="+e.srv.Addr()+"&insecure=true")
	if err != nil {
		t.Fatal(err)
	}
	defer p.(io.Closer).Close()
	if p.Ref() != (provider.KeyRef{Provider: "gcpkms", KeyID: name}) {
		t.Fatalf("Ref = %v", p.Ref())
	}
	dek := newDEK(t)
	wk, err := p.Wrap(ctx, dek, []byte("a"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := p.Unwrap(ctx, wk, []byte("a")); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("Unwrap: %v", err)
	}

	for url, want := range map[string]string{
		"gcpkms://projects/p/locations/l/keyRings/r":                       "malformed CryptoKey name",
		"gcpkms://" + name + "?endpoint=kms.example.com:443&insecure=true": "loopback",
		"gcpkms://" + name + "?insecure=true":                              "loopback",
		"gcpkms://" + name + "?endpoint=127.0.0.1:1&insecure=yes":          "insecure must be true or false",
		"gcpkms://" + name + "?token=s3cret":                               `unknown URL parameter "token"`,
		"gcpkms://" + name + "?endpoint=a:1&endpoint=b:2":                  "given 2 times",
		"gcpkms://user:s3cret@" + name:                                     "URL must be",
	} {
		_, err := provider.Open(ctx, url)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Open(%q) = %v; want an error containing %q", url, err, want)
			continue
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("error echoes a secret from the URL: %v", err)
		}
	}
}

func TestRewrapSkipsWhenPrimaryUsed(t *testing.T) {
	e := newEnv(t)
	p := e.newKey(t)
	ctx := context.Background()
	aad := []byte("row=1")
	dek := newDEK(t)
	wk, err := p.Wrap(ctx, dek, aad)
	if err != nil {
		t.Fatal(err)
	}
	count := func(any) error { return nil }

	encrypts := e.onMethod(t, "Encrypt", -1, count)
	same, err := p.Rewrap(ctx, wk, aad)
	if err != nil {
		t.Fatal(err)
	}
	if encrypts.n() != 0 || same.Version != wk.Version || !bytes.Equal(same.Ciphertext, wk.Ciphertext) {
		t.Fatalf("Rewrap under the primary version re-encrypted (%d Encrypt calls, version %q -> %q)", encrypts.n(), wk.Version, same.Version)
	}
	same.Ciphertext[0] ^= 1 // a copy, not the caller's key
	if same.Ciphertext[0] == wk.Ciphertext[0] {
		t.Fatal("Rewrap returned the caller's ciphertext slice")
	}

	v2, err := p.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	nwk, err := p.Rewrap(ctx, wk, aad)
	if err != nil {
		t.Fatal(err)
	}
	if encrypts.n() != 1 || nwk.Version != v2 {
		t.Fatalf("Rewrap after rotation: %d Encrypt calls, version %q; want 1 call, version %q", encrypts.n(), nwk.Version, v2)
	}
	if got, err := p.Unwrap(ctx, nwk, aad); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("Unwrap of the rewrapped key: %v", err)
	}
	if st, err := p.Describe(ctx); err != nil || st.PrimaryVersion != v2 {
		t.Fatalf("Describe = %+v, %v; want primary %q", st, err, v2)
	}
}

func TestErrorMapping(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p, dek, wk := e.wrapped(t, nil)
	for _, c := range []struct {
		code       codes.Code
		wrap, unwr error // kinds; nil means none
	}{
		{codes.NotFound, provider.ErrKeyNotFound, provider.ErrKeyNotFound},
		{codes.PermissionDenied, provider.ErrAccessDenied, provider.ErrAccessDenied},
		{codes.Unauthenticated, provider.ErrAccessDenied, provider.ErrAccessDenied},
		{codes.FailedPrecondition, provider.ErrKeyDisabled, provider.ErrKeyDisabled},
		{codes.InvalidArgument, nil, provider.ErrInvalidCiphertext},
		{codes.Internal, nil, nil},
	} {
		e.onMethod(t, "Encrypt", -1, failWith(c.code))
		_, err := p.Wrap(ctx, dek, nil)
		checkKind(t, "Wrap "+c.code.String(), err, c.wrap, c.code)
		e.onMethod(t, "Decrypt", -1, failWith(c.code))
		got, err := p.Unwrap(ctx, wk, nil)
		if got != nil {
			t.Fatal("Unwrap returned key bytes with an error")
		}
		checkKind(t, "Unwrap "+c.code.String(), err, c.unwr, c.code)
	}
	// CreateCryptoKeyVersion is not retried, so its errors show the mapping
	// of the codes the idempotent RPCs retry.
	for _, code := range []codes.Code{codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded} {
		calls := e.onMethod(t, "CreateCryptoKeyVersion", -1, failWith(code))
		_, err := p.Rotate(ctx)
		checkKind(t, "Rotate "+code.String(), err, provider.ErrUnavailable, code)
		if calls.n() != 1 {
			t.Fatalf("CreateCryptoKeyVersion called %d times, want 1 (not retried)", calls.n())
		}
	}
}

func checkKind(t *testing.T, what string, err, kind error, code codes.Code) {
	t.Helper()
	all := []error{provider.ErrKeyNotFound, provider.ErrAccessDenied, provider.ErrKeyDisabled, provider.ErrUnavailable, provider.ErrInvalidCiphertext}
	for _, k := range all {
		if errors.Is(err, k) != (k == kind) {
			t.Fatalf("%s: error %v: errors.Is(%v) = %v", what, err, k, !(k == kind))
		}
	}
	if err == nil || status.Code(err) != code {
		t.Fatalf("%s: error %v does not carry status code %v", what, err, code)
	}
	var pe *provider.Error
	if !errors.As(err, &pe) || pe.Provider != "gcpkms" || strings.Contains(err.Error(), "\n") {
		t.Fatalf("%s: error %q is not a one-line *provider.Error", what, err)
	}
}

func TestRetries(t *testing.T) {
	e := newEnv(t)
	p := e.newKey(t)
	ctx := context.Background()
	dek := newDEK(t)

	// Transient failures are retried by gax until one succeeds.
	for _, code := range []codes.Code{codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded} {
		calls := e.onMethod(t, "Encrypt", 2, failWith(code))
		if _, err := p.Wrap(ctx, dek, nil); err != nil {
			t.Fatalf("Wrap after two %v failures: %v", code, err)
		}
		if calls.n() != 3 {
			t.Fatalf("Encrypt called %d times after two %v failures, want 3", calls.n(), code)
		}
	}
	// Others are not.
	calls := e.onMethod(t, "Encrypt", -1, failWith(codes.PermissionDenied))
	if _, err := p.Wrap(ctx, dek, nil); !errors.Is(err, provider.ErrAccessDenied) || calls.n() != 1 {
		t.Fatalf("PermissionDenied: %v after %d calls; want ErrAccessDenied after 1", err, calls.n())
	}

	// The caller's context wins over retries: canceled while failing.
	cctx, cancel := context.WithCancel(ctx)
	calls = e.onMethod(t, "Encrypt", -1, func(any) error {
		cancel()
		return status.Error(codes.Unavailable, "injected")
	})
	_, err := p.Wrap(cctx, dek, nil)
	if !errors.Is(err, context.Canceled) || provider.IsRetryable(err) || calls.n() != 1 {
		t.Fatalf("Wrap canceled during retries: %v after %d calls; want context.Canceled, not retryable, 1 call", err, calls.n())
	}
	// An expired deadline is reported as such, not as ErrUnavailable.
	dctx, dcancel := context.WithDeadline(ctx, time.Unix(1, 0))
	defer dcancel()
	e.srv.SetInterceptor(nil)
	if _, err := p.Wrap(dctx, dek, nil); !errors.Is(err, context.DeadlineExceeded) || provider.IsRetryable(err) {
		t.Fatalf("Wrap with an expired deadline: %v; want context.DeadlineExceeded, not retryable", err)
	}
}

func TestOpenWithoutCredentials(t *testing.T) {
	t.Setenv("GOOGLE_APPLICATION_CREDENTIALS", t.TempDir()+"/missing.json")
	_, err := gcpkms.Open(context.Background(), ring+"/cryptoKeys/k")
	if err == nil || !strings.Contains(err.Error(), "creating KMS client") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Open without credentials = %v; want a one-line client creation error", err)
	}
}

func TestAADLimit(t *testing.T) {
	e := newEnv(t)
	p := e.newKey(t)
	ctx := context.Background()
	dek := newDEK(t)
	big := bytes.Repeat([]byte{'a'}, gcpkms.MaxAADLen)
	wk, err := p.Wrap(ctx, dek, big)
	if err != nil {
		t.Fatalf("Wrap with %d bytes of aad: %v", len(big), err)
	}
	if got, err := p.Unwrap(ctx, wk, big); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("Unwrap with %d bytes of aad: %v", len(big), err)
	}
	over := append(big, 'a')
	if _, err := p.Wrap(ctx, dek, over); err == nil || !strings.Contains(err.Error(), "aad length 65537 exceeds 65536") {
		t.Fatalf("Wrap with %d bytes of aad = %v; want a length error", len(over), err)
	}
	if _, err := p.Unwrap(ctx, wk, over); !errors.Is(err, provider.ErrInvalidCiphertext) {
		t.Fatalf("Unwrap with %d bytes of aad = %v; want ErrInvalidCiphertext", len(over), err)
	}
}

// TestDescribeVersionOrder: Describe lists versions in numeric id order
// whatever order the service lists them in (Cloud KMS sorts names as
// strings: 1 10 11 12 2 ...; here the listing is also reversed).
func TestDescribeVersionOrder(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p := e.newKey(t)
	want := []string{"1"}
	for range 11 {
		v, err := p.Rotate(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, v)
	}
	e.onMethod(t, "ListCryptoKeyVersions", -1, func(resp any) error {
		vs := resp.(*kmspb.ListCryptoKeyVersionsResponse).CryptoKeyVersions
		slices.SortFunc(vs, func(a, b *kmspb.CryptoKeyVersion) int { return strings.Compare(b.GetName(), a.GetName()) })
		return nil
	})
	checkVersions(t, p, "12", want...)
}
