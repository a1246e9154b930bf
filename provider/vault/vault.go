package vault

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/provider"
)

// Scheme is the URL scheme this package registers with provider.Register.
const Scheme = "vault"

func init() {
	provider.Register(Scheme, func(ctx context.Context, u *url.URL) (provider.KEKProvider, error) {
		p, err := Open(ctx, u)
		if err != nil {
			return nil, err
		}
		return p, nil
	})
}

var (
	_ provider.KEKProvider = (*Provider)(nil)
	_ provider.Rotator     = (*Provider)(nil)
	_ provider.Describer   = (*Provider)(nil)
	_ provider.Retirer     = (*Provider)(nil)
	_ io.Closer            = (*Provider)(nil)
)

// Defaults for Config fields left zero.
const (
	DefaultTimeout    = 30 * time.Second
	DefaultMaxRetries = 2
	minRetryWait      = 200 * time.Millisecond
	maxRetryWait      = 5 * time.Second
	// maxResponse bounds what is read of a Vault response body.
	maxResponse = 1 << 20
)

// Config configures New. Open builds one from a URL.
type Config struct {
	// Address of the Vault server, for example "https://vault.internal:8200".
	// Required. TLS settings come from the standard VAULT_CACERT,
	// VAULT_CAPATH, VAULT_CLIENT_CERT, VAULT_CLIENT_KEY,
	// VAULT_TLS_SERVER_NAME and VAULT_SKIP_VERIFY environment variables,
	// and VAULT_NAMESPACE selects an Enterprise namespace, as for the vault
	// CLI. VAULT_AGENT_ADDR is ignored: Address is the only address.
	Address string
	// Mount is the path the transit engine is mounted at, for example
	// "transit" or "kb/transit". Key is the transit key's name.
	Mount, Key string

	// Auth, when set, logs in at New and again whenever the token it
	// obtained can no longer be renewed. When nil, Token is used as is.
	Auth api.AuthMethod
	// Token is the Vault token used when Auth is nil.
	Token string

	// Timeout bounds each operation, retries included; a caller's earlier
	// context deadline wins. Zero means DefaultTimeout.
	Timeout time.Duration
	// MaxRetries is how many times a retryable failure (connection error,
	// 412, 429, 5xx except 501) is retried with exponential backoff. Zero
	// means DefaultMaxRetries; negative means no retries.
	MaxRetries int
	// RenewIncrement is the TTL asked for at each token renewal, in whole
	// seconds. Zero asks for the token's own TTL.
	RenewIncrement time.Duration
	// OnTokenEvent, if set, is called from the token-renewal goroutine after
	// each renewal, login and stop of renewal. It must not block for long.
	OnTokenEvent func(TokenEvent)
}

// Provider wraps data keys with a Vault Transit key. It is safe for
// concurrent use. Close stops its token renewal.
type Provider struct {
	client  *api.Client
	ref     provider.KeyRef
	mount   string // "transit"
	key     string // transit key name
	timeout time.Duration

	tm     *tokenManager
	closed atomic.Bool
	once   sync.Once
}

// Open opens the Transit key that u names; see the package documentation
// for the URL form. It is the opener registered for the "vault" scheme.
func Open(ctx context.Context, u *url.URL) (*Provider, error) {
	cfg, err := parseURL(u)
	if err != nil {
		return nil, err
	}
	return New(ctx, cfg)
}

