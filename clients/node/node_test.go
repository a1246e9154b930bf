// Package node_test runs the Node client's node:test suite against a real
// `keybroker serve` on a real PostgreSQL (internal/pgtest), and checks the
// server's graceful shutdown and that its log holds no token or value.
package node_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/internal/meshhook"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/internal/testbin"
)

var keybrokerBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "keybroker-node-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	keybrokerBin = filepath.Join(dir, "keybroker")
	cmd := exec.Command("go", "build", "-ldflags=-s -w", "-o", keybrokerBin, "github.com/profullstack/keybroker/cmd/keybroker")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	code := 1
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "go build ./cmd/keybroker:", err)
	} else {
		code = pgtest.Main(m)
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// server is a running `keybroker serve`.
type server struct {
	url    string
	dbURL  string // the database serve uses (superuser)
	cmd    *exec.Cmd
	env    []string
	mu     sync.Mutex
	stderr strings.Builder
	events chan string // stderr lines
	done   chan error
}

func (s *server) logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stderr.String()
}

// cli runs a keybroker command against the test database and returns stdout.
func cli(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command(keybrokerBin, args...)
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("keybroker %s: %v\n%s", args[0], err, stderr)
	}
	return string(out)
}

func token(t *testing.T, env []string, args ...string) (tok, id string) {
	t.Helper()
	var res struct {
		Token string `json:"token"`
		ID    string `json:"id"`
	}
	out := cli(t, env, append([]string{"token", "create", "--json"}, args...)...)
	if err := json.Unmarshal([]byte(out), &res); err != nil || !strings.HasPrefix(res.Token, "kbt_") {
		t.Fatalf("token create: %v %q", err, out)
	}
	return res.Token, res.ID
}

// start sets up a database and keyring, migrates, and starts serve on a
// free loopback port.
func start(t *testing.T) *server { t.Helper(); return startWith(t, nil) }

// startWith is start, running setup with the CLI's environment after the
// migration and before serve starts.
func startWith(t *testing.T, setup func(env []string)) *server {
	t.Helper()
	dbURL := pgtest.NewDatabase(t)
	keyring := filepath.Join(t.TempDir(), "keyring.json")
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "KEYBROKER_") && !strings.HasPrefix(kv, "VAULT_") {
			env = append(env, kv)
		}
	}
	env = append(env, "KEYBROKER_DATABASE_URL="+dbURL, "KEYBROKER_KEK=local://"+keyring, "KEYBROKER_LOG_FORMAT=json")
	cli(t, env, "keygen", keyring, "--id", "node-test")
	cli(t, env, "migrate")
	if setup != nil {
		setup(env)
	}
	s := &server{dbURL: dbURL, env: env, events: make(chan string, 1000), done: make(chan error, 1)}
	s.cmd = exec.Command(keybrokerBin, "serve", "--listen", "127.0.0.1:0", "--token-recheck", "-1ns", "--log-level", "info")
	s.cmd.Env = env
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := s.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if s.cmd.ProcessState == nil {
			s.cmd.Process.Kill()
			<-s.done
		}
	})
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			s.mu.Lock()
			s.stderr.WriteString(sc.Text() + "\n")
			s.mu.Unlock()
			select {
			case s.events <- sc.Text():
			default:
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("serve printed no address: %v\n%s", err, s.logs())
	}
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "listening on ")
	if !ok {
		t.Fatalf("serve: %q", line)
	}
	s.url = addr
	go func() { io.Copy(io.Discard, stdout); s.done <- s.cmd.Wait() }()
	return s
}

// stop sends SIGTERM and waits for a clean exit.
func (s *server) stop(t *testing.T) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-s.done; err != nil {
		t.Fatalf("serve after SIGTERM: %v\n%s", err, s.logs())
	}
}

func TestNodeClient(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("node not found: run `make deps` (scripts/deps.sh installs nodejs): %v", err)
	}
	psql, err := testbin.Find("psql")
	if err != nil {
		t.Fatalf("psql (PostgreSQL's client, installed with the server by `make deps`): %v", err)
	}
	s := start(t)
	// MeshHook's own tables, verbatim, in schema meshhook of the same
	// database: the node:test suite inserts sealed values into its secrets
	// table in its own transactions through psql (no Node driver here).
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, s.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	err = meshhook.CreateSchema(ctx, conn, "meshhook")
	conn.Close(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mhProject := uuid()
	rw, _ := token(t, s.env, "--name", "meshhook-api", "--ops", "read,write,seal,open", "--project", "p1", "--project", "p2", "--project", "p3",
		"--project", mhProject)
	admin, _ := token(t, s.env, "--name", "meshhook-admin", "--ops", "admin", "--project", "p3")
	ro, _ := token(t, s.env, "--name", "meshhook-reader", "--ops", "read", "--project", "p1")
	revoked, revokedID := token(t, s.env, "--name", "old", "--ops", "read")
	cli(t, s.env, "token", "revoke", revokedID)
	const marker = "nodetest-VALUE-7f3a"
	cmd := exec.Command(node, "--test", "test/")
	cmd.Env = append(os.Environ(), "KEYBROKER_URL="+s.url, "KEYBROKER_TOKEN_RW="+rw, "KEYBROKER_TOKEN_RO="+ro,
		"KEYBROKER_TOKEN_REVOKED="+revoked, "KEYBROKER_TOKEN_ADMIN="+admin, "KEYBROKER_VALUE_MARKER="+marker,
		"KEYBROKER_PSQL="+psql, "MESHHOOK_DATABASE_URL="+s.dbURL, "MESHHOOK_SCHEMA=meshhook", "MESHHOOK_PROJECT_ID="+mhProject)
	out, err := cmd.CombinedOutput()
	t.Logf("node --test:\n%s", out)
	if err != nil {
		t.Fatalf("node --test: %v", err)
	}
	if !strings.Contains(string(out), "# fail 0") || strings.Contains(string(out), "# pass 0") {
		t.Fatalf("node --test did not pass its tests")
	}
	// The metrics carry no project, name, value or token.
	resp, err := http.Get(s.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(metrics), "keybroker_http_requests") {
		t.Fatalf("no request metrics:\n%.2000s", metrics)
	}
	s.stop(t)
	logs := s.logs()
	if !strings.Contains(logs, `"msg":"request"`) {
		t.Fatalf("no request log lines:\n%s", logs)
	}
	for what, text := range map[string]string{"log": logs, "metrics": string(metrics)} {
		for _, secret := range []string{marker, rw[4:], ro[4:], revoked[4:], admin[4:], "p1", mhProject, "wf/secret", "stripe"} {
			if what == "log" && (secret == "p1" || secret == mhProject || secret == "wf/secret" || secret == "stripe") {
				continue // the log may name projects and secrets (not values); metrics may not
			}
			if strings.Contains(text, secret) {
				t.Errorf("%s holds %q", what, secret)
			}
		}
	}
}

