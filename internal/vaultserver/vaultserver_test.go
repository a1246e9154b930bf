package vaultserver

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// TestStart: a plain server answers its root client over HTTP, its token is
// not on its command line, and Stop removes its directory (twice is fine).
func TestStart(t *testing.T) {
	s, err := Start(t.Context(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if !strings.HasPrefix(s.Addr, "http://127.0.0.1:") || s.CACert != "" {
		t.Fatalf("Addr %q, CACert %q", s.Addr, s.CACert)
	}
	self, err := s.Root.Auth().Token().LookupSelf()
	if err != nil {
		t.Fatal(err)
	}
	if id, _ := self.TokenID(); id != s.Token {
		t.Fatal("the root client does not hold the root token")
	}
	if runtime.GOOS == "linux" {
		argv, err := os.ReadFile("/proc/" + strconv.Itoa(s.cmd.Process.Pid) + "/cmdline")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(argv), s.Token) {
			t.Fatal("the root token is on vault's command line")
		}
	}
	s.Stop()
	if _, err := os.Stat(s.dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("directory after Stop: %v", err)
	}
	s.Stop()
}

// TestStartTLS: with Options.TLS the server speaks HTTPS only, under a CA
// that CACert holds and the root client trusts, and that nothing else does;
// Stop removes the generated key with the directory.
func TestStartTLS(t *testing.T) {
	s, err := Start(t.Context(), Options{TLS: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if !strings.HasPrefix(s.Addr, "https://127.0.0.1:") {
		t.Fatalf("Addr %q", s.Addr)
	}
	b, err := os.ReadFile(s.CACert)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("CACert %s holds no PEM block", s.CACert)
	}
	ca, err := x509.ParseCertificate(block.Bytes)
	if err != nil || !ca.IsCA {
		t.Fatalf("CACert is not a CA certificate: %v", err)
	}
	if _, err := s.Root.Sys().Health(); err != nil {
		t.Fatalf("root client over TLS: %v", err)
	}
	resp, err := http.Get(s.Addr + "/v1/sys/health")
	if err == nil {
		resp.Body.Close()
	}
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &unknown) {
		t.Fatalf("a client without the CA: %v, want an unknown-authority error", err)
	}
	s.Stop()
	if _, err := os.Stat(s.dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("directory after Stop: %v", err)
	}
}

// TestStartCancelled: a done context fails Start with the context's error,
// and the directory it made is gone.
func TestStartCancelled(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	s, err := Start(ctx, Options{})
	if err == nil {
		s.Stop()
		t.Fatal("Start with a cancelled context succeeded")
	}
	if !errors.Is(err, context.Canceled) || !strings.HasPrefix(err.Error(), "vaultserver: ") {
		t.Fatalf("Start with a cancelled context: %v", err)
	}
	left, err := os.ReadDir(tmp)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Fatalf("Start left %d entries in TMPDIR, first %s", len(left), left[0].Name())
	}
}
