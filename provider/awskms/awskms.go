package awskms

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/profullstack/keybroker/provider"
)

// Scheme is the URL scheme this package registers with provider.Register.
const Scheme = "awskms"

// EncryptionContextKey is the one encryption context key Wrap, Unwrap and
// Rewrap send: its value is the unpadded base64url SHA-256 digest of the
// associated data. Key policies may require it with the
// kms:EncryptionContextKeys condition key.
const EncryptionContextKey = "keybroker:aad-sha256"

// DefaultVersion is the version reported for a key whose key service names
// no key material (AWS does for every symmetric key in the AWS KMS key store;
// keys in custom key stores cannot rotate and have this single version).
const DefaultVersion = "default"

// Defaults and bounds of the URL parameters.
const (
	DefaultTimeout     = 10 * time.Second
	DefaultMaxAttempts = 3
	maxMaxAttempts     = 10
	maxTimeout         = 5 * time.Minute
	// rotateTimeout bounds Rotate's wait for on-demand rotation, which AWS
	// performs asynchronously, when ctx has no deadline.
	rotateTimeout = 2 * time.Minute
	// versionTTL is how long Wrap trusts the current key material it last
	// read before reading it again.
	versionTTL = time.Minute
	// maxBlobLen is AWS KMS's limit on CiphertextBlob.
	maxBlobLen = 6144
	// maxKeyIDLen is AWS KMS's limit on a KeyId parameter.
	maxKeyIDLen = 2048
)

var (
	_ provider.KEKProvider = (*Provider)(nil)
	_ provider.Rotator     = (*Provider)(nil)
	_ provider.Rewrapper   = (*Provider)(nil)
	_ provider.Describer   = (*Provider)(nil)
)

func init() {
	provider.Register(Scheme, func(ctx context.Context, u *url.URL) (provider.KEKProvider, error) {
		p, err := openURL(ctx, u)
		if err != nil {
			return nil, err // not a typed nil
		}
		return p, nil
	})
}

// Provider wraps DEKs with one AWS KMS symmetric encryption key. It is safe
// for concurrent use.
type Provider struct {
	client  *kms.Client
	arn     string
	timeout time.Duration

	mu         sync.Mutex
	version    string    // key material Wrap labels with
	versionAt  time.Time // when version was read
	refreshing bool      // a caller is reading it again
}

// Open opens the key that rawURL names:
//
//	awskms://<key>?region=<region>&endpoint=<url>&timeout=<duration>&max_attempts=<n>
//
// <key> is everything between "awskms://" and "?", percent-decoded: a key
// ARN (awskms://arn:aws:kms:eu-west-1:111122223333:key/1234abcd-...), a key
// id, an alias (awskms://alias/meshhook) or an alias ARN. A leading "/" is
// ignored, so the gocloud.dev form awskms:///arn:aws:kms:... works too.
//
// region defaults to the ARN's region, then to the SDK's (AWS_REGION, the
// shared config profile); Open fails if there is none. endpoint overrides the
// KMS endpoint (a VPC endpoint, or a test server). timeout (default 10s)
// bounds each operation including its retries; max_attempts (default 3)
// bounds the attempts the SDK retryer makes for retryable errors.
// Credentials come from the SDK's default chain, never from the URL.
//
// Open resolves the key with DescribeKey, so an alias is replaced by the key
// ARN it names: Ref().KeyID is always a key ARN. It fails with an error
// matching provider.ErrKeyNotFound if the key does not exist, and with a
// plain error if it is not a symmetric encryption key.
func Open(ctx context.Context, rawURL string) (*Provider, error) {
	rest, ok := strings.CutPrefix(rawURL, Scheme+"://")
	if !ok {
		return nil, errors.New("awskms: malformed URL: want awskms://<key>?region=<region>")
	}
	if strings.Contains(rest, "#") {
		return nil, errors.New("awskms: malformed URL: fragment not allowed")
	}
	rawKey, rawQuery, _ := strings.Cut(rest, "?")
	key, err := url.PathUnescape(rawKey)
	if err != nil {
		return nil, errors.New("awskms: malformed URL: bad percent-encoding in the key")
	}
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return nil, errors.New("awskms: malformed URL: bad query")
	}
	return open(ctx, key, q)
}

