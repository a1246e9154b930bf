// Package vaultserver starts throwaway dev-mode Vault servers: the real
// vault binary (found with internal/testbin, built by `make deps`), in
// memory, on a free loopback port, with a random root token passed through
// the environment rather than argv, and a throwaway HOME. It is the one
// Vault launcher behind provider/vault's tests, the fleet soak test
// (internal/soak) and the benchmarks (bench/).
package vaultserver

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
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/internal/testbin"
)

// StartTimeout bounds how long one start attempt waits for the server to
// answer, whatever the caller's context allows.
const StartTimeout = 60 * time.Second

// Options says how to start a server.
type Options struct {
	// TLS serves HTTPS only (-dev-tls), with a CA and a certificate for
	// 127.0.0.1 that Vault generates into the server's directory:
	// Server.CACert names the CA's certificate, and Server.Root trusts it.
	TLS bool
}

// Server is a running dev-mode Vault.
type Server struct {
	Addr   string      // http://127.0.0.1:<port>, https:// with Options.TLS
	Token  string      // the root token
	CACert string      // with Options.TLS: the CA certificate's PEM file; else ""
	Root   *api.Client // a client holding the root token (and trusting CACert)

	cmd    *exec.Cmd
	dir    string
	exited chan struct{}
}

// Start starts `vault server -dev` and waits until sys/health answers 200.
// A port lost to a race with another process is retried on another one.
// ctx bounds the start-up only: once Start returns, the server runs until
// Stop. The server is killed if the calling process dies (Linux), so a
// crashed test leaves none behind; call Stop when done.
func Start(ctx context.Context, opts Options) (*Server, error) {
	bin, err := testbin.Find("vault")
	if err != nil {
		return nil, err
	}
	var last error
	for range 3 {
		s, err := start(ctx, bin, opts)
		if err == nil {
			return s, nil
		}
		if ctx.Err() != nil {
			return nil, err
		}
		last = err
	}
	return nil, last
}

func start(ctx context.Context, bin string, opts Options) (*Server, error) {
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
	args := []string{"server", "-dev", "-dev-no-store-token", "-log-level=warn"}
	if opts.TLS {
		s.Addr = "https://127.0.0.1:" + strconv.Itoa(port)
		s.CACert = filepath.Join(dir, "vault-ca.pem")
		args = append(args, "-dev-tls", "-dev-tls-cert-dir="+dir)
	}
	s.cmd = exec.Command(bin, args...)
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
	if err := s.waitHealthy(ctx); err != nil {
		s.Stop()
		return nil, err
	}
	cfg := api.DefaultConfig()
	cfg.Address = s.Addr
	if opts.TLS {
		err = cfg.ConfigureTLS(&api.TLSConfig{CACert: s.CACert})
	}
	if err == nil {
		s.Root, err = api.NewClient(cfg)
	}
	if err != nil {
		s.Stop()
		return nil, fmt.Errorf("vaultserver: client: %w", err)
	}
	s.Root.SetToken(s.Token)
	return s, nil
}

// waitHealthy polls sys/health until it answers 200, the process exits,
// ctx is done or StartTimeout passes.
func (s *Server) waitHealthy(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, StartTimeout)
	defer cancel()
	hc := &http.Client{Timeout: 2 * time.Second}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		// Checked before each poll, so a done ctx always wins over a
		// server that happens to answer.
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("vaultserver: vault not healthy: %w: %s", err, s.LogTail())
		}
		if s.CACert != "" && hc.Transport == nil {
			// The server writes its CA before it listens.
			if pem, err := os.ReadFile(s.CACert); err == nil {
				pool := x509.NewCertPool()
				pool.AppendCertsFromPEM(pem)
				hc.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
			}
		}
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
		case <-ctx.Done(): // reported at the top of the loop
		case <-tick.C:
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

// PID is the Vault server process's id (benchmarks read its CPU time).
func (s *Server) PID() int { return s.cmd.Process.Pid }

// Stop kills the server, waits for it and removes its directory (with
// Options.TLS, the generated CA, certificate and key too). It is safe to
// call on a nil Server, and more than once.
func (s *Server) Stop() {
	if s == nil {
		return
	}
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
