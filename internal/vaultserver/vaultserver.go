// Package vaultserver starts a throwaway dev-mode Vault server for tests:
// the real vault binary (found with internal/testbin, built by `make
// deps`), in memory, on a free loopback port, with a random root token
// passed through the environment rather than argv, and a throwaway HOME.
// Tests that need Vault from another package than provider/vault (the
// fleet soak test, say) start one with Start and stop it with Stop.
package vaultserver

import (
	"crypto/rand"
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
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/internal/testbin"
)

// StartTimeout bounds how long Start waits for the server to answer.
const StartTimeout = 60 * time.Second

// Server is a running dev-mode Vault.
type Server struct {
	Addr  string      // http://127.0.0.1:<port>
	Token string      // the root token
	Root  *api.Client // a client holding the root token

	cmd    *exec.Cmd
	dir    string
	exited chan struct{}
}

// Start starts `vault server -dev` and waits until sys/health answers 200.
// A port lost to a race with another process is retried on another one.
// The server is killed if the calling process dies (Linux), so a crashed
// test leaves none behind; call Stop when done.
func Start() (*Server, error) {
	bin, err := testbin.Find("vault")
	if err != nil {
		return nil, err
	}
	var last error
	for range 3 {
		s, err := start(bin)
		if err == nil {
			return s, nil
		}
		last = err
	}
	return nil, last
}

func start(bin string) (*Server, error) {
	// Dev mode also listens on port+1 (cluster): ask for a port whose
	// successor is free as well.
	port, err := freePortPair()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "keybroker-vault-")
	if err != nil {
		return nil, fmt.Errorf("vaultserver: %w", err)
	}
	token := make([]byte, 16)
	rand.Read(token)
	s := &Server{Addr: "http://127.0.0.1:" + strconv.Itoa(port), Token: "root-" + hex.EncodeToString(token), dir: dir, exited: make(chan struct{})}
	logf, err := os.Create(filepath.Join(dir, "vault.log"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("vaultserver: %w", err)
	}
	defer logf.Close()
	s.cmd = exec.Command(bin, "server", "-dev", "-dev-no-store-token", "-log-level=warn")
	s.cmd.Env = []string{
		"HOME=" + dir,
		"PATH=" + os.Getenv("PATH"),
		"VAULT_DEV_ROOT_TOKEN_ID=" + s.Token,
		"VAULT_DEV_LISTEN_ADDRESS=127.0.0.1:" + strconv.Itoa(port),
	}
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	testbin.KillWithParent(s.cmd)
	if err := s.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("vaultserver: start %s: %w", bin, err)
	}
	go func() { s.cmd.Wait(); close(s.exited) }()
	if err := s.waitHealthy(); err != nil {
		s.Stop()
		return nil, err
	}
	cfg := api.DefaultConfig()
	cfg.Address = s.Addr
	if s.Root, err = api.NewClient(cfg); err != nil {
		s.Stop()
		return nil, fmt.Errorf("vaultserver: client: %w", err)
	}
	s.Root.SetToken(s.Token)
	return s, nil
}

// waitHealthy polls sys/health until it answers 200, the process exits,
// or StartTimeout passes.
func (s *Server) waitHealthy() error {
	deadline := time.Now().Add(StartTimeout)
	hc := &http.Client{Timeout: 2 * time.Second}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		resp, err := hc.Get(s.Addr + "/v1/sys/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-s.exited:
			return fmt.Errorf("vaultserver: vault exited during start-up: %s", s.LogTail())
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("vaultserver: vault not healthy after %v: %s", StartTimeout, s.LogTail())
		}
	}
}

// LogTail returns the end of the server's log (warnings and errors; dev
// mode logs no token at that level).
func (s *Server) LogTail() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "vault.log"))
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

// Stop kills the server, waits for it and removes its directory.
func (s *Server) Stop() {
	s.cmd.Process.Kill()
	<-s.exited
	os.RemoveAll(s.dir)
}

func freePortPair() (int, error) {
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("vaultserver: %w", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+1))
		l.Close()
		if err == nil {
			l2.Close()
			return port, nil
		}
	}
	return 0, errors.New("vaultserver: no free pair of loopback ports")
}
