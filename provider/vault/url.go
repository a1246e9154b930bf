package vault

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/api/auth/approle"
	"github.com/hashicorp/vault/api/auth/kubernetes"

	"github.com/profullstack/keybroker/provider"
)

// Environment variables read by Open, besides the vault CLI's TLS ones.
const (
	EnvAddr     = "VAULT_ADDR"
	EnvToken    = "VAULT_TOKEN"
	EnvRoleID   = "VAULT_ROLE_ID"
	EnvSecretID = "VAULT_SECRET_ID"
)

// DefaultJWTFile is where Kubernetes mounts a pod's service account token.
const DefaultJWTFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"

const (
	maxNameLen      = 128
	maxMountLen     = 256
	maxTimeout      = 10 * time.Minute
	maxURLRetries   = 10
	maxTokenFileLen = 4096
)

// Query parameters Open understands, and the auth methods each belongs to.
var params = map[string]string{
	"addr":           "",
	"auth":           "",
	"timeout":        "",
	"max_retries":    "",
	"token_file":     "token",
	"role_id":        "approle",
	"role_id_file":   "approle",
	"secret_id_file": "approle",
	"role":           "kubernetes",
	"jwt_file":       "kubernetes",
	"auth_mount":     "approle or kubernetes",
}

// Secrets that must never sit in a URL, which ends up in configuration
// files, process lists and logs.
var forbidden = map[string]string{
	"token":     "set VAULT_TOKEN or token_file=",
	"secret_id": "set VAULT_SECRET_ID or secret_id_file=",
	"jwt":       "use jwt_file=",
}

// parseURL turns vault://<mount>/keys/<name>?... into a Config. Errors
// name the offending part, never a value.
func parseURL(u *url.URL) (Config, error) {
	bad := func(format string, a ...any) (Config, error) {
		return Config{}, openErr(fmt.Errorf("malformed vault URL: "+format, a...))
	}
	switch {
	case u.Scheme != Scheme:
		return bad("scheme is not %q", Scheme)
	case u.Opaque != "" || u.Host == "":
		return bad("want vault://<mount>/keys/<name>")
	case u.User != nil:
		return bad("credentials in the URL are not supported")
	case u.Fragment != "":
		return bad("fragment not allowed")
	case u.RawPath != "":
		return bad("escaped characters in the key path")
	}
	full := u.Host + u.Path
	i := strings.LastIndex(full, "/keys/")
	if i <= 0 {
		return bad("want vault://<mount>/keys/<name>")
	}
	cfg := Config{Mount: full[:i], Key: full[i+len("/keys/"):]}
	if err := checkMount(cfg.Mount); err != nil {
		return bad("%v", err)
	}
	if err := checkName("key name", cfg.Key); err != nil {
		return bad("%v", err)
	}

	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return bad("malformed query")
	}
	for k, vs := range q {
		if hint, ok := forbidden[k]; ok {
			return bad("%s must not be in the URL: %s", k, hint)
		}
		if _, ok := params[k]; !ok {
			return bad("unknown parameter %s", provider.ParamName(k))
		}
		if len(vs) != 1 || vs[0] == "" {
			return bad("parameter %s must be given once, non-empty", provider.ParamName(k))
		}
	}
	get := func(k string) string { return q.Get(k) }

	cfg.Address = get("addr")
	if cfg.Address == "" {
		cfg.Address = os.Getenv(EnvAddr)
	}
	if s := get("timeout"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 || d > maxTimeout {
			return bad("timeout must be a duration in (0, %v]", maxTimeout)
		}
		cfg.Timeout = d
	}
	if s := get("max_retries"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 || n > maxURLRetries {
			return bad("max_retries must be an integer in 0..%d", maxURLRetries)
		}
		cfg.MaxRetries = n
		if n == 0 {
			cfg.MaxRetries = -1
		}
	}

	method := get("auth")
	if method == "" {
		method = "token"
	}
	for k := range q {
		if m := params[k]; m != "" && !strings.Contains(m, method) {
			return bad("parameter %q needs auth=%s", k, m)
		}
	}
	switch method {
	case "token":
		if f := get("token_file"); f != "" {
			if cfg.Token, err = readTokenFile(f); err != nil {
				return Config{}, openErr(err)
			}
		} else {
			cfg.Token = os.Getenv(EnvToken)
		}
	case "approle":
		cfg.Auth, err = appRoleAuth(get)
	case "kubernetes":
		cfg.Auth, err = kubernetesAuth(get)
	default:
		return bad("auth must be token, approle or kubernetes")
	}
	if err != nil {
		return Config{}, openErr(err)
	}
	return cfg, nil
}

