package local

import (
	"context"
	"errors"
	"net/url"
	"path/filepath"
	"strings"

	"github.com/profullstack/keybroker/provider"
)

func init() { provider.Register(Scheme, openURL) }

// openURL opens local:///absolute/path/keyring.json with OpenFile and
// local://env/VARNAME with FromEnv. Neither form takes a query.
func openURL(ctx context.Context, u *url.URL) (provider.KEKProvider, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	bad := func(msg string) error {
		return opErr("open", nil, errors.New("malformed local URL: "+msg+"; want local:///absolute/path/keyring.json or local://env/VARNAME"))
	}
	switch {
	case u.Opaque != "":
		return nil, bad("missing //")
	case u.User != nil:
		return nil, bad("user information not allowed")
	case u.RawQuery != "" || u.ForceQuery:
		return nil, bad("query not allowed")
	case u.Fragment != "":
		return nil, bad("fragment not allowed")
	case u.Host == "env":
		name, ok := strings.CutPrefix(u.Path, "/")
		if !ok || name == "" {
			return nil, bad("no environment variable name")
		}
		return FromEnv(name)
	case u.Host != "":
		return nil, bad("host must be empty (file) or env")
	case !filepath.IsAbs(u.Path):
		return nil, bad("file path must be absolute")
	}
	return OpenFile(u.Path)
}