// New connects to Vault, authenticates and checks that the token can read
// the transit key, which must exist and be of a type that supports
// associated data (aes128-gcm96, aes256-gcm96, chacha20-poly1305) without
// key derivation. A bad address, token or key is reported here, not at the
// first Wrap.
func New(ctx context.Context, cfg Config) (*Provider, error) {
	if err := cfg.check(); err != nil {
		return nil, openErr(err)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	client, err := newClient(cfg)
	if err != nil {
		return nil, openErr(err)
	}
	p := &Provider{
		client:  client,
		ref:     provider.KeyRef{Provider: Scheme, KeyID: cfg.Mount + "/keys/" + cfg.Key},
		mount:   cfg.Mount,
		key:     cfg.Key,
		timeout: cfg.Timeout,
	}
	tm, err := startToken(ctx, client, cfg)
	if err != nil {
		return nil, err
	}
	p.tm = tm
	if err := p.checkKey(ctx); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

func (c *Config) check() error {
	switch {
	case c.Address == "":
		return errors.New("no Vault address: set addr= in the URL or VAULT_ADDR")
	case c.Auth == nil && c.Token == "":
		return errors.New("no Vault token: set VAULT_TOKEN or token_file=, or use auth=approle or auth=kubernetes")
	case c.Timeout < 0:
		return errors.New("negative timeout")
	case c.RenewIncrement < 0:
		return errors.New("negative renew increment")
	}
	if err := checkMount(c.Mount); err != nil {
		return err
	}
	return checkName("key name", c.Key)
}

func newClient(cfg Config) (*api.Client, error) {
	ac := api.DefaultConfig() // reads the VAULT_* TLS settings
	if ac.Error != nil {
		return nil, fmt.Errorf("client configuration: %w", ac.Error)
	}
	if err := checkAddress(cfg.Address); err != nil {
		return nil, err
	}
	ac.Address = cfg.Address
	ac.AgentAddress = "" // VAULT_AGENT_ADDR would silently replace Address
	// Operations set their own deadline (Provider.timeout) and keep it until
	// the body is read. The http.Client timeout is a backstop for the
	// renewal goroutine's requests, which take no context; it is longer, so
	// that an operation's own deadline is the one that fires.
	ac.Timeout = 0
	ac.HttpClient.Timeout = 2 * cfg.Timeout
	switch {
	case cfg.MaxRetries == 0:
		ac.MaxRetries = DefaultMaxRetries
	case cfg.MaxRetries < 0:
		ac.MaxRetries = 0
	default:
		ac.MaxRetries = cfg.MaxRetries
	}
	ac.MinRetryWait, ac.MaxRetryWait = minRetryWait, maxRetryWait
	// Exponential backoff that honours Retry-After; DefaultRetryPolicy stops
	// at once when the context is done and retries only connection errors,
	// 412, 429 and 5xx (not 501).
	ac.Backoff = retryablehttp.DefaultBackoff
	ac.CheckRetry = api.DefaultRetryPolicy
	c, err := api.NewClient(ac)
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	c.ClearToken() // NewClient picks up VAULT_TOKEN; only cfg decides
	return c, nil
}

// Ref returns {Provider: "vault", KeyID: "<mount>/keys/<name>"}. The Vault
// address is deliberately not part of it: the same key reached through
// another address (a load balancer, a standby, a DR name) is the same key.
func (p *Provider) Ref() provider.KeyRef { return p.ref }

// Wrap encrypts dek with transit/encrypt, binding aad as Vault's
// associated_data. The WrappedKey's Version is the decimal key version and
// its Ciphertext the raw bytes after Vault's "vault:vN:" prefix.
func (p *Provider) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	if err := provider.CheckDEK(Scheme, dek); err != nil {
		return nil, err
	}
	b64 := base64.StdEncoding.AppendEncode(nil, dek)
	defer provider.Clear(b64)
	body := jsonBody("plaintext", b64, aad)
	defer provider.Clear(body)
	var out struct {
		Data struct {
			Ciphertext string `json:"ciphertext"`
			KeyVersion int    `json:"key_version"`
		} `json:"data"`
	}
	if err := p.write(ctx, "wrap", p.mount+"/encrypt/"+p.key, body, &out); err != nil {
		return nil, err
	}
	ver, raw, err := parseCiphertext(out.Data.Ciphertext)
	if err == nil && out.Data.KeyVersion != 0 && out.Data.KeyVersion != ver {
		err = fmt.Errorf("ciphertext version %d differs from key_version %d", ver, out.Data.KeyVersion)
	}
	if err != nil {
		return nil, &provider.Error{Provider: Scheme, Op: "wrap", Err: fmt.Errorf("unexpected response from Vault: %w", err)}
	}
	return &provider.WrappedKey{Provider: Scheme, KeyID: p.ref.KeyID, Version: strconv.Itoa(ver), Ciphertext: raw}, nil
}

// Unwrap decrypts wk with transit/decrypt. A wrong aad or altered
// ciphertext yields ErrInvalidCiphertext; a version above the latest, or
// below the key's min_decryption_version (retired), yields ErrKeyNotFound.
func (p *Provider) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	if err := provider.CheckWrappedKey(p.ref, "unwrap", wk); err != nil {
		return nil, err
	}
	ver, err := parseVersion(wk.Version)
	if err != nil {
		return nil, &provider.Error{Provider: Scheme, Op: "unwrap", Kind: provider.ErrInvalidCiphertext, Err: err}
	}
	body := jsonBody("ciphertext", []byte(formatCiphertext(ver, wk.Ciphertext)), aad)
	var out struct {
		Data struct {
			Plaintext []byte `json:"plaintext"` // base64 in JSON
		} `json:"data"`
	}
	if err := p.write(ctx, "unwrap", p.mount+"/decrypt/"+p.key, body, &out); err != nil {
		return nil, err
	}
	dek := out.Data.Plaintext
	if len(dek) < provider.MinDEKLen || len(dek) > provider.MaxDEKLen {
		provider.Clear(dek)
		return nil, &provider.Error{Provider: Scheme, Op: "unwrap", Kind: provider.ErrInvalidCiphertext,
			Err: fmt.Errorf("decrypted key length %d out of range %d..%d", len(dek), provider.MinDEKLen, provider.MaxDEKLen)}
	}
	return dek, nil
}

