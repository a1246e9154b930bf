package legacy

import (
	"errors"
	"regexp"
	"strings"
)

// URL schemes understood by Open.
const (
	SchemeMeshHookV1 = "meshhook-v1"
	SchemePlaintext  = "plaintext"
)

var schemeRE = regexp.MustCompile(`^[a-z][a-z0-9+.-]{0,31}$`)

// Open returns the decoder a URL names, so configuration can list decoders
// as it lists KEK providers:
//
//	meshhook-v1://env/SECRETS_ENCRYPTION_KEY   MeshHookV1FromEnv("SECRETS_ENCRYPTION_KEY")
//	plaintext://                               Plaintext()
//
// The key is only ever read from the environment, never from the URL, so a
// URL is safe to log. Errors never echo the URL (a key pasted into it must
// not reach a log), only its scheme when that is well formed.
func Open(rawURL string) (Decoder, error) {
	const want = "; want meshhook-v1://env/VARNAME or plaintext://"
	scheme, rest, ok := strings.Cut(rawURL, "://")
	if !ok || !schemeRE.MatchString(scheme) {
		return nil, errors.New("legacy: malformed decoder URL" + want)
	}
	switch scheme {
	case SchemePlaintext:
		if rest != "" {
			return nil, errors.New("legacy: malformed plaintext URL: nothing may follow plaintext://")
		}
		return Plaintext(), nil
	case SchemeMeshHookV1:
		name, ok := strings.CutPrefix(rest, "env/")
		if !ok || !envNameRE.MatchString(name) {
			return nil, errors.New("legacy: malformed meshhook-v1 URL: want meshhook-v1://env/VARNAME with VARNAME an environment variable name")
		}
		d, err := MeshHookV1FromEnv(name)
		if err != nil {
			return nil, err // not a typed nil inside a non-nil Decoder
		}
		return d, nil
	}
	return nil, errors.New("legacy: unknown decoder scheme " + scheme + want)
}
