package provider

import (
	"errors"
	"strings"
)

// Portable errors. Every backend maps its native errors to one of these, so
// callers can decide what to do without knowing which backend is in use.
var (
	// ErrKeyNotFound: the KEK, or the version a wrapped key names, does not
	// exist (or was retired or destroyed), or no provider in a Keyring
	// serves the wrapped key.
	ErrKeyNotFound = errors.New("key not found")
	// ErrAccessDenied: the credentials are not allowed to use the key.
	ErrAccessDenied = errors.New("access denied")
	// ErrKeyDisabled: the key or version exists but is disabled.
	ErrKeyDisabled = errors.New("key disabled")
	// ErrUnavailable: the key service could not be reached or asked us to
	// slow down. The operation may succeed if retried.
	ErrUnavailable = errors.New("key service unavailable")
	// ErrInvalidCiphertext: the wrapped key was altered, belongs to another
	// key, or the associated data does not match. Deliberately uninformative.
	ErrInvalidCiphertext = errors.New("invalid ciphertext")
)

// Error is the error type backends return. Kind is one of the portable
// errors above (or nil when none fits); Err is the native cause, reachable
// with errors.As. Neither may carry key material or plaintext.
type Error struct {
	Provider string // backend scheme
	Op       string // "wrap", "unwrap", "rewrap", "rotate", "describe", "retire", "open"
	Kind     error
	Err      error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("provider: ")
	if e.Provider != "" {
		b.WriteString(e.Provider)
		b.WriteString(": ")
	}
	if e.Op != "" {
		b.WriteString(e.Op)
		b.WriteString(": ")
	}
	switch {
	case e.Kind != nil && e.Err != nil:
		b.WriteString(e.Kind.Error())
		b.WriteString(": ")
		b.WriteString(oneLine(e.Err.Error()))
	case e.Kind != nil:
		b.WriteString(e.Kind.Error())
	case e.Err != nil:
		b.WriteString(oneLine(e.Err.Error()))
	default:
		b.WriteString("unknown error")
	}
	return b.String()
}

// Is reports whether target is e's Kind, so errors.Is(err, ErrKeyNotFound)
// works whatever the native cause.
func (e *Error) Is(target error) bool { return e.Kind != nil && target == e.Kind }

// Unwrap returns the native cause.
func (e *Error) Unwrap() error { return e.Err }

// IsRetryable reports whether err is worth retrying: the key service was
// unavailable or throttled us. Context cancellation is never retryable.
func IsRetryable(err error) bool {
	return errors.Is(err, ErrUnavailable)
}

// oneLine folds a multi-line native message (some SDKs add request dumps)
// into one line so logs stay greppable.
func oneLine(s string) string {
	if !strings.ContainsAny(s, "\r\n") {
		return s
	}
	return strings.Join(strings.Fields(s), " ")
}