// Rotate creates a new version of the transit key (keys/<name>/rotate) and
// returns it. Keys wrapped under earlier versions still unwrap. A rotation
// whose response was lost and that is retried creates two versions; the
// later one is primary.
func (p *Provider) Rotate(ctx context.Context) (string, error) {
	var out keyInfo
	if err := p.write(ctx, "rotate", p.mount+"/keys/"+p.key+"/rotate", []byte("{}"), &out); err != nil {
		return "", err
	}
	if out.Data.LatestVersion <= 0 { // older servers answer 204
		st, err := p.readKey(ctx, "rotate")
		if err != nil {
			return "", err
		}
		out = *st
	}
	return strconv.Itoa(out.Data.LatestVersion), nil
}

// Describe reads keys/<name>: PrimaryVersion is latest_version and
// Versions lists the versions from min_decryption_version to latest.
func (p *Provider) Describe(ctx context.Context) (provider.Status, error) {
	k, err := p.readKey(ctx, "describe")
	if err != nil {
		return provider.Status{}, err
	}
	lo := max(k.Data.MinDecryptionVersion, 1)
	var vs []int
	for s := range k.Data.Keys {
		if v, err := parseVersion(s); err == nil && v >= lo && v <= k.Data.LatestVersion {
			vs = append(vs, v)
		}
	}
	slices.Sort(vs)
	st := provider.Status{Ref: p.ref, PrimaryVersion: strconv.Itoa(k.Data.LatestVersion), Reachable: true}
	for _, v := range vs {
		st.Versions = append(st.Versions, strconv.Itoa(v))
	}
	return st, nil
}

// Retire stops version, and with it every earlier version, from unwrapping
// by raising the key's min_decryption_version to version+1 (Vault's floor
// cannot exclude one version alone). It never lowers the floor: retiring a
// version already below it does nothing. The primary version cannot be
// retired; rotate first. Vault keeps the key material until
// keys/<name>/trim, so an operator can lower min_decryption_version again.
// The read-then-write is not atomic: concurrent Retire calls on one key
// may leave the lower floor.
func (p *Provider) Retire(ctx context.Context, version string) error {
	v, err := parseVersion(version)
	if err != nil {
		return &provider.Error{Provider: Scheme, Op: "retire", Err: err}
	}
	k, err := p.readKey(ctx, "retire")
	if err != nil {
		return err
	}
	switch {
	case v >= k.Data.LatestVersion:
		return &provider.Error{Provider: Scheme, Op: "retire",
			Err: fmt.Errorf("version %d is the primary or does not exist (latest is %d); rotate first", v, k.Data.LatestVersion)}
	case v < k.Data.MinDecryptionVersion:
		return nil
	}
	body := []byte(`{"min_decryption_version":` + strconv.Itoa(v+1) + `}`)
	return p.write(ctx, "retire", p.mount+"/keys/"+p.key+"/config", body, nil)
}

// Close stops token renewal and makes later operations fail. It is safe to
// call more than once.
func (p *Provider) Close() error {
	p.once.Do(func() {
		p.closed.Store(true)
		if p.tm != nil {
			p.tm.stop()
		}
	})
	return nil
}

type keyInfo struct {
	Data struct {
		Type                 string         `json:"type"`
		Derived              bool           `json:"derived"`
		LatestVersion        int            `json:"latest_version"`
		MinDecryptionVersion int            `json:"min_decryption_version"`
		SupportsEncryption   bool           `json:"supports_encryption"`
		SupportsDecryption   bool           `json:"supports_decryption"`
		Keys                 map[string]any `json:"keys"`
	} `json:"data"`
}

func (p *Provider) readKey(ctx context.Context, op string) (*keyInfo, error) {
	var k keyInfo
	if err := p.do(ctx, op, "GET", p.mount+"/keys/"+p.key, nil, &k); err != nil {
		return nil, err
	}
	if k.Data.LatestVersion <= 0 {
		return nil, &provider.Error{Provider: Scheme, Op: op, Err: errors.New("unexpected response from Vault: no latest_version")}
	}
	return &k, nil
}

// checkKey is New's probe: the key exists, this token may read it, and
// its type binds associated data.
func (p *Provider) checkKey(ctx context.Context) error {
	k, err := p.readKey(ctx, "open")
	if err != nil {
		return err
	}
	switch k.Data.Type {
	case "aes128-gcm96", "aes256-gcm96", "chacha20-poly1305":
	default:
		return openErr(fmt.Errorf("transit key type %q does not support associated data; use aes256-gcm96", k.Data.Type))
	}
	if k.Data.Derived {
		return openErr(errors.New("transit key uses key derivation, which this provider does not support"))
	}
	return nil
}