func appRoleAuth(get func(string) string) (api.AuthMethod, error) {
	roleID := get("role_id")
	if f := get("role_id_file"); f != "" {
		if roleID != "" {
			return nil, errors.New("auth=approle: give role_id= or role_id_file=, not both")
		}
		var err error
		if roleID, err = readTokenFile(f); err != nil {
			return nil, err
		}
	}
	if roleID == "" {
		roleID = os.Getenv(EnvRoleID)
	}
	if roleID == "" {
		return nil, errors.New("auth=approle needs role_id=, role_id_file= or " + EnvRoleID)
	}
	var sid approle.SecretID
	switch f := get("secret_id_file"); {
	case f != "":
		sid.FromFile = f // read again at every login, so it may be rotated
	case os.Getenv(EnvSecretID) != "":
		sid.FromEnv = EnvSecretID
	default:
		return nil, errors.New("auth=approle needs secret_id_file= or " + EnvSecretID)
	}
	mount, err := authMount(get, "approle")
	if err != nil {
		return nil, err
	}
	a, err := approle.NewAppRoleAuth(roleID, &sid, approle.WithMountPath(mount))
	if err != nil {
		return nil, fmt.Errorf("auth=approle: %w", err)
	}
	return a, nil
}

func kubernetesAuth(get func(string) string) (api.AuthMethod, error) {
	role := get("role")
	if role == "" {
		return nil, errors.New("auth=kubernetes needs role=")
	}
	jwtFile := get("jwt_file")
	if jwtFile == "" {
		jwtFile = DefaultJWTFile
	}
	if _, err := readTokenFile(jwtFile); err != nil {
		return nil, err
	}
	mount, err := authMount(get, "kubernetes")
	if err != nil {
		return nil, err
	}
	return KubernetesAuth(role, jwtFile, mount), nil
}

func authMount(get func(string) string, def string) (string, error) {
	m := get("auth_mount")
	if m == "" {
		return def, nil
	}
	if err := checkMount(m); err != nil {
		return "", fmt.Errorf("auth_mount: %w", err)
	}
	return m, nil
}

// KubernetesAuth logs in with Vault's Kubernetes auth method at mount
// (usually "kubernetes") as role, reading the service account token from
// jwtFile at every login: projected tokens are rotated by the kubelet, so
// a token read once would expire.
func KubernetesAuth(role, jwtFile, mount string) api.AuthMethod {
	return authFunc(func(ctx context.Context, c *api.Client) (*api.Secret, error) {
		a, err := kubernetes.NewKubernetesAuth(role,
			kubernetes.WithServiceAccountTokenPath(jwtFile), kubernetes.WithMountPath(mount))
		if err != nil {
			return nil, err
		}
		return a.Login(ctx, c)
	})
}

type authFunc func(context.Context, *api.Client) (*api.Secret, error)

func (f authFunc) Login(ctx context.Context, c *api.Client) (*api.Secret, error) { return f(ctx, c) }

// readTokenFile reads a small credential file, trimming surrounding
// whitespace. Errors name the file, never its contents.
func readTokenFile(name string) (string, error) {
	f, err := os.Open(name)
	if err != nil {
		return "", fmt.Errorf("credential file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxTokenFileLen+1))
	if err != nil {
		return "", fmt.Errorf("credential file %s: %w", name, err)
	}
	if len(b) > maxTokenFileLen {
		return "", fmt.Errorf("credential file %s exceeds %d bytes", name, maxTokenFileLen)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "", fmt.Errorf("credential file %s is empty", name)
	}
	return s, nil
}

func checkAddress(addr string) error {
	u, err := url.Parse(addr)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
		u.User != nil || u.RawQuery != "" || u.Fragment != "" || (u.Path != "" && u.Path != "/") {
		return errors.New("malformed Vault address: want http(s)://host[:port]")
	}
	return nil
}

// checkName accepts 1..128 of [A-Za-z0-9_.-], other than "." and "..".
func checkName(what, s string) error {
	if s == "" || len(s) > maxNameLen {
		return fmt.Errorf("%s length %d out of range 1..%d", what, len(s), maxNameLen)
	}
	if s == "." || s == ".." {
		return fmt.Errorf("%s may not be %q", what, s)
	}
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return fmt.Errorf("%s may contain only letters, digits, '_', '-' and '.'", what)
		}
	}
	return nil
}

// checkMount accepts slash-separated names, such as "transit" or
// "team/transit".
func checkMount(m string) error {
	if m == "" || len(m) > maxMountLen {
		return fmt.Errorf("mount path length %d out of range 1..%d", len(m), maxMountLen)
	}
	for _, seg := range strings.Split(m, "/") {
		if err := checkName("mount path segment", seg); err != nil {
			return err
		}
	}
	return nil
}