// serve without --client-ca warns once, at start, that the tokens bound to
// a client certificate cannot be used (they would get 401 from every
// connection); revoked ones are not counted.
func TestServeWarnsOfBoundTokensWithoutClientCA(t *testing.T) {
	certFile := filepath.Join(t.TempDir(), "client.crt")
	if err := os.WriteFile(certFile, []byte(testClientCert), 0o600); err != nil {
		t.Fatal(err)
	}
	s := startWith(t, func(env []string) {
		token(t, env, "--name", "bound", "--ops", "read", "--client-cert", certFile)
		token(t, env, "--name", "unbound", "--ops", "read")
		_, id := token(t, env, "--name", "bound-revoked", "--ops", "read", "--client-cert", certFile)
		cli(t, env, "token", "revoke", id)
	})
	s.stop(t)
	logs := s.logs()
	if !strings.Contains(logs, `"msg":"tokens bound to a client certificate are refused (401) without --client-ca","tokens":1`) {
		t.Fatalf("no warning about 1 bound token:\n%s", logs)
	}
}

// testClientCert is a self-signed client certificate (no key needed: a
// token is bound to the certificate's fingerprint).
const testClientCert = `-----BEGIN CERTIFICATE-----
MIIBSjCB8KADAgECAgEHMAoGCCqGSM49BAMCMBoxGDAWBgNVBAMTD21lc2hob29r
LXdvcmtlcjAeFw0yNjAxMDEwMDAwMDBaFw0zNjAxMDEwMDAwMDBaMBoxGDAWBgNV
BAMTD21lc2hob29rLXdvcmtlcjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABH1z
BseQ3diyw65eNmB+zL4fp2fMaRLH4d/Vdlz27NSGPZzchODKh0WeGRL9PAhhooM1
6oBlmLdUouNp81onQtqjJzAlMA4GA1UdDwEB/wQEAwIHgDATBgNVHSUEDDAKBggr
BgEFBQcDAjAKBggqhkjOPQQDAgNJADBGAiEAmggvM1TIIRFt2EhlJ3it2I06pVWH
GbU03hbgvD5sI2cCIQDIgk1KAEX1FFM6NVWEgQwNzz3YXnKOQiR8SIuHMxVPDg==
-----END CERTIFICATE-----
`

// uuid returns a random (version 4) UUID, as MeshHook's project ids are.
func uuid() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// SIGTERM while a request is in flight: the request completes (its write
// commits and is answered), then the server exits 0.
func TestGracefulShutdown(t *testing.T) {
	s := start(t)
	tok, _ := token(t, s.env, "--name", "w", "--ops", "read,write")
	conn, err := net.Dial("tcp", strings.TrimPrefix(s.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	body := `{"value":"aW4tZmxpZ2h0"}` // "in-flight"
	// Expect: 100-continue makes the server say when the handler starts
	// reading the body: from then on the request is in flight.
	fmt.Fprintf(conn, "PUT /v1/projects/p/secrets/s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n",
		tok, len(body))
	br := bufio.NewReader(conn)
	cont, err := http.ReadResponse(br, nil)
	if err != nil || cont.StatusCode != http.StatusContinue {
		t.Fatalf("want 100 Continue: %v %v", cont, err)
	}
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for line := range s.events {
		if strings.Contains(line, "shutting down") {
			break
		}
	}
	// The server is shutting down; the request's body arrives only now.
	if _, err := io.WriteString(conn, body); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("in-flight request: %v\n%s", err, s.logs())
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("in-flight put: %d", resp.StatusCode)
	}
	if err := <-s.done; err != nil {
		t.Fatalf("serve after SIGTERM: %v\n%s", err, s.logs())
	}
	// The write committed: read it back with the CLI.
	if got := cli(t, s.env, "get", "p", "s"); got != "in-flight" {
		t.Fatalf("after shutdown: %q", got)
	}
}
