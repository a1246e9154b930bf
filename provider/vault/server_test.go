package vault_test

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/internal/testbin"
)

// srv is the dev-mode Vault shared by the tests, started by TestMain.
var srv *devServer

func TestMain(m *testing.M) {
	// The developer's Vault settings must not leak into the tests.
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "VAULT_") {
			os.Unsetenv(k)
		}
	}
	s, err := startDevServer()
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
		os.Setenv("VAULT_ADDR", s.addr)
		os.Setenv("VAULT_TOKEN", s.token)
		code = m.Run()
	}
	s.stop()
	os.Exit(code)
}

// setUp enables what the tests use: transit at "transit" and at a nested
// mount, AppRole, and the example's key.
func setUp(s *devServer) error {
	for path, typ := range map[string]string{"transit": "transit", "team/transit": "transit"} {
		if err := s.root.Sys().Mount(path, &api.MountInput{Type: typ}); err != nil {
			return err
		}
	}
	if err := s.root.Sys().EnableAuthWithOptions("approle", &api.EnableAuthOptions{Type: "approle"}); err != nil {
		return err
	}
	_, err := s.root.Logical().Write("transit/keys/example", nil)
	return err
}

type devServer struct {
	addr, token string
	caCert      string // with TLS: the CA certificate's file
	root        *api.Client
	cmd         *exec.Cmd
	dir         string
	exited      chan struct{}
}

// startDevServer starts `vault server -dev` on a free loopback port with
// a random root token (given through the environment, not argv) and a
// throwaway HOME, and waits until it answers sys/health. A port lost to a
// race is retried on another.
func startDevServer() (*devServer, error) { return startServer(false) }

// startServer starts a dev server, with TLS (-dev-tls: a fresh CA, whose
// certificate is s.caCert) when withTLS is set.
func startServer(withTLS bool) (*devServer, error) {
	bin, err := testbin.Find("vault")
	if err != nil {
		return nil, err
	}
	var lastErr error
	for range 3 {
		s, err := tryStart(bin, withTLS)
		if err == nil {
			return s, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

func tryStart(bin string, withTLS bool) (*devServer, error) {
	// Dev mode also listens on port+1 (cluster): ask for a port whose
	// successor is free as well.
	port, err := freePortPair()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "keybroker-vault-")
	if err != nil {
		return nil, err
	}
	s := &devServer{addr: "http://127.0.0.1:" + strconv.Itoa(port), token: "root-" + randHex(16), dir: dir, exited: make(chan struct{})}
	logf, err := os.Create(filepath.Join(dir, "vault.log"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	defer logf.Close()
	args := []string{"server", "-dev", "-dev-no-store-token", "-log-level=warn"}
	if withTLS {
		s.addr = "https" + strings.TrimPrefix(s.addr, "http")
		s.caCert = filepath.Join(dir, "vault-ca.pem")
		args = append(args, "-dev-tls", "-dev-tls-cert-dir="+dir)
	}
	s.cmd = exec.Command(bin, args...)
	s.cmd.Env = []string{
		"HOME=" + dir,
		"PATH=" + os.Getenv("PATH"),
		"VAULT_DEV_ROOT_TOKEN_ID=" + s.token,
		"VAULT_DEV_LISTEN_ADDRESS=127.0.0.1:" + strconv.Itoa(port),
	}
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	killWithParent(s.cmd)
	if err := s.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() { s.cmd.Wait(); close(s.exited) }()
	if err := s.waitHealthy(60 * time.Second); err != nil {
		s.stop()
		return nil, err
	}
	cfg := api.DefaultConfig()
	cfg.Address = s.addr
	if withTLS {
		err = cfg.ConfigureTLS(&api.TLSConfig{CACert: s.caCert})
	}
	if err == nil {
		s.root, err = api.NewClient(cfg)
	}
	if err != nil {
		s.stop()
		return nil, err
	}
	s.root.SetToken(s.token)
	return s, nil
}

// waitHealthy polls sys/health until it answers 200, the process exits,
// or the deadline passes.
func (s *devServer) waitHealthy(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	hc := &http.Client{Timeout: 2 * time.Second}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if s.caCert != "" && hc.Transport == nil {
			// The server writes its CA before it listens.
			if pem, err := os.ReadFile(s.caCert); err == nil {
				pool := x509.NewCertPool()
				pool.AppendCertsFromPEM(pem)
				hc.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
			}
		}
		resp, err := hc.Get(s.addr + "/v1/sys/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-s.exited:
			return fmt.Errorf("vault dev server exited during start-up: %s", s.logTail())
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("vault dev server not healthy after %v: %s", limit, s.logTail())
		}
	}
}

func (s *devServer) logTail() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "vault.log"))
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

func (s *devServer) stop() {
	s.cmd.Process.Kill()
	<-s.exited
	os.RemoveAll(s.dir)
}

func freePortPair() (int, error) {
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+1))
		l.Close()
		if err == nil {
			l2.Close()
			return port, nil
		}
	}
	return 0, errors.New("no free pair of loopback ports")
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// newTransitKey creates a fresh transit key on s and returns its name.
func newTransitKey(t testing.TB, s *devServer, mount string, params map[string]any) string {
	t.Helper()
	name := "k-" + randHex(8)
	if _, err := s.root.Logical().WriteWithContext(context.Background(), mount+"/keys/"+name, params); err != nil {
		t.Fatalf("create transit key: %v", err)
	}
	return name
}
