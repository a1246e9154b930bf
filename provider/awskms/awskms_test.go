package awskms_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/aws/smithy-go"

	"github.com/profullstack/keybroker/internal/localkms"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/awskms"
	"github.com/profullstack/keybroker/provider/providertest"
)

// region is local-kms's default region; its keys' ARNs name it.
const region = localkms.Region

// Set by TestMain.
var (
	endpoint  string      // http://127.0.0.1:<port> of the local-kms server
	admin     *kms.Client // a plain SDK client for setting up keys
	seededARN string      // a seeded key with two backing keys, alias/keybroker-example
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "keybroker-awskms-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "awskms test:", err)
		return 1
	}
	defer os.RemoveAll(dir)

	// The SDK's default chain finds dummy credentials; nothing from the
	// developer's own AWS configuration is used.
	localkms.SetTestEnv(dir)
	stop, err := startLocalKMS(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "awskms test:", err)
		return 1
	}
	defer stop()
	return m.Run()
}

// startLocalKMS starts local-kms (internal/localkms) seeded with one key
// that has two backing keys (as if rotated once) and an alias for it.
func startLocalKMS(dir string) (stop func(), err error) {
	seededID := "6f8c5a1e-3b2d-4c7a-9e1f-0a2b3c4d5e6f"
	seededARN = fmt.Sprintf("arn:aws:kms:%s:111122223333:key/%s", region, seededID)
	seed := fmt.Sprintf(`Keys:
  Symmetric:
    Aes:
      - Metadata:
          KeyId: %s
        BackingKeys:
          - %s
          - %s
Aliases:
  - AliasName: alias/keybroker-example
    TargetKeyId: %s
`, seededID, randomHex(32), randomHex(32), seededID)
	srv, err := localkms.Start(dir, seed, seededARN)
	if err != nil {
		return nil, err
	}
	endpoint, admin = srv.Endpoint, srv.Admin
	// An unpatched local-kms (built before scripts/deps.sh applied the patch)
	// would fail the tamper and rotation tests confusingly.
	out, err := admin.DescribeKey(context.Background(), &kms.DescribeKeyInput{KeyId: aws.String(seededARN)})
	if err != nil || out.KeyMetadata.CurrentKeyMaterialId == nil {
		srv.Stop()
		return nil, fmt.Errorf("local-kms lacks provider/awskms/testdata/local-kms.patch (no CurrentKeyMaterialId): run `make deps` to rebuild it")
	}
	return srv.Stop, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func keyURL(key string, params ...string) string {
	u := "awskms:///" + key + "?region=" + region + "&endpoint=" + endpoint
	for _, p := range params {
		u += "&" + p
	}
	return u
}

// createKey makes a fresh symmetric key with CreateKey and returns its ARN.
func createKey(t testing.TB) string {
	t.Helper()
	out, err := admin.CreateKey(context.Background(), &kms.CreateKeyInput{Description: aws.String("keybroker test " + t.Name())})
	if err != nil {
		t.Fatalf("CreateKey: %v", err)
	}
	return aws.ToString(out.KeyMetadata.Arn)
}

func openKey(t testing.TB, arn string) *awskms.Provider {
	t.Helper()
	p, err := provider.Open(context.Background(), keyURL(arn))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return p.(*awskms.Provider)
}

func TestConformance(t *testing.T) {
	providertest.Run(t, providertest.Harness{
		NewKey: func(ctx context.Context, t *testing.T) provider.KEKProvider {
			return openKey(t, createKey(t))
		},
		// Another client (own HTTP connections, own version cache).
		Reopen: func(ctx context.Context, t *testing.T, p provider.KEKProvider) provider.KEKProvider {
			return openKey(t, p.Ref().KeyID)
		},
		VersionLabelCached: true,
	})
}

func TestOpen(t *testing.T) {
	ctx := context.Background()
	arn := createKey(t)
	id := arn[strings.LastIndex(arn, "/")+1:]
	alias := "alias/keybroker-open-" + randomHex(4) // unique: the server outlives -count runs
	if _, err := admin.CreateAlias(ctx, &kms.CreateAliasInput{AliasName: aws.String(alias), TargetKeyId: aws.String(id)}); err != nil {
		t.Fatal(err)
	}
	aliasARN := fmt.Sprintf("arn:aws:kms:%s:111122223333:%s", region, alias)
	q := "?region=" + region + "&endpoint=" + endpoint
	for _, u := range []string{
		"awskms:///" + arn + q,
		"awskms://" + id + q,
		"awskms://" + alias + q,
		"awskms:///" + alias + q,
		"awskms:///" + aliasARN + "?endpoint=" + endpoint, // region from the ARN
		"awskms:///" + arn + q + "&timeout=3s&max_attempts=5",
	} {
		p, err := provider.Open(ctx, u)
		if err != nil {
			t.Errorf("provider.Open(%s): %v", u, err)
			continue
		}
		if got := p.Ref(); got != (provider.KeyRef{Provider: "awskms", KeyID: arn}) {
			t.Errorf("provider.Open(%s).Ref() = %v, want the key ARN %s", u, got, arn)
		}
	}
	// awskms.Open also takes an ARN right after "awskms://", which net/url
	// (and so provider.Open) cannot parse.
	for _, u := range []string{
		"awskms://" + arn + q,
		"awskms://" + aliasARN + "?endpoint=" + endpoint,
		"awskms://" + strings.ReplaceAll(arn, ":", "%3A") + q,
		"awskms:///" + arn + q,
		"awskms://" + alias + q,
	} {
		p, err := awskms.Open(ctx, u)
		if err != nil {
			t.Errorf("awskms.Open(%s): %v", u, err)
			continue
		}
		if p.Ref().KeyID != arn {
			t.Errorf("awskms.Open(%s).Ref().KeyID = %s, want %s", u, p.Ref().KeyID, arn)
		}
	}

	// The region may come from the SDK's configuration instead.
	t.Setenv("AWS_REGION", region)
	if p, err := provider.Open(ctx, "awskms://"+id+"?endpoint="+endpoint); err != nil || p.Ref().KeyID != arn {
		t.Errorf("Open with the region from AWS_REGION: %v", err)
	}

	// A seeded alias resolves to its key too.
	p, err := awskms.Open(ctx, "awskms://alias/keybroker-example"+q)
	if err != nil || p.Ref().KeyID != seededARN {
		t.Errorf("Open of the seeded alias: %v, %v", p, err)
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	arn := createKey(t)
	id := arn[strings.LastIndex(arn, "/")+1:]
	ep := "&endpoint=" + endpoint
	for _, c := range []struct {
		url, want string
		rawOnly   bool // net/url, so provider.Open, rejects it before awskms sees it
	}{
		{"awskms://" + id + "?endpoint=" + endpoint, "no region", false},
		{"awskms://?region=" + region + ep, "no key", false},
		{"awskms:///?region=" + region + ep, "no key", false},
		{"awskms://a%zzb?region=" + region + ep, "percent-encoding", true},
		{"awskms:///" + arn + "?region=us-east-1" + ep, "differs from the key ARN", false},
		{"awskms:///" + arn + "?region=" + region + "&endpoint=ftp://x", "endpoint parameter", false},
		{"awskms://" + id + "?region=EU%20WEST" + ep, "not an AWS Region", false},
		{"awskms:///arn:aws:kms:eu_west:111122223333:key/" + id + "?endpoint=" + endpoint, "not an AWS Region", false},
		{"awskms:///" + arn + "?region=" + region + "&endpoint=http://u:secret@127.0.0.1:1", "endpoint parameter", false},
		{"awskms:///" + arn + "?region=" + region + ep + "&timeout=forever", "timeout parameter", false},
		{"awskms:///" + arn + "?region=" + region + ep + "&timeout=-1s", "timeout parameter", false},
		{"awskms:///" + arn + "?region=" + region + ep + "&max_attempts=0", "max_attempts parameter", false},
		{"awskms:///" + arn + "?region=" + region + ep + "&max_attempts=11", "max_attempts parameter", false},
		{"awskms:///" + arn + "?region=" + region + ep + "&secret_key=hunter2", "unknown URL parameter", false},
		{"awskms:///" + arn + "?region=" + region + "&region=" + region + ep, "given 2 times", false},
		{"awskms://AKID:hunter2@" + id + "?region=" + region + ep, "user information", false},
		{"awskms://" + id + "#frag?region=" + region + ep, "malformed", false},
		{"awskms://" + arn + "?region=" + region + "&region=" + region + ep, "given 2 times", true},
		{"awskms://" + arn + "?region=us-east-1" + ep, "differs from the key ARN", true},
		{"awskms://alias/keybroker%20x?region=" + region + ep, "spaces", false},
	} {
		opens := map[string]func() error{
			"awskms.Open": func() error { _, err := awskms.Open(ctx, c.url); return err },
		}
		if !c.rawOnly {
			opens["provider.Open"] = func() error { _, err := provider.Open(ctx, c.url); return err }
		}
		for name, open := range opens {
			err := open()
			if err == nil {
				t.Errorf("%s(%s) succeeded, want an error containing %q", name, c.url, c.want)
				continue
			}
			msg := err.Error()
			if !strings.Contains(msg, c.want) {
				t.Errorf("%s(%s) = %q, want it to contain %q", name, c.url, msg, c.want)
			}
			if strings.Contains(msg, "hunter2") || strings.Contains(msg, endpoint) || strings.Contains(msg, "\n") {
				t.Errorf("%s(%s) error leaks the URL or spans lines: %q", name, c.url, msg)
			}
		}
	}
	if _, err := awskms.Open(ctx, "gcpkms://x"); err == nil || !strings.HasPrefix(err.Error(), "awskms: ") {
		t.Errorf("awskms.Open of another scheme: %v", err)
	}

	// Keys that do not exist, by id, ARN and alias.
	missing := "0b0b0b0b-1111-2222-3333-444444444444"
	for _, key := range []string{missing, "arn:aws:kms:" + region + ":111122223333:key/" + missing, "alias/keybroker-no-such-alias"} {
		_, err := provider.Open(ctx, keyURL(key))
		if !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("Open of missing key %s: %v, want ErrKeyNotFound", key, err)
		}
		var ae smithy.APIError
		if !errors.As(err, &ae) || ae.ErrorCode() != "NotFoundException" {
			t.Errorf("Open of missing key %s: the SDK's NotFoundException is not reachable: %v", key, err)
		}
	}

	// A signing key is no KEK.
	out, err := admin.CreateKey(ctx, &kms.CreateKeyInput{KeySpec: types.KeySpecEccNistP256, KeyUsage: types.KeyUsageTypeSignVerify})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := provider.Open(ctx, keyURL(aws.ToString(out.KeyMetadata.Arn))); err == nil || !strings.Contains(err.Error(), "want a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key") {
		t.Errorf("Open of a signing key: %v", err)
	}

	// Nothing listening: ErrUnavailable, retryable, after max_attempts tries.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + l.Addr().String()
	l.Close()
	_, err = provider.Open(ctx, "awskms:///"+arn+"?endpoint="+closed+"&max_attempts=2&timeout=5s")
	if !errors.Is(err, provider.ErrUnavailable) || !provider.IsRetryable(err) {
		t.Errorf("Open against a closed port: %v, want ErrUnavailable", err)
	}
}

// TestDeadlines: against a server that accepts connections and never
// answers, the operation timeout ends the call with ErrUnavailable (worth
// retrying), and the caller's deadline ends it with the caller's error.
func TestDeadlines(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		var held []net.Conn // held open, unanswered, until the listener closes
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	silent := "http://" + l.Addr().String()
	arn := "arn:aws:kms:" + region + ":111122223333:key/0b0b0b0b-1111-2222-3333-444444444444"

	_, err = provider.Open(context.Background(), "awskms:///"+arn+"?endpoint="+silent+"&timeout=200ms")
	if !errors.Is(err, provider.ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("operation timeout: %v, want ErrUnavailable and context.DeadlineExceeded", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = provider.Open(ctx, "awskms:///"+arn+"?endpoint="+silent+"&timeout=5m&max_attempts=10")
	if !errors.Is(err, context.DeadlineExceeded) || provider.IsRetryable(err) {
		t.Errorf("caller's deadline: %v, want context.DeadlineExceeded, not retryable", err)
	}
}

func TestDisabledKey(t *testing.T) {
	ctx := context.Background()
	arn := createKey(t)
	p := openKey(t, arn)
	dek := bytes.Repeat([]byte{7}, 32)
	wk, err := p.Wrap(ctx, dek, []byte("tenant-1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.DisableKey(ctx, &kms.DisableKeyInput{KeyId: aws.String(arn)}); err != nil {
		t.Fatal(err)
	}
	_, werr := p.Wrap(ctx, dek, nil)
	_, uerr := p.Unwrap(ctx, wk, []byte("tenant-1"))
	_, rerr := p.Rewrap(ctx, wk, []byte("tenant-1"))
	_, derr := p.Describe(ctx)
	for op, err := range map[string]error{"Wrap": werr, "Unwrap": uerr, "Rewrap": rerr} {
		if !errors.Is(err, provider.ErrKeyDisabled) || provider.IsRetryable(err) {
			t.Errorf("%s with a disabled key: %v, want ErrKeyDisabled", op, err)
		}
		var ae smithy.APIError
		if !errors.As(err, &ae) || ae.ErrorCode() != "DisabledException" {
			t.Errorf("%s with a disabled key: DisabledException not reachable with errors.As: %v", op, err)
		}
	}
	if !errors.Is(derr, provider.ErrKeyDisabled) {
		t.Errorf("Describe of a disabled key: %v, want ErrKeyDisabled", derr)
	}

	if _, err := admin.EnableKey(ctx, &kms.EnableKeyInput{KeyId: aws.String(arn)}); err != nil {
		t.Fatal(err)
	}
	got, err := p.Unwrap(ctx, wk, []byte("tenant-1"))
	if err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("Unwrap after re-enabling: %v", err)
	}
}

func TestPendingDeletion(t *testing.T) {
	ctx := context.Background()
	arn := createKey(t)
	p := openKey(t, arn)
	wk, err := p.Wrap(ctx, bytes.Repeat([]byte{9}, 32), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.ScheduleKeyDeletion(ctx, &kms.ScheduleKeyDeletionInput{KeyId: aws.String(arn), PendingWindowInDays: aws.Int32(7)}); err != nil {
		t.Fatal(err)
	}
	_, werr := p.Wrap(ctx, bytes.Repeat([]byte{9}, 32), nil)
	_, uerr := p.Unwrap(ctx, wk, nil)
	_, derr := p.Describe(ctx)
	for op, err := range map[string]error{"Wrap": werr, "Unwrap": uerr, "Describe": derr} {
		if !errors.Is(err, provider.ErrKeyDisabled) {
			t.Errorf("%s with a key pending deletion: %v, want ErrKeyDisabled", op, err)
		}
	}
	var ae smithy.APIError
	if !errors.As(uerr, &ae) || ae.ErrorCode() != "KMSInvalidStateException" {
		t.Errorf("Unwrap with a key pending deletion: KMSInvalidStateException not reachable: %v", uerr)
	}
}

func TestWrongContext(t *testing.T) {
	ctx := context.Background()
	p := openKey(t, createKey(t))
	dek := bytes.Repeat([]byte{3}, 32)
	wk, err := p.Wrap(ctx, dek, []byte("tenant-a"))
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]func() error{
		"Unwrap": func() error { _, err := p.Unwrap(ctx, wk, []byte("tenant-b")); return err },
		"Rewrap": func() error { _, err := p.Rewrap(ctx, wk, []byte("tenant-b")); return err },
	} {
		err := f()
		if !errors.Is(err, provider.ErrInvalidCiphertext) {
			t.Errorf("%s with the wrong aad: %v, want ErrInvalidCiphertext", name, err)
		}
		var ae smithy.APIError
		if !errors.As(err, &ae) || ae.ErrorCode() != "InvalidCiphertextException" {
			t.Errorf("%s with the wrong aad: InvalidCiphertextException not reachable: %v", name, err)
		}
	}
}

// TestKeyPinning: a ciphertext made under key A, relabelled as key B's, is
// refused by KMS because Decrypt and ReEncrypt name key B.
func TestKeyPinning(t *testing.T) {
	ctx := context.Background()
	a, b := openKey(t, createKey(t)), openKey(t, createKey(t))
	dek := bytes.Repeat([]byte{5}, 32)
	wk, err := a.Wrap(ctx, dek, nil)
	if err != nil {
		t.Fatal(err)
	}
	relabelled := wk.Clone()
	relabelled.KeyID = b.Ref().KeyID

	got, err := b.Unwrap(ctx, relabelled, nil)
	if !errors.Is(err, provider.ErrInvalidCiphertext) || got != nil {
		t.Errorf("Unwrap of key A's ciphertext with key B: %v, want ErrInvalidCiphertext", err)
	}
	var ae smithy.APIError
	if !errors.As(err, &ae) || ae.ErrorCode() != "IncorrectKeyException" {
		t.Errorf("Unwrap of key A's ciphertext with key B: IncorrectKeyException not reachable: %v", err)
	}
	if _, err := b.Rewrap(ctx, relabelled, nil); !errors.Is(err, provider.ErrInvalidCiphertext) {
		t.Errorf("Rewrap of key A's ciphertext with key B: %v, want ErrInvalidCiphertext", err)
	}
	// Unrelabelled, key B refuses it before asking KMS.
	if _, err := b.Unwrap(ctx, wk, nil); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Errorf("Unwrap of key A's wrapped key with key B: %v, want ErrKeyNotFound", err)
	}
}

func TestRotation(t *testing.T) {
	ctx := context.Background()
	arn := createKey(t)
	p := openKey(t, arn)
	st, err := p.Describe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v1 := st.PrimaryVersion
	if len(v1) != 64 {
		t.Fatalf("version %q is not a 64-digit key material id", v1)
	}
	aad := []byte("rotation")
	dek := bytes.Repeat([]byte{1}, 32)
	wk1, err := p.Wrap(ctx, dek, aad)
	if err != nil || wk1.Version != v1 {
		t.Fatalf("Wrap: version %q, %v; want %q", wk1.Version, err, v1)
	}

	// Rotation by someone else: a second provider for the same key sees it
	// once Describe has read it.
	other := openKey(t, arn)
	if _, err := admin.RotateKeyOnDemand(ctx, &kms.RotateKeyOnDemandInput{KeyId: aws.String(arn)}); err != nil {
		t.Fatal(err)
	}
	st, err = other.Describe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v2 := st.PrimaryVersion
	if v2 == v1 {
		t.Fatal("Describe after RotateKeyOnDemand reports the old key material")
	}
	wk2, err := other.Wrap(ctx, dek, aad)
	if err != nil || wk2.Version != v2 {
		t.Fatalf("Wrap after Describe: version %q, %v; want %q", wk2.Version, err, v2)
	}
	rw, err := other.Rewrap(ctx, wk1, aad)
	if err != nil || rw.Version != v2 || bytes.Equal(rw.Ciphertext, wk1.Ciphertext) {
		t.Fatalf("Rewrap: %v, version %q, want %q", err, rw.Version, v2)
	}
	for _, wk := range []*provider.WrappedKey{wk1, wk2, rw} {
		got, err := p.Unwrap(ctx, wk, aad)
		if err != nil || !bytes.Equal(got, dek) {
			t.Fatalf("Unwrap of version %s: %v", wk.Version, err)
		}
	}

	// The seeded key starts with two backing keys; rotating it makes a third.
	s, err := awskms.Open(ctx, "awskms://alias/keybroker-example?region="+region+"&endpoint="+endpoint)
	if err != nil {
		t.Fatal(err)
	}
	before, err := s.Wrap(ctx, dek, aad)
	if err != nil {
		t.Fatal(err)
	}
	v, err := s.Rotate(ctx)
	if err != nil || v == before.Version {
		t.Fatalf("Rotate of the seeded key: %q, %v (was %q)", v, err, before.Version)
	}
	got, err := s.Unwrap(ctx, before, aad)
	if err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("Unwrap after rotating the seeded key: %v", err)
	}
}

// TestRotateUnsupported: a key that cannot rotate on demand (imported key
// material) gets a clear error, not a portable kind.
func TestRotateUnsupported(t *testing.T) {
	ctx := context.Background()
	out, err := admin.CreateKey(ctx, &kms.CreateKeyInput{Origin: types.OriginTypeExternal})
	if err != nil {
		t.Fatal(err)
	}
	arn := aws.ToString(out.KeyMetadata.Arn)
	importMaterial(t, arn)
	p := openKey(t, arn)
	_, err = p.Rotate(ctx)
	if err == nil || !strings.Contains(err.Error(), "does not support RotateKeyOnDemand") || provider.IsRetryable(err) {
		t.Fatalf("Rotate of a key with imported material: %v", err)
	}
	var ae smithy.APIError
	if !errors.As(err, &ae) || ae.ErrorCode() != "UnsupportedOperationException" {
		t.Errorf("UnsupportedOperationException not reachable: %v", err)
	}
}

// importMaterial gives an EXTERNAL-origin key 256 bits of key material,
// wrapped as AWS requires with RSAES_OAEP_SHA_256.
func importMaterial(t *testing.T, arn string) {
	t.Helper()
	ctx := context.Background()
	params, err := admin.GetParametersForImport(ctx, &kms.GetParametersForImportInput{
		KeyId: aws.String(arn), WrappingAlgorithm: types.AlgorithmSpecRsaesOaepSha256, WrappingKeySpec: types.WrappingKeySpecRsa2048,
	})
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.ParsePKIXPublicKey(params.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	material := make([]byte, 32)
	rand.Read(material)
	wrapped, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub.(*rsa.PublicKey), material, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.ImportKeyMaterial(ctx, &kms.ImportKeyMaterialInput{
		KeyId: aws.String(arn), ImportToken: params.ImportToken, EncryptedKeyMaterial: wrapped,
		ExpirationModel: types.ExpirationModelTypeKeyMaterialDoesNotExpire,
	}); err != nil {
		t.Fatal(err)
	}
}

func TestCanceled(t *testing.T) {
	p := openKey(t, createKey(t))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for name, f := range map[string]func() error{
		"Rotate":   func() error { _, err := p.Rotate(ctx); return err },
		"Describe": func() error { _, err := p.Describe(ctx); return err },
		"Open":     func() error { _, err := provider.Open(ctx, keyURL(p.Ref().KeyID)); return err },
	} {
		if err := f(); !errors.Is(err, context.Canceled) || provider.IsRetryable(err) {
			t.Errorf("%s with a canceled context: %v, want context.Canceled, not retryable", name, err)
		}
	}
}

func BenchmarkWrapUnwrap(b *testing.B) {
	ctx := context.Background()
	arn := createKey(b)
	p := openKey(b, arn)
	dek := bytes.Repeat([]byte{1}, 32)
	aad := []byte("tenant-42")

	// Baseline: the same two KMS calls made directly with the SDK, to show
	// what the provider adds on top of the round trips to local-kms.
	b.Run("baseline-sdk", func(b *testing.B) {
		ec := map[string]string{"k": "v"}
		for b.Loop() {
			enc, err := admin.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(arn), Plaintext: dek, EncryptionContext: ec})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := admin.Decrypt(ctx, &kms.DecryptInput{KeyId: aws.String(arn), CiphertextBlob: enc.CiphertextBlob, EncryptionContext: ec}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("provider", func(b *testing.B) {
		for b.Loop() {
			wk, err := p.Wrap(ctx, dek, aad)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := p.Unwrap(ctx, wk, aad); err != nil {
				b.Fatal(err)
			}
		}
	})
}