// openURL is the registered Opener. provider.ParseURL has already parsed the
// URL, which net/url only manages when the key has no ':' in its first
// segment: awskms:///arn:..., awskms://alias/name, awskms://<key id>.
func openURL(ctx context.Context, u *url.URL) (*Provider, error) {
	if u.User != nil {
		return nil, errors.New("awskms: malformed URL: user information not allowed (credentials come from the SDK's default chain)")
	}
	if u.Fragment != "" || u.Opaque != "" {
		return nil, errors.New("awskms: malformed URL: want awskms://<key>?region=<region>")
	}
	key, err := url.PathUnescape(u.Host + u.EscapedPath())
	if err != nil {
		return nil, errors.New("awskms: malformed URL: bad percent-encoding in the key")
	}
	return open(ctx, key, u.Query())
}

func open(ctx context.Context, key string, q url.Values) (*Provider, error) {
	key = strings.TrimPrefix(key, "/")
	if err := checkKeyID(key); err != nil {
		return nil, err
	}
	for name, v := range q {
		switch name {
		case "region", "endpoint", "timeout", "max_attempts":
			if len(v) != 1 {
				return nil, fmt.Errorf("awskms: URL parameter %s given %d times", provider.ParamName(name), len(v))
			}
		default:
			return nil, fmt.Errorf("awskms: unknown URL parameter %s (want region, endpoint, timeout, max_attempts)", provider.ParamName(name))
		}
	}
	region := q.Get("region")
	if arnRegion, ok := regionOfARN(key); ok {
		if region != "" && region != arnRegion {
			return nil, errors.New("awskms: region parameter differs from the key ARN's region")
		}
		region = arnRegion
	}
	if region != "" && !regionRE.MatchString(region) {
		return nil, errors.New("awskms: region is not an AWS Region name such as eu-west-1")
	}
	endpoint := q.Get("endpoint")
	if endpoint != "" {
		e, err := url.Parse(endpoint)
		if err != nil || (e.Scheme != "https" && e.Scheme != "http") || e.Host == "" || e.User != nil || e.RawQuery != "" || e.Fragment != "" {
			return nil, errors.New("awskms: endpoint parameter is not an http(s)://host[:port] URL")
		}
	}
	timeout := DefaultTimeout
	if s := q.Get("timeout"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 || d > maxTimeout {
			return nil, fmt.Errorf("awskms: timeout parameter is not a duration in (0, %v]", maxTimeout)
		}
		timeout = d
	}
	attempts := DefaultMaxAttempts
	if s := q.Get("max_attempts"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > maxMaxAttempts {
			return nil, fmt.Errorf("awskms: max_attempts parameter is not an integer in 1..%d", maxMaxAttempts)
		}
		attempts = n
	}

	opts := []func(*config.LoadOptions) error{
		config.WithRetryer(func() aws.Retryer { return newRetryer(attempts) }),
	}
	if region != "" {
		opts = append(opts, config.WithRegion(region))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("awskms: loading the AWS configuration: %w", err)
	}
	if cfg.Region == "" {
		return nil, errors.New("awskms: no region: add ?region= to the URL, use a key ARN, or set AWS_REGION")
	}
	client := kms.NewFromConfig(cfg, func(o *kms.Options) {
		if endpoint != "" {
			o.BaseEndpoint = aws.String(endpoint)
		}
	})
	p := &Provider{client: client, timeout: timeout}
	opCtx, cancel := p.withTimeout(ctx)
	defer cancel()
	md, err := p.describe(opCtx, ctx, "open", key)
	if err != nil {
		return nil, err
	}
	if md.KeySpec != types.KeySpecSymmetricDefault || md.KeyUsage != types.KeyUsageTypeEncryptDecrypt {
		return nil, fmt.Errorf("awskms: key has spec %s and usage %s, want a %s %s key",
			md.KeySpec, md.KeyUsage, types.KeySpecSymmetricDefault, types.KeyUsageTypeEncryptDecrypt)
	}
	p.arn = aws.ToString(md.Arn)
	if p.arn == "" || len(p.arn) > provider.MaxKeyIDLen {
		return nil, errors.New("awskms: DescribeKey returned no usable key ARN")
	}
	p.setVersion(md)
	return p, nil
}

