package provider

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"sync"
)

// Opener opens a provider from a parsed URL whose scheme it registered.
// It should check the URL and configuration and fail early with a clear
// error where a problem can be known before the first key operation.
type Opener func(ctx context.Context, u *url.URL) (KEKProvider, error)

var (
	registryMu sync.RWMutex
	registry   = map[string]Opener{}
)

var schemeRE = regexp.MustCompile(`^[a-z][a-z0-9+.-]{0,31}$`)

// Register makes a backend available to Open under scheme. Backends call it
// from init. It panics if scheme is malformed or already registered: both
// are programming errors found at start-up, not at run time.
func Register(scheme string, open Opener) {
	if !schemeRE.MatchString(scheme) {
		panic("provider: Register: malformed scheme " + strconvQuote(scheme))
	}
	if open == nil {
		panic("provider: Register: nil opener for scheme " + scheme)
	}
	registryMu.Lock()
	defer registryMu.Unlock()
	if _, dup := registry[scheme]; dup {
		panic("provider: Register: scheme " + scheme + " registered twice")
	}
	registry[scheme] = open
}

// Schemes lists the registered schemes, sorted.
func Schemes() []string {
	registryMu.RLock()
	defer registryMu.RUnlock()
	s := make([]string, 0, len(registry))
	for k := range registry {
		s = append(s, k)
	}
	sort.Strings(s)
	return s
}

// ErrUnknownScheme is returned by Open when no backend registered the URL's
// scheme (usually: the backend's package was not imported).
var ErrUnknownScheme = errors.New("provider: unknown scheme")

// Open opens the provider that rawURL names, for example
// "local:///etc/keybroker/keyring.json" or "vault://transit/keys/meshhook".
// Errors name the scheme and the problem but never echo the URL, whose query
// may carry credentials.
func Open(ctx context.Context, rawURL string) (KEKProvider, error) {
	u, err := ParseURL(rawURL)
	if err != nil {
		return nil, err
	}
	registryMu.RLock()
	open := registry[u.Scheme]
	registryMu.RUnlock()
	if open == nil {
		known := strings.Join(Schemes(), ", ")
		if known == "" {
			known = "none; import a backend package"
		}
		return nil, fmt.Errorf("%w %q (registered: %s)", ErrUnknownScheme, u.Scheme, known)
	}
	p, err := open(ctx, u)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// ParseURL parses a provider URL and checks its shape. Its errors never
// include the URL (net/url's do), only what is wrong with it.
func ParseURL(rawURL string) (*url.URL, error) {
	if strings.TrimSpace(rawURL) == "" {
		return nil, errors.New("provider: empty provider URL")
	}
	i := strings.Index(rawURL, "://")
	if i <= 0 {
		return nil, errors.New("provider: malformed provider URL: want scheme://location")
	}
	scheme := rawURL[:i]
	if !schemeRE.MatchString(scheme) {
		return nil, errors.New("provider: malformed provider URL: invalid scheme")
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // drop the URL that url.Error carries
		}
		return nil, fmt.Errorf("provider: malformed %s URL: %v", scheme, err)
	}
	return u, nil
}

// Redact returns u as a string with its user information and query values
// replaced, fit for logs and error messages.
func Redact(u *url.URL) string {
	c := *u
	if c.User != nil {
		c.User = url.User("REDACTED")
	}
	if c.RawQuery != "" {
		q := c.Query()
		for k := range q {
			q[k] = []string{"REDACTED"}
		}
		c.RawQuery = q.Encode()
	}
	return c.String()
}

func strconvQuote(s string) string { return fmt.Sprintf("%q", s) }

var paramNameRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,23}$`)

// ParamName quotes a URL query parameter name for an error message when it
// looks like one, and otherwise says it is not shown: a credential pasted as a
// bare query ("?hvs.…") arrives as a parameter name and must not be echoed.
func ParamName(name string) string {
	if paramNameRE.MatchString(name) {
		return strconvQuote(name)
	}
	return "(name not shown)"
}
