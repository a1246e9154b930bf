package gcpkms

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	kms "cloud.google.com/go/kms/apiv1"
	"cloud.google.com/go/kms/apiv1/kmspb"
	"github.com/googleapis/gax-go/v2"
	"google.golang.org/api/iterator"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/profullstack/keybroker/provider"
)

// Scheme is the provider URL scheme this package registers.
const Scheme = "gcpkms"

// MaxAADLen is the Cloud KMS limit on additional authenticated data for
// SOFTWARE keys. Wrap refuses more before calling the service.
const MaxAADLen = 64 << 10

// integrityAttempts bounds how often an RPC whose response fails its
// integrity check is reissued, as Google asks ("a limited number of
// retries"). Transport errors are retried separately, by gax.
const integrityAttempts = 3

// ErrIntegrity is the cause (reachable with errors.Is) of an error whose
// response failed its integrity check on every attempt: a CRC32C mismatch, a
// request checksum the service did not confirm, or a response naming
// another key. Such errors are of kind provider.ErrUnavailable: they point
// at corruption in transit, and a later retry may succeed.
var ErrIntegrity = errors.New("gcpkms: response failed integrity check")

var crcTable = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) int64 { return int64(crc32.Checksum(b, crcTable)) }

func crcValue(b []byte) *wrapperspb.Int64Value { return wrapperspb.Int64(crc(b)) }

func crcOK(b []byte, sum *wrapperspb.Int64Value) bool { return sum != nil && sum.GetValue() == crc(b) }