// newRetryer retries only what the SDK classes as retryable (throttling,
// 5xx, connection errors) plus KMS's own transient errors, with jittered
// exponential backoff. The operation's context deadline always ends it.
func newRetryer(attempts int) aws.Retryer {
	return retry.NewStandard(func(o *retry.StandardOptions) {
		o.MaxAttempts = attempts
		o.MaxBackoff = 2 * time.Second
		o.Retryables = append(o.Retryables, retry.RetryableErrorCode{Codes: map[string]struct{}{
			"KMSInternalException":       {},
			"DependencyTimeoutException": {},
			"KeyUnavailableException":    {},
		}})
	})
}

func checkKeyID(key string) error {
	if key == "" {
		return errors.New("awskms: malformed URL: no key: want awskms://<key ARN, key id or alias>")
	}
	if len(key) > maxKeyIDLen {
		return fmt.Errorf("awskms: malformed URL: key is %d bytes, longer than %d", len(key), maxKeyIDLen)
	}
	if strings.Contains(key, "@") {
		return errors.New("awskms: malformed URL: user information not allowed (credentials come from the SDK's default chain)")
	}
	for _, r := range key {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			return errors.New("awskms: malformed URL: key contains spaces or control characters")
		}
	}
	return nil
}

var regionRE = regexp.MustCompile(`^[a-z]{2}(-[a-z0-9]+)+$`)

// regionOfARN returns the region field of arn:partition:kms:region:account:...
func regionOfARN(key string) (string, bool) {
	f := strings.SplitN(key, ":", 6)
	if len(f) != 6 || f[0] != "arn" || f[2] != "kms" || f[3] == "" {
		return "", false
	}
	return f[3], true
}

// Ref returns the key's ARN under the awskms scheme.
func (p *Provider) Ref() provider.KeyRef { return provider.KeyRef{Provider: Scheme, KeyID: p.arn} }

// encryptionContext binds aad to a ciphertext. AWS stores the encryption
// context in CloudTrail in the clear and bounds its size, while aad may be
// long and need not be UTF-8, so it sends a fixed-size digest instead.
func encryptionContext(aad []byte) map[string]string {
	sum := sha256.Sum256(aad)
	return map[string]string{EncryptionContextKey: base64.RawURLEncoding.EncodeToString(sum[:])}
}

func (p *Provider) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, p.timeout)
}

// Wrap encrypts dek with Encrypt under the key ARN, with aad bound through
// the encryption context. The version it records is the key material the
// key service reported current before the call (read at most versionTTL
// earlier), so after a rotation by someone else a wrapped key may name the
// previous material: Rewrap then costs one needless call, never a lost key.
func (p *Provider) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	if err := provider.CheckDEK(Scheme, dek); err != nil {
		return nil, err
	}
	opCtx, cancel := p.withTimeout(ctx)
	defer cancel()
	version, err := p.currentVersion(opCtx, ctx, "wrap")
	if err != nil {
		return nil, err
	}
	out, err := p.client.Encrypt(opCtx, &kms.EncryptInput{
		KeyId:               aws.String(p.arn),
		Plaintext:           dek,
		EncryptionContext:   encryptionContext(aad),
		EncryptionAlgorithm: types.EncryptionAlgorithmSpecSymmetricDefault,
	})
	if err != nil {
		return nil, p.fail(ctx, "wrap", err)
	}
	if aws.ToString(out.KeyId) != p.arn {
		return nil, &provider.Error{Provider: Scheme, Op: "wrap", Err: errors.New("key service encrypted under another key")}
	}
	if n := len(out.CiphertextBlob); n == 0 || n > maxBlobLen {
		return nil, &provider.Error{Provider: Scheme, Op: "wrap", Err: fmt.Errorf("key service returned a %d-byte ciphertext", n)}
	}
	return &provider.WrappedKey{Provider: Scheme, KeyID: p.arn, Version: version, Ciphertext: out.CiphertextBlob}, nil
}

