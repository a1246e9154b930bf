package vault

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/provider"
)

// Vault transit's messages (sdk/helper/keysutil, builtin/logical/transit)
// that mean the key or the key version is missing rather than the
// ciphertext being bad.
var notFoundMessages = []string{
	"key not found", // also "encryption key not found"
	"version is too new",
	"disallowed by policy (too old)", // below min_decryption_version: retired
}

// classify turns a Vault client error into a *provider.Error. ctx is the
// caller's context: when it is done its error wins and the result is not
// retryable; a timeout of the provider's own deadline is ErrUnavailable.
func classify(ctx context.Context, op string, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		if !errors.Is(err, cerr) {
			err = fmt.Errorf("%w: %w", cerr, err)
		}
		return &provider.Error{Provider: Scheme, Op: op, Err: err}
	}
	var re *api.ResponseError
	if errors.As(err, &re) {
		return &provider.Error{Provider: Scheme, Op: op, Kind: kindOf(op, re.StatusCode, re.Errors), Err: &responseError{re}}
	}
	var (
		certErr *tls.CertificateVerificationError
		uaErr   x509.UnknownAuthorityError
		hostErr x509.HostnameError
		urlErr  *url.Error
		netErr  net.Error
	)
	switch {
	case errors.As(err, &certErr), errors.As(err, &uaErr), errors.As(err, &hostErr):
		// A TLS misconfiguration does not heal by retrying.
		return &provider.Error{Provider: Scheme, Op: op, Err: err}
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &urlErr), errors.As(err, &netErr):
		return &provider.Error{Provider: Scheme, Op: op, Kind: provider.ErrUnavailable, Err: err}
	}
	return &provider.Error{Provider: Scheme, Op: op, Err: err}
}

// timedOut names the provider's own timeout when it, not the caller's
// context, ended a request (octx derives from ctx with timeout d).
func timedOut(ctx, octx context.Context, d time.Duration, err error) error {
	if ctx.Err() == nil && octx.Err() != nil {
		return fmt.Errorf("no answer within the %v timeout: %w", d, err)
	}
	return err
}

// kindOf maps an HTTP status and Vault's messages to a portable error.
func kindOf(op string, status int, msgs []string) error {
	switch {
	case status == 412 || status == 429 || (status >= 500 && status != 501):
		return provider.ErrUnavailable // includes 503 "Vault is sealed"
	case op == "login":
		if status == 400 || status == 401 || status == 403 {
			return provider.ErrAccessDenied // e.g. 400 "invalid role or secret ID"
		}
		return nil
	case status == 403:
		return provider.ErrAccessDenied // bad token or missing policy
	case status == 404:
		return provider.ErrKeyNotFound
	case status == 400:
		all := strings.Join(msgs, "\n")
		for _, m := range notFoundMessages {
			if strings.Contains(all, m) {
				return provider.ErrKeyNotFound
			}
		}
		if op == "unwrap" {
			// "cipher: message authentication failed", "invalid ciphertext: ...":
			// deliberately one kind whatever the cause.
			return provider.ErrInvalidCiphertext
		}
	}
	return nil
}

// responseError prints a Vault error response on one short line (method,
// path, status, messages) instead of api.ResponseError's multi-line text;
// errors.As still reaches the *api.ResponseError.
type responseError struct{ re *api.ResponseError }

func (e *responseError) Unwrap() error { return e.re }

func (e *responseError) Error() string {
	var b strings.Builder
	b.WriteString(e.re.HTTPMethod)
	if u, err := url.Parse(e.re.URL); err == nil {
		b.WriteString(" ")
		b.WriteString(u.Path) // never the query
	}
	fmt.Fprintf(&b, ": HTTP %d", e.re.StatusCode)
	for i, m := range e.re.Errors {
		if i == 3 {
			b.WriteString("; ...")
			break
		}
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString("; ")
		}
		b.WriteString(truncate(strings.Join(strings.Fields(m), " "), 200))
	}
	return b.String()
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
