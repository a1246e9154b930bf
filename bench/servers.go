package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/profullstack/keybroker/internal/pgserver"
	"github.com/profullstack/keybroker/internal/testbin"
)

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

// Process is a server started for the benchmarks (local-kms; Vault comes
// from internal/vaultserver). Stop kills it and removes its directory.
type Process struct {
	Addr   string // http://127.0.0.1:<port>
	cmd    *exec.Cmd
	dir    string
	log    *syncBuffer
	exited chan struct{}
}

// Stop kills the process, waits for it and removes its directory.
func (p *Process) Stop() {
	if p == nil {
		return
	}
	p.cmd.Process.Kill()
	<-p.exited
	os.RemoveAll(p.dir)
}

func (p *Process) logTail() string {
	b := p.log.Bytes()
	if len(b) > 1500 {
		b = b[len(b)-1500:]
	}
	return strings.TrimSpace(string(b))
}

// syncBuffer collects a process's output, written by exec's copier while
// logTail may read it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

func start(cmd *exec.Cmd, dir string) (*Process, error) {
	p := &Process{cmd: cmd, dir: dir, log: &syncBuffer{}, exited: make(chan struct{})}
	if cmd.Stdout == nil {
		cmd.Stdout, cmd.Stderr = p.log, p.log
	}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("bench: start %s: %w", filepath.Base(cmd.Path), err)
	}
	go func() { cmd.Wait(); close(p.exited) }()
	return p, nil
}

// StartLocalKMS starts local-kms on a port it picks (PORT=0) in region
// KMSRegion, and returns once it has logged the port.
func StartLocalKMS() (*Process, error) {
	bin, err := testbin.Find("local-kms")
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	dir, err := os.MkdirTemp("", "kbbench-kms-")
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "PORT=0", "KMS_REGION="+KMSRegion,
		"KMS_DATA_PATH="+filepath.Join(dir, "data"), "KMS_SEED_PATH="+filepath.Join(dir, "none.yaml"))
	logs, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = cmd.Stderr
	p, err := start(cmd, dir)
	if err != nil {
		return nil, err
	}
	portRE := regexp.MustCompile(`Local KMS started on [^ ]*:(\d+)`)
	sc := bufio.NewScanner(logs)
	for sc.Scan() {
		p.log.Write([]byte(sc.Text() + "\n"))
		if m := portRE.FindStringSubmatch(sc.Text()); m != nil {
			p.Addr = "http://127.0.0.1:" + m[1]
			break
		}
	}
	if p.Addr == "" {
		p.Stop()
		return nil, fmt.Errorf("bench: local-kms exited before listening: %s", p.logTail())
	}
	go io.Copy(io.Discard, logs) // keep draining so it never blocks
	return p, nil
}

// StartPostgres starts a throwaway PostgreSQL server on a free loopback
// port (internal/pgserver, the launcher the tests and `keybroker demo`
// use) and returns its superuser URL, its data directory and a function
// that stops and removes it.
func StartPostgres(ctx context.Context) (url, dataDir string, stop func(), err error) {
	s, err := pgserver.Start(ctx, pgserver.Options{TCP: true})
	if err != nil {
		return "", "", nil, fmt.Errorf("bench: %w", err)
	}
	return s.URL, s.DataDir(), func() { s.Stop() }, nil
}

// findScript looks for rel in the working directory and its parents (the
// command runs in bench/, the repository root is its parent).
func findScript(rel string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if p := filepath.Join(dir, rel); isFile(p) {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("bench: %s not found above the working directory", rel)
		}
		dir = parent
	}
}

// CountingProxy is a loopback reverse proxy that counts the requests it
// forwards: the key-service requests that really reach the server,
// whatever client library sent them.
type CountingProxy struct {
	Addr string
	n    atomic.Int64
	srv  *http.Server
}

// NewCountingProxy forwards to target (http://host:port).
func NewCountingProxy(target string) (*CountingProxy, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &CountingProxy{Addr: "http://" + l.Addr().String()}
	rp := httputil.NewSingleHostReverseProxy(u)
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.n.Add(1)
		rp.ServeHTTP(w, r)
	})}
	go p.srv.Serve(l)
	return p, nil
}

// Requests returns how many requests were forwarded so far.
func (p *CountingProxy) Requests() int64 { return p.n.Load() }

// Close stops the proxy.
func (p *CountingProxy) Close() { p.srv.Close() }

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// sleepCtx waits ms milliseconds or until ctx is done: a bounded pause
// between start-up polls of a server, never a synchronisation.
func sleepCtx(ctx context.Context, ms int) error {
	t := time.NewTimer(time.Duration(ms) * time.Millisecond)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