func (p *Provider) write(ctx context.Context, op, path string, body []byte, out any) error {
	return p.do(ctx, op, "PUT", path, body, out)
}

// do sends one request under the provider's timeout and decodes the JSON
// response into out (if non-nil). The response body is cleared after
// decoding because decrypt responses carry the DEK.
func (p *Provider) do(ctx context.Context, op, method, path string, body []byte, out any) error {
	if p.closed.Load() {
		return &provider.Error{Provider: Scheme, Op: op, Err: errors.New("provider is closed")}
	}
	if err := ctx.Err(); err != nil {
		return &provider.Error{Provider: Scheme, Op: op, Err: err}
	}
	octx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	var (
		resp *api.Response
		err  error
	)
	if method == "GET" {
		resp, err = p.client.Logical().ReadRawWithContext(octx, path)
	} else {
		resp, err = p.client.Logical().WriteRawWithContext(octx, path, body)
	}
	if resp != nil {
		defer resp.Body.Close()
	}
	if err != nil {
		return classify(ctx, op, timedOut(ctx, octx, p.timeout, err))
	}
	buf, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	defer provider.Clear(buf)
	if err != nil {
		return classify(ctx, op, timedOut(ctx, octx, p.timeout, err))
	}
	if len(buf) > maxResponse {
		return &provider.Error{Provider: Scheme, Op: op, Err: fmt.Errorf("response from Vault exceeds %d bytes", maxResponse)}
	}
	if out == nil || len(bytes.TrimSpace(buf)) == 0 {
		return nil
	}
	if err := json.Unmarshal(buf, out); err != nil {
		// json errors can quote the offending input: do not include it.
		return &provider.Error{Provider: Scheme, Op: op, Err: errors.New("unexpected response from Vault: malformed JSON")}
	}
	return nil
}

// jsonBody builds {"<field>":"<text>","associated_data":"<base64 aad>"} in
// one buffer the caller can clear. text must need no JSON escaping (base64
// or a Vault ciphertext).
func jsonBody(field string, text, aad []byte) []byte {
	enc := base64.StdEncoding
	b := make([]byte, 0, len(field)+len(text)+enc.EncodedLen(len(aad))+32)
	b = append(b, `{"`...)
	b = append(b, field...)
	b = append(b, `":"`...)
	b = append(b, text...)
	b = append(b, '"')
	if len(aad) > 0 {
		b = append(b, `,"associated_data":"`...)
		b = enc.AppendEncode(b, aad)
		b = append(b, '"')
	}
	return append(b, '}')
}

// maxVersion bounds key versions; Vault's are positive int32-sized.
const maxVersion = 1<<31 - 1

// parseVersion accepts a positive decimal without sign or leading zero.
func parseVersion(s string) (int, error) {
	if s == "" || len(s) > 10 || s[0] == '0' || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("malformed key version (want a positive decimal, %d bytes given)", len(s))
	}
	v, err := strconv.Atoi(s)
	if err != nil || v > maxVersion {
		return 0, errors.New("key version out of range")
	}
	return v, nil
}

const ctPrefix = "vault:v"

// parseCiphertext splits Vault's "vault:v<N>:<base64>" strictly: a
// canonical version and canonical padded base64 of a bounded length.
func parseCiphertext(s string) (int, []byte, error) {
	rest, ok := strings.CutPrefix(s, ctPrefix)
	if !ok {
		return 0, nil, errors.New(`ciphertext lacks the "vault:v" prefix`)
	}
	vs, b64, ok := strings.Cut(rest, ":")
	if !ok {
		return 0, nil, errors.New("ciphertext lacks a version field")
	}
	v, err := parseVersion(vs)
	if err != nil {
		return 0, nil, err
	}
	if base64.StdEncoding.DecodedLen(len(b64)) > provider.MaxCiphertextLen {
		return 0, nil, fmt.Errorf("ciphertext exceeds %d bytes", provider.MaxCiphertextLen)
	}
	// Re-encoding rejects what the decoder tolerates: newlines, non-zero
	// padding bits.
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) == 0 || base64.StdEncoding.EncodeToString(raw) != b64 {
		return 0, nil, errors.New("ciphertext is not canonical base64")
	}
	return v, raw, nil
}

func formatCiphertext(v int, raw []byte) string {
	return ctPrefix + strconv.Itoa(v) + ":" + base64.StdEncoding.EncodeToString(raw)
}

func openErr(err error) error { return &provider.Error{Provider: Scheme, Op: "open", Err: err} }