var (
	// Segments as Cloud KMS allows them: key ring and key ids are
	// [a-zA-Z0-9_-]{1,63}; project ids may be domain-scoped ("example.com:p").
	projectRE  = regexp.MustCompile(`^[a-zA-Z0-9.:_-]{1,100}$`)
	locationRE = regexp.MustCompile(`^[a-z0-9-]{1,63}$`)
	idRE       = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,63}$`)
	versionRE  = regexp.MustCompile(`^[1-9][0-9]{0,18}$`)
)

// checkKeyName checks that name is a CryptoKey resource name,
// projects/P/locations/L/keyRings/R/cryptoKeys/K, and returns an error
// naming the first segment that is wrong.
func checkKeyName(name string) error {
	if len(name) > provider.MaxKeyIDLen {
		return fmt.Errorf("CryptoKey name is %d bytes, longer than %d", len(name), provider.MaxKeyIDLen)
	}
	parts := strings.Split(name, "/")
	if len(parts) > 8 && parts[8] == "cryptoKeyVersions" {
		return errors.New("name a CryptoKey, not a CryptoKeyVersion: drop the /cryptoKeyVersions/... suffix")
	}
	if len(parts) != 8 {
		return fmt.Errorf("malformed CryptoKey name %q: want projects/P/locations/L/keyRings/R/cryptoKeys/K", name)
	}
	for i, want := range []struct {
		lit string
		re  *regexp.Regexp
	}{{"projects", projectRE}, {"locations", locationRE}, {"keyRings", idRE}, {"cryptoKeys", idRE}} {
		if parts[2*i] != want.lit {
			return fmt.Errorf("malformed CryptoKey name %q: segment %d is %q, want %q", name, 2*i+1, parts[2*i], want.lit)
		}
		if !want.re.MatchString(parts[2*i+1]) {
			return fmt.Errorf("malformed CryptoKey name %q: invalid %s id %q", name, want.lit, parts[2*i+1])
		}
	}
	return nil
}

// Provider wraps DEKs under a Cloud KMS symmetric CryptoKey
// (ENCRYPT_DECRYPT, GOOGLE_SYMMETRIC_ENCRYPTION). It is safe for concurrent
// use.
type Provider struct {
	client *kms.KeyManagementClient
	owned  bool // Close closes client
	name   string
	ref    provider.KeyRef
}

var (
	_ provider.KEKProvider = (*Provider)(nil)
	_ provider.Rotator     = (*Provider)(nil)
	_ provider.Rewrapper   = (*Provider)(nil)
	_ provider.Describer   = (*Provider)(nil)
	_ provider.Retirer     = (*Provider)(nil)
)

// New returns a Provider for the CryptoKey resource name
// (projects/P/locations/L/keyRings/R/cryptoKeys/K) that uses
// client, which the caller keeps ownership of: Close does not close it.
func New(client *kms.KeyManagementClient, name string) (*Provider, error) {
	if client == nil {
		return nil, openErr(errors.New("nil KeyManagementClient"))
	}
	if err := checkKeyName(name); err != nil {
		return nil, openErr(err)
	}
	return &Provider{client: client, name: name, ref: provider.KeyRef{Provider: Scheme, KeyID: name}}, nil
}

// Open checks name, then creates a client with opts (none: Application
// Default Credentials and the production endpoint) and returns a Provider
// that owns it. It makes no RPC; a key that does not exist or cannot be
// used shows at the first operation (or call Describe).
func Open(ctx context.Context, name string, opts ...option.ClientOption) (*Provider, error) {
	if err := checkKeyName(name); err != nil {
		return nil, openErr(err)
	}
	client, err := kms.NewKeyManagementClient(ctx, opts...)
	if err != nil {
		return nil, openErr(fmt.Errorf("creating KMS client: %w", err))
	}
	p, err := New(client, name)
	if err != nil {
		client.Close()
		return nil, err
	}
	p.owned = true
	return p, nil
}

func openErr(err error) error { return &provider.Error{Provider: Scheme, Op: "open", Err: err} }

// Close releases the client if Open created it.
func (p *Provider) Close() error {
	if !p.owned {
		return nil
	}
	return p.client.Close()
}

func init() { provider.Register(Scheme, openURL) }

// openURL opens gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K,
// optionally with ?endpoint=host:port and &insecure=true (see the package
// documentation).
func openURL(ctx context.Context, u *url.URL) (provider.KEKProvider, error) {
	if u.User != nil || u.Fragment != "" || u.Opaque != "" {
		return nil, openErr(errors.New("URL must be gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K[?endpoint=host:port]"))
	}
	name := strings.TrimPrefix(u.Host+u.Path, "/")
	q := u.Query()
	var opts []option.ClientOption
	for k := range q {
		if k != "endpoint" && k != "insecure" {
			return nil, openErr(fmt.Errorf("unknown URL parameter %s (known: endpoint, insecure)", provider.ParamName(k)))
		}
		if len(q[k]) != 1 {
			return nil, openErr(fmt.Errorf("URL parameter %s given %d times", provider.ParamName(k), len(q[k])))
		}
	}
	endpoint := q.Get("endpoint")
	if endpoint != "" {
		opts = append(opts, option.WithEndpoint(endpoint))
	}
	switch q.Get("insecure") {
	case "", "false":
	case "true":
		host, _, err := net.SplitHostPort(endpoint)
		if err != nil || !isLoopback(host) {
			return nil, openErr(errors.New("insecure=true needs endpoint=host:port on a loopback address (localhost, 127.0.0.0/8, ::1)"))
		}
		opts = append(opts,
			option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
			option.WithoutAuthentication())
	default:
		return nil, openErr(errors.New("URL parameter insecure must be true or false"))
	}
	return Open(ctx, name, opts...)
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// retry is the gax policy for idempotent RPCs: retry UNAVAILABLE,
// RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED with jittered exponential
// backoff until the context ends. The caller's deadline always wins: gax
// stops sleeping as soon as ctx is done.
var retry = []gax.CallOption{gax.WithRetry(func() gax.Retryer {
	return gax.OnCodes([]codes.Code{codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded}, gax.Backoff{
		Initial:    100 * time.Millisecond,
		Max:        5 * time.Second,
		Multiplier: 2,
	})
})}

// Ref returns gcpkms and the CryptoKey resource name.
func (p *Provider) Ref() provider.KeyRef { return p.ref }

// Wrap encrypts dek under the key's primary version with aad bound to it,
// sending CRC32C checksums of dek and aad and checking the response's
// checksum, Verified* flags and version name. The WrappedKey's Version is
// the CryptoKeyVersion id (the last segment of the name Encrypt returns).
func (p *Provider) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	if err := provider.CheckDEK(Scheme, dek); err != nil {
		return nil, err
	}
	if len(aad) > MaxAADLen {
		return nil, &provider.Error{Provider: Scheme, Op: "wrap", Err: fmt.Errorf("aad length %d exceeds %d", len(aad), MaxAADLen)}
	}
	return p.encrypt(ctx, "wrap", dek, aad)
}

func (p *Provider) encrypt(ctx context.Context, op string, dek, aad []byte) (*provider.WrappedKey, error) {
	req := &kmspb.EncryptRequest{Name: p.name, Plaintext: dek, PlaintextCrc32C: crcValue(dek)}
	if len(aad) > 0 {
		req.AdditionalAuthenticatedData = aad
		req.AdditionalAuthenticatedDataCrc32C = crcValue(aad)
	}
	var ierr error
	for range integrityAttempts {
		resp, err := p.client.Encrypt(ctx, req, retry...)
		if err != nil {
			return nil, p.fail(ctx, op, err, nil)
		}
		var version string
		if version, ierr = p.checkEncrypt(req, resp); ierr == nil {
			return &provider.WrappedKey{Provider: Scheme, KeyID: p.name, Version: version, Ciphertext: resp.Ciphertext}, nil
		}
	}
	return nil, &provider.Error{Provider: Scheme, Op: op, Kind: provider.ErrUnavailable, Err: ierr}
}

// checkEncrypt verifies resp as Google's integrity guidance asks and returns
// the version id it names.
func (p *Provider) checkEncrypt(req *kmspb.EncryptRequest, resp *kmspb.EncryptResponse) (string, error) {
	switch {
	case !resp.VerifiedPlaintextCrc32C:
		return "", fmt.Errorf("%w: service did not verify the plaintext checksum", ErrIntegrity)
	case req.AdditionalAuthenticatedDataCrc32C != nil && !resp.VerifiedAdditionalAuthenticatedDataCrc32C:
		return "", fmt.Errorf("%w: service did not verify the AAD checksum", ErrIntegrity)
	case !crcOK(resp.Ciphertext, resp.CiphertextCrc32C):
		return "", fmt.Errorf("%w: ciphertext CRC32C mismatch", ErrIntegrity)
	case len(resp.Ciphertext) == 0 || len(resp.Ciphertext) > provider.MaxCiphertextLen:
		return "", fmt.Errorf("%w: ciphertext length %d out of range 1..%d", ErrIntegrity, len(resp.Ciphertext), provider.MaxCiphertextLen)
	}
	version, ok := strings.CutPrefix(resp.Name, p.name+"/cryptoKeyVersions/")
	if !ok || !versionRE.MatchString(version) {
		return "", fmt.Errorf("%w: response names a version of another key", ErrIntegrity)
	}
	return version, nil
}

// Unwrap decrypts wk with aad, sending CRC32C checksums of the ciphertext
// and aad and checking the plaintext's. Cloud KMS picks the version from the
// ciphertext itself; wk.Version is informational and only syntax-checked.
func (p *Provider) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	dek, _, err := p.decrypt(ctx, "unwrap", wk, aad)
	return dek, err
}

// decrypt returns the DEK and whether the key's primary version decrypted
// it. The caller owns (and clears) the DEK.
func (p *Provider) decrypt(ctx context.Context, op string, wk *provider.WrappedKey, aad []byte) ([]byte, bool, error) {
	if err := provider.CheckWrappedKey(p.ref, op, wk); err != nil {
		return nil, false, err
	}
	if !versionRE.MatchString(wk.Version) {
		return nil, false, &provider.Error{Provider: Scheme, Op: op, Kind: provider.ErrInvalidCiphertext, Err: errors.New("version is not a CryptoKeyVersion id")}
	}
	if len(aad) > MaxAADLen {
		return nil, false, &provider.Error{Provider: Scheme, Op: op, Kind: provider.ErrInvalidCiphertext, Err: fmt.Errorf("aad length %d exceeds %d", len(aad), MaxAADLen)}
	}
	req := &kmspb.DecryptRequest{Name: p.name, Ciphertext: wk.Ciphertext, CiphertextCrc32C: crcValue(wk.Ciphertext)}
	if len(aad) > 0 {
		req.AdditionalAuthenticatedData = aad
		req.AdditionalAuthenticatedDataCrc32C = crcValue(aad)
	}
	for range integrityAttempts {
		resp, err := p.client.Decrypt(ctx, req, retry...)
		if err != nil {
			return nil, false, p.fail(ctx, op, err, provider.ErrInvalidCiphertext)
		}
		if !crcOK(resp.Plaintext, resp.PlaintextCrc32C) {
			provider.Clear(resp.Plaintext)
			continue
		}
		if n := len(resp.Plaintext); n < provider.MinDEKLen || n > provider.MaxDEKLen {
			// Something this key encrypted, but not a DEK Wrap made.
			provider.Clear(resp.Plaintext)
			return nil, false, &provider.Error{Provider: Scheme, Op: op, Kind: provider.ErrInvalidCiphertext, Err: errors.New("plaintext is not a DEK")}
		}
		return resp.Plaintext, resp.UsedPrimary, nil
	}
	return nil, false, &provider.Error{Provider: Scheme, Op: op, Kind: provider.ErrUnavailable, Err: fmt.Errorf("%w: plaintext CRC32C mismatch", ErrIntegrity)}
}

// Rewrap re-encrypts wk under the primary version. Cloud KMS has no
// re-encrypt RPC, so the DEK passes through this process (it is cleared
// before Rewrap returns, never handed to the caller). When Decrypt reports
// that the primary version was used, wk is already current: Rewrap returns
// a copy of it unchanged and makes no Encrypt call.
func (p *Provider) Rewrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) (*provider.WrappedKey, error) {
	dek, usedPrimary, err := p.decrypt(ctx, "rewrap", wk, aad)
	if err != nil {
		return nil, err
	}
	defer provider.Clear(dek)
	if usedPrimary {
		return wk.Clone(), nil
	}
	return p.encrypt(ctx, "rewrap", dek, aad)
}

// Rotate creates a CryptoKeyVersion and makes it primary, returning its id.
// Creation is not retried (a retry could create a second version). On the
// real service a primary change can take a while to reach every Encrypt
// (Google documents eventual consistency); Wrap always reports the version
// it actually used.
func (p *Provider) Rotate(ctx context.Context) (string, error) {
	v, err := p.client.CreateCryptoKeyVersion(ctx, &kmspb.CreateCryptoKeyVersionRequest{
		Parent:           p.name,
		CryptoKeyVersion: &kmspb.CryptoKeyVersion{},
	})
	if err != nil {
		return "", p.fail(ctx, "rotate", err, nil)
	}
	id, ok := strings.CutPrefix(v.GetName(), p.name+"/cryptoKeyVersions/")
	if !ok || !versionRE.MatchString(id) {
		return "", &provider.Error{Provider: Scheme, Op: "rotate", Err: errors.New("service returned a version of another key")}
	}
	if _, err := p.client.UpdateCryptoKeyPrimaryVersion(ctx, &kmspb.UpdateCryptoKeyPrimaryVersionRequest{
		Name:               p.name,
		CryptoKeyVersionId: id,
	}, retry...); err != nil {
		return "", p.fail(ctx, "rotate", fmt.Errorf("version %s created but not made primary: %w", id, err), nil)
	}
	return id, nil
}

// maxVersions bounds how many CryptoKeyVersions Describe reads.
const maxVersions = 10000

// Describe reads the CryptoKey (GetCryptoKey) and its versions
// (ListCryptoKeyVersions). It reports the primary version id and, in
// Versions, the ids of the ENABLED versions in ascending numeric order
// (1, 2, ..., 10, not the order the service lists them in): those that can
// still unwrap. A key with more than 10000 versions is an error.
func (p *Provider) Describe(ctx context.Context) (provider.Status, error) {
	k, err := p.client.GetCryptoKey(ctx, &kmspb.GetCryptoKeyRequest{Name: p.name}, retry...)
	if err != nil {
		return provider.Status{}, p.fail(ctx, "describe", err, nil)
	}
	if k.GetPurpose() != kmspb.CryptoKey_ENCRYPT_DECRYPT {
		return provider.Status{}, &provider.Error{Provider: Scheme, Op: "describe", Err: fmt.Errorf("key purpose is %v, want ENCRYPT_DECRYPT", k.GetPurpose())}
	}
	primary, err := p.primary(k)
	if err != nil {
		return provider.Status{}, &provider.Error{Provider: Scheme, Op: "describe", Kind: provider.ErrKeyDisabled, Err: err}
	}
	st := provider.Status{Ref: p.ref, PrimaryVersion: primary, Reachable: true}
	it := p.client.ListCryptoKeyVersions(ctx, &kmspb.ListCryptoKeyVersionsRequest{Parent: p.name}, retry...)
	for n := 0; ; n++ {
		v, err := it.Next()
		if errors.Is(err, iterator.Done) {
			slices.SortFunc(st.Versions, compareVersions)
			return st, nil
		}
		if err != nil {
			return provider.Status{}, p.fail(ctx, "describe", err, nil)
		}
		if n == maxVersions {
			return provider.Status{}, &provider.Error{Provider: Scheme, Op: "describe", Err: fmt.Errorf("key has more than %d versions", maxVersions)}
		}
		id, ok := strings.CutPrefix(v.GetName(), p.name+"/cryptoKeyVersions/")
		if !ok || !versionRE.MatchString(id) {
			return provider.Status{}, &provider.Error{Provider: Scheme, Op: "describe", Err: errors.New("service listed a version of another key")}
		}
		if v.GetState() == kmspb.CryptoKeyVersion_ENABLED {
			st.Versions = append(st.Versions, id)
		}
	}
}

// compareVersions orders version ids numerically. versionRE admits only
// decimal ids without leading zeros, so the shorter id is the smaller.
func compareVersions(a, b string) int {
	return cmp.Or(cmp.Compare(len(a), len(b)), strings.Compare(a, b))
}

func (p *Provider) primary(k *kmspb.CryptoKey) (string, error) {
	if k.GetPrimary() == nil {
		return "", errors.New("key has no primary version")
	}
	id, ok := strings.CutPrefix(k.GetPrimary().GetName(), p.name+"/cryptoKeyVersions/")
	if !ok || !versionRE.MatchString(id) {
		return "", errors.New("service returned a primary version of another key")
	}
	return id, nil
}

// Retire disables the CryptoKeyVersion with id version, so keys wrapped
// under it no longer unwrap (they fail with ErrKeyDisabled). Disabling is
// reversible (re-enable the version in Cloud KMS); destroying it for good
// is left to an operator (gcloud kms keys versions destroy) once nothing
// needs it. Retire refuses the primary version: rotate first. Retiring a
// version that is already disabled, scheduled for destruction or destroyed
// succeeds; a malformed or unknown version is ErrKeyNotFound.
func (p *Provider) Retire(ctx context.Context, version string) error {
	if !versionRE.MatchString(version) {
		return &provider.Error{Provider: Scheme, Op: "retire", Kind: provider.ErrKeyNotFound, Err: errors.New("version is not a CryptoKeyVersion id")}
	}
	k, err := p.client.GetCryptoKey(ctx, &kmspb.GetCryptoKeyRequest{Name: p.name}, retry...)
	if err != nil {
		return p.fail(ctx, "retire", err, nil)
	}
	if primary, err := p.primary(k); err == nil && primary == version {
		return &provider.Error{Provider: Scheme, Op: "retire", Err: fmt.Errorf("version %s is the primary version; rotate first", version)}
	}
	name := p.name + "/cryptoKeyVersions/" + version
	_, err = p.client.UpdateCryptoKeyVersion(ctx, &kmspb.UpdateCryptoKeyVersionRequest{
		CryptoKeyVersion: &kmspb.CryptoKeyVersion{Name: name, State: kmspb.CryptoKeyVersion_DISABLED},
		UpdateMask:       &fieldmaskpb.FieldMask{Paths: []string{"state"}},
	}, retry...)
	if status.Code(err) == codes.FailedPrecondition {
		// Its state cannot change: fine if it is on its way out already.
		v, gerr := p.client.GetCryptoKeyVersion(ctx, &kmspb.GetCryptoKeyVersionRequest{Name: name}, retry...)
		if st := v.GetState(); gerr == nil && (st == kmspb.CryptoKeyVersion_DESTROY_SCHEDULED || st == kmspb.CryptoKeyVersion_DESTROYED) {
			return nil
		}
	}
	if err != nil {
		return p.fail(ctx, "retire", err, nil)
	}
	return nil
}

// fail maps an RPC error to a *provider.Error. A done context wins: the
// error then matches ctx.Err() and is not retryable. invalidArg is the kind
// for InvalidArgument (ErrInvalidCiphertext on decrypt, nil elsewhere).
func (p *Provider) fail(ctx context.Context, op string, err, invalidArg error) error {
	if cerr := ctx.Err(); cerr != nil {
		if !errors.Is(err, cerr) {
			err = fmt.Errorf("%w: %w", cerr, err)
		}
		return &provider.Error{Provider: Scheme, Op: op, Err: err}
	}
	var kind error
	switch status.Code(err) {
	case codes.NotFound:
		kind = provider.ErrKeyNotFound
	case codes.PermissionDenied, codes.Unauthenticated:
		kind = provider.ErrAccessDenied
	case codes.FailedPrecondition:
		kind = provider.ErrKeyDisabled
	case codes.InvalidArgument:
		kind = invalidArg
	case codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded:
		kind = provider.ErrUnavailable
	default:
		// gax's own per-call timeout ends in a bare context error even
		// though the caller's context is still live.
		if errors.Is(err, context.DeadlineExceeded) {
			kind = provider.ErrUnavailable
		}
	}
	return &provider.Error{Provider: Scheme, Op: op, Kind: kind, Err: err}
}