// Unwrap decrypts wk with Decrypt, pinned to the key ARN (KeyId) and with
// the encryption context derived from aad. A response naming another key,
// or a plaintext that is not a DEK, is cleared and reported as
// provider.ErrInvalidCiphertext.
func (p *Provider) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	if err := p.checkWrapped("unwrap", wk); err != nil {
		return nil, err
	}
	opCtx, cancel := p.withTimeout(ctx)
	defer cancel()
	out, err := p.client.Decrypt(opCtx, &kms.DecryptInput{
		CiphertextBlob:      wk.Ciphertext,
		KeyId:               aws.String(p.arn),
		EncryptionContext:   encryptionContext(aad),
		EncryptionAlgorithm: types.EncryptionAlgorithmSpecSymmetricDefault,
	})
	if err != nil {
		return nil, p.fail(ctx, "unwrap", err)
	}
	if aws.ToString(out.KeyId) != p.arn {
		provider.Clear(out.Plaintext)
		return nil, &provider.Error{Provider: Scheme, Op: "unwrap", Kind: provider.ErrInvalidCiphertext, Err: errors.New("key service decrypted with another key")}
	}
	if n := len(out.Plaintext); n < provider.MinDEKLen || n > provider.MaxDEKLen {
		provider.Clear(out.Plaintext)
		return nil, &provider.Error{Provider: Scheme, Op: "unwrap", Kind: provider.ErrInvalidCiphertext, Err: errors.New("plaintext is not a data key")}
	}
	return out.Plaintext, nil
}

// Rewrap re-encrypts wk under the key's current material with ReEncrypt, the
// source and destination both pinned to the key ARN and bound to aad, so the
// DEK never leaves AWS KMS.
func (p *Provider) Rewrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) (*provider.WrappedKey, error) {
	if err := p.checkWrapped("rewrap", wk); err != nil {
		return nil, err
	}
	opCtx, cancel := p.withTimeout(ctx)
	defer cancel()
	version, err := p.currentVersion(opCtx, ctx, "rewrap")
	if err != nil {
		return nil, err
	}
	ec := encryptionContext(aad)
	out, err := p.client.ReEncrypt(opCtx, &kms.ReEncryptInput{
		CiphertextBlob:                 wk.Ciphertext,
		SourceKeyId:                    aws.String(p.arn),
		SourceEncryptionContext:        ec,
		SourceEncryptionAlgorithm:      types.EncryptionAlgorithmSpecSymmetricDefault,
		DestinationKeyId:               aws.String(p.arn),
		DestinationEncryptionContext:   ec,
		DestinationEncryptionAlgorithm: types.EncryptionAlgorithmSpecSymmetricDefault,
	})
	if err != nil {
		return nil, p.fail(ctx, "rewrap", err)
	}
	if aws.ToString(out.SourceKeyId) != p.arn || aws.ToString(out.KeyId) != p.arn {
		return nil, &provider.Error{Provider: Scheme, Op: "rewrap", Kind: provider.ErrInvalidCiphertext, Err: errors.New("key service re-encrypted from or to another key")}
	}
	if n := len(out.CiphertextBlob); n == 0 || n > maxBlobLen {
		return nil, &provider.Error{Provider: Scheme, Op: "rewrap", Err: fmt.Errorf("key service returned a %d-byte ciphertext", n)}
	}
	if id := aws.ToString(out.DestinationKeyMaterialId); id != "" {
		version = id
	}
	return &provider.WrappedKey{Provider: Scheme, KeyID: p.arn, Version: version, Ciphertext: out.CiphertextBlob}, nil
}

// Rotate asks AWS KMS to rotate the key's material now (RotateKeyOnDemand),
// waits until DescribeKey reports new current material (AWS rotates
// asynchronously; the wait ends with ctx, or after two minutes if ctx has no
// deadline) and returns it as the new version. AWS limits how many times a
// key may be rotated on demand; a key service without RotateKeyOnDemand, or
// a key that cannot rotate, yields a plain error saying so.
func (p *Provider) Rotate(ctx context.Context) (string, error) {
	waitCtx := ctx
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		waitCtx, cancel = context.WithTimeout(ctx, rotateTimeout)
		defer cancel()
	}
	before, err := p.rotateDescribe(waitCtx, ctx)
	if err != nil {
		return "", err
	}
	opCtx, cancel := p.withTimeout(waitCtx)
	_, err = p.client.RotateKeyOnDemand(opCtx, &kms.RotateKeyOnDemandInput{KeyId: aws.String(p.arn)})
	cancel()
	if err != nil {
		if unsupported(err) {
			return "", &provider.Error{Provider: Scheme, Op: "rotate", Err: fmt.Errorf("the key service or key does not support RotateKeyOnDemand: %w", err)}
		}
		return "", p.fail(ctx, "rotate", err)
	}
	if before == DefaultVersion {
		return "", &provider.Error{Provider: Scheme, Op: "rotate", Err: errors.New("key rotated, but the key service reports no key material id to tell versions apart")}
	}
	for delay := 50 * time.Millisecond; ; delay = min(2*delay, 2*time.Second) {
		v, err := p.rotateDescribe(waitCtx, ctx)
		if err != nil {
			return "", err
		}
		if v != before {
			return v, nil
		}
		t := time.NewTimer(delay)
		select {
		case <-waitCtx.Done():
			t.Stop()
			return "", p.fail(ctx, "rotate", fmt.Errorf("waiting for the rotation to complete: %w", waitCtx.Err()))
		case <-t.C:
		}
	}
}

