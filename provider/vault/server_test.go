package vault_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/internal/vaultserver"
)

// srv is the dev-mode Vault shared by the tests, started by TestMain.
var srv *vaultserver.Server

func TestMain(m *testing.M) {
	// The developer's Vault settings must not leak into the tests.
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "VAULT_") {
			os.Unsetenv(k)
		}
	}
	s, err := vaultserver.Start(context.Background(), vaultserver.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "vault tests:", err)
		os.Exit(1)
	}
	srv = s
	code := 1
	if err := setUp(s); err != nil {
		fmt.Fprintln(os.Stderr, "vault tests: set-up:", err)
	} else {
		// The registry path (provider.Open with no addr or token in the URL)
		// and the example use the environment, as a deployment would.
		os.Setenv("VAULT_ADDR", s.Addr)
		os.Setenv("VAULT_TOKEN", s.Token)
		code = m.Run()
	}
	s.Stop()
	os.Exit(code)
}

// setUp enables what the tests use: transit at "transit" and at a nested
// mount, AppRole, and the example's key.
func setUp(s *vaultserver.Server) error {
	for path, typ := range map[string]string{"transit": "transit", "team/transit": "transit"} {
		if err := s.Root.Sys().Mount(path, &api.MountInput{Type: typ}); err != nil {
			return err
		}
	}
	if err := s.Root.Sys().EnableAuthWithOptions("approle", &api.EnableAuthOptions{Type: "approle"}); err != nil {
		return err
	}
	_, err := s.Root.Logical().Write("transit/keys/example", nil)
	return err
}

// startServer starts a test's own server (one it may seal, say), stopped
// when the test ends.
func startServer(t testing.TB, opts vaultserver.Options) *vaultserver.Server {
	t.Helper()
	s, err := vaultserver.Start(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// newTransitKey creates a fresh transit key on s and returns its name.
func newTransitKey(t testing.TB, s *vaultserver.Server, mount string, params map[string]any) string {
	t.Helper()
	name := "k-" + randHex(8)
	if _, err := s.Root.Logical().WriteWithContext(context.Background(), mount+"/keys/"+name, params); err != nil {
		t.Fatalf("create transit key: %v", err)
	}
	return name
}
