package server

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/health"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

func TestMain(m *testing.M) {
	if os.Getenv(loadgenEnv) != "" { // BenchmarkServerCPU's load generator, a process of its own
		os.Exit(loadgen())
	}
	os.Exit(pgtest.Main(m))
}

// syncBuffer collects the server's log output for the leak checks.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// env is a Server on a fresh database behind an httptest server.
type env struct {
	t      testing.TB
	store  *pgstore.Store
	tokens *Tokens
	srv    *Server
	http   *httptest.Server
	logs   *syncBuffer
}

func newEnv(t testing.TB, mod func(*Config)) *env {
	t.Helper()
	return newEnvPool(t, pgtest.Pool(t), mod)
}

// newEnvConns is newEnv with a pool of conns connections (pgxpool's
// default is 4 on this machine): tests that hold the access log's
// statements on a lock need more for the requests around them.
func newEnvConns(t testing.TB, conns int32, mod func(*Config)) *env {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = conns
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return newEnvPool(t, pool, mod)
}

func newEnvPool(t testing.TB, pool *pgxpool.Pool, mod func(*Config)) *env {
	t.Helper()
	ctx := context.Background()
	if err := pgstore.Migrate(ctx, pool, ""); err != nil {
		t.Fatal(err)
	}
	kek, err := local.Generate("server-test")
	if err != nil {
		t.Fatal(err)
	}
	st, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek, Actor: "server-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	checker, err := health.New(health.Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	cfg := Config{Store: st, Pool: pool, Ready: checker, Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() }) // after the HTTP server's Close (cleanups run last first)
	tokens, err := NewTokens(pool, "")
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	return &env{t: t, store: st, tokens: tokens, srv: srv, http: hs, logs: logs}
}

func (e *env) token(projects []string, ops ...Op) string {
	e.t.Helper()
	tok, _, err := e.tokens.Create(context.Background(), TokenSpec{Name: "test", Projects: projects, Ops: ops, TTL: time.Hour})
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

// do sends a request and returns the status and body.
func (e *env) do(method, path, token string, body any) (int, []byte) {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = bytes.NewReader([]byte(b))
	case []byte:
		rd = bytes.NewReader(b)
	default:
		raw, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, e.http.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := e.http.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.StatusCode, raw
}