func (p *Provider) rotateDescribe(waitCtx, ctx context.Context) (string, error) {
	opCtx, cancel := p.withTimeout(waitCtx)
	defer cancel()
	return p.describeVersion(opCtx, ctx, "rotate")
}

// Describe reads the key's state with DescribeKey. PrimaryVersion is the key
// material Wrap uses from now on. A key that is not enabled (disabled,
// pending deletion, pending import, unavailable) yields an error matching
// provider.ErrKeyDisabled. Versions is left empty: earlier key material
// always stays usable for Unwrap.
func (p *Provider) Describe(ctx context.Context) (provider.Status, error) {
	opCtx, cancel := p.withTimeout(ctx)
	defer cancel()
	md, err := p.describe(opCtx, ctx, "describe", p.arn)
	if err != nil {
		return provider.Status{}, err
	}
	if md.KeyState != types.KeyStateEnabled {
		return provider.Status{}, &provider.Error{Provider: Scheme, Op: "describe", Kind: provider.ErrKeyDisabled, Err: fmt.Errorf("key state is %s", md.KeyState)}
	}
	return provider.Status{Ref: p.Ref(), PrimaryVersion: p.setVersion(md), Reachable: true}, nil
}

// describe calls DescribeKey on key. callCtx carries the operation's
// deadline, ctx is the caller's (see fail).
func (p *Provider) describe(callCtx, ctx context.Context, op, key string) (*types.KeyMetadata, error) {
	out, err := p.client.DescribeKey(callCtx, &kms.DescribeKeyInput{KeyId: aws.String(key)})
	if err != nil {
		return nil, p.fail(ctx, op, err)
	}
	if out.KeyMetadata == nil {
		return nil, &provider.Error{Provider: Scheme, Op: op, Err: errors.New("DescribeKey returned no key metadata")}
	}
	return out.KeyMetadata, nil
}

// describeVersion reads the current key material with DescribeKey and
// records it for Wrap.
func (p *Provider) describeVersion(callCtx, ctx context.Context, op string) (string, error) {
	md, err := p.describe(callCtx, ctx, op, p.arn)
	if err != nil {
		return "", err
	}
	return p.setVersion(md), nil
}

func (p *Provider) setVersion(md *types.KeyMetadata) string {
	v := aws.ToString(md.CurrentKeyMaterialId)
	if v == "" {
		v = DefaultVersion
	}
	if len(v) > provider.MaxVersionLen {
		// Keep the version within bounds; an AWS key material id is 64 hex digits.
		sum := sha256.Sum256([]byte(v))
		v = base64.RawURLEncoding.EncodeToString(sum[:])
	}
	p.mu.Lock()
	p.version, p.versionAt = v, time.Now()
	p.mu.Unlock()
	return v
}

// currentVersion returns the key material to label a new wrapped key with,
// reading it again when the last reading is older than versionTTL. While one
// caller reads it, the others use the previous reading: an older label is
// always safe (see Wrap).
func (p *Provider) currentVersion(callCtx, ctx context.Context, op string) (string, error) {
	p.mu.Lock()
	v, at := p.version, p.versionAt
	if p.refreshing || time.Since(at) < versionTTL {
		p.mu.Unlock()
		return v, nil
	}
	p.refreshing = true
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.refreshing = false
		p.mu.Unlock()
	}()
	return p.describeVersion(callCtx, ctx, op)
}

func (p *Provider) checkWrapped(op string, wk *provider.WrappedKey) error {
	if err := provider.CheckWrappedKey(p.Ref(), op, wk); err != nil {
		return err
	}
	if len(wk.Ciphertext) > maxBlobLen {
		return &provider.Error{Provider: Scheme, Op: op, Kind: provider.ErrInvalidCiphertext,
			Err: fmt.Errorf("ciphertext length %d exceeds AWS KMS's %d", len(wk.Ciphertext), maxBlobLen)}
	}
	return nil
}
