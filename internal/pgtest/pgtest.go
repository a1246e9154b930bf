// Package pgtest gives tests a fresh PostgreSQL database on a real server.
//
// The server is the one KEYBROKER_TEST_DATABASE_URL names (a superuser URL,
// as scripts/test.sh exports). When the variable is unset, Main starts a
// throwaway server from the PostgreSQL binaries in
// /usr/lib/postgresql/*/bin (the logic of scripts/pg.sh) and removes it when
// the package's tests end, so `go test ./pkg/` works on its own. Tests never
// skip: a missing server or binary is a test failure naming `make deps`.
//
// Use it from a package's TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
//
// then NewDatabase or Pool in each test that needs a database.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// EnvURL is the environment variable naming the superuser URL of the test
// server.
const EnvURL = "KEYBROKER_TEST_DATABASE_URL"

var (
	mu       sync.Mutex
	mainRan  bool
	adminURL string
	server   *Server
)

// Main runs the package's tests. If EnvURL is unset it first starts a
// throwaway server (stopped and removed after the tests), and exports its URL
// in EnvURL so subprocesses started by the tests reach it too. It returns the
// exit code for os.Exit.
func Main(m *testing.M) int {
	mu.Lock()
	mainRan = true
	adminURL = os.Getenv(EnvURL)
	if adminURL == "" {
		s, err := StartServer(context.Background())
		if err != nil {
			mu.Unlock()
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		server, adminURL = s, s.URL
		os.Setenv(EnvURL, s.URL)
	}
	mu.Unlock()
	code := m.Run()
	if server != nil {
		if err := server.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			if code == 0 {
				code = 1
			}
		}
	}
	return code
}

// AdminURL returns the superuser URL of the test server. It fails t when
// neither EnvURL is set nor Main started a server.
func AdminURL(t testing.TB) string {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if adminURL == "" {
		adminURL = os.Getenv(EnvURL)
	}
	if adminURL == "" {
		if !mainRan {
			t.Fatalf("pgtest: %s is unset and the package's TestMain does not call pgtest.Main to start a server", EnvURL)
		}
		t.Fatalf("pgtest: no test server")
	}
	return adminURL
}

// NewDatabase creates an empty database named kb_<random> on the test server
// and returns a superuser URL for it. The database is dropped (terminating
// its remaining connections) when t ends.
func NewDatabase(t testing.TB) string {
	t.Helper()
	admin := AdminURL(t)
	name := "kb_" + randomHex(t, 8)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatalf("pgtest: connect to test server: %v", errRedacted(err))
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		conn, err := pgx.Connect(ctx, admin)
		if err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, errRedacted(err))
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})
	u, err := WithDatabase(admin, name)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// Pool returns a pool connected to a fresh database (NewDatabase), closed
// when t ends.
func Pool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	return PoolFor(t, NewDatabase(t))
}

// PoolFor returns a pool for dbURL, closed when t ends.
func PoolFor(t testing.TB, dbURL string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), dbURL)
	if err != nil {
		t.Fatalf("pgtest: pool: %v", errRedacted(err))
	}
	t.Cleanup(pool.Close)
	if err := pool.Ping(context.Background()); err != nil {
		t.Fatalf("pgtest: ping: %v", errRedacted(err))
	}
	return pool
}

// NewRole creates a LOGIN role that is neither superuser nor table owner
// (so row-level security applies to it), with a random name and password,
// and returns its name and a URL connecting as it to the database dbURL
// names. The role, and everything it owns or was granted in that database,
// is dropped when t ends; call NewRole after NewDatabase so that happens
// before the database is dropped.
func NewRole(t testing.TB, dbURL string) (name, roleURL string) {
	t.Helper()
	name = "kb_role_" + randomHex(t, 6)
	pw := randomHex(t, 16)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", errRedacted(err))
	}
	defer conn.Close(ctx)
	ident := pgx.Identifier{name}.Sanitize()
	// CREATE ROLE takes no parameters; pw is hex, so quoting is safe.
	if _, err := conn.Exec(ctx, "CREATE ROLE "+ident+" LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '"+pw+"'"); err != nil {
		t.Fatalf("pgtest: create role: %v", err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		conn, err := pgx.Connect(ctx, dbURL)
		if err != nil {
			t.Errorf("pgtest: drop role: %v", errRedacted(err))
			return
		}
		defer conn.Close(ctx)
		// Sessions of the role may outlive the test's pools by a moment.
		_, _ = conn.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name)
		if _, err := conn.Exec(ctx, "DROP OWNED BY "+ident); err != nil {
			t.Errorf("pgtest: drop owned by role: %v", err)
		}
		if _, err := conn.Exec(ctx, "DROP ROLE "+ident); err != nil {
			t.Errorf("pgtest: drop role: %v", err)
		}
	})
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatalf("pgtest: parse database URL: %v", errRedacted(err))
	}
	u.User = url.UserPassword(name, pw)
	return name, u.String()
}

// WithDatabase returns rawURL with its database replaced by name.
func WithDatabase(rawURL, name string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", fmt.Errorf("pgtest: parse %s: %v", EnvURL, errRedacted(err))
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return "", fmt.Errorf("pgtest: %s must be a postgres:// URL", EnvURL)
	}
	u.Path = "/" + name
	return u.String(), nil
}

// Server is a throwaway PostgreSQL server.
type Server struct {
	URL    string // superuser URL of the postgres database
	dir    string
	bindir string
}

// StartServer initialises a cluster in a new temporary directory and starts
// it on a free loopback port with durability off (fsync, synchronous commit
// and full-page writes), for speed. As root it runs initdb and the server as
// the postgres user, since initdb refuses root.
func StartServer(ctx context.Context) (*Server, error) {
	bindir, err := findBindir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "keybroker-pg-")
	if err != nil {
		return nil, fmt.Errorf("pgtest: %v", err)
	}
	s := &Server{dir: dir, bindir: bindir}
	asRoot := os.Geteuid() == 0
	if asRoot {
		pg, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("pgtest: running as root needs a postgres user to run the server: %v", err)
		}
		uid, _ := strconv.Atoi(pg.Uid)
		gid, _ := strconv.Atoi(pg.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("pgtest: %v", err)
		}
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	data := filepath.Join(dir, "data")
	if out, err := s.run(ctx, "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pgtest: initdb: %v: %s", err, out)
	}
	opts := fmt.Sprintf("-c listen_addresses=127.0.0.1 -p %d -k %s -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200", port, dir)
	if out, err := s.run(ctx, "pg_ctl", "-D", data, "-l", filepath.Join(dir, "server.log"), "-w", "-t", "60", "-o", opts, "start"); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "server.log"))
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pgtest: pg_ctl start: %v: %s %s", err, out, log)
	}
	s.URL = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	return s, nil
}

// Stop stops the server immediately and removes its directory.
func (s *Server) Stop() error {
	_, err := s.run(context.Background(), "pg_ctl", "-D", filepath.Join(s.dir, "data"), "-m", "immediate", "stop")
	if rmErr := os.RemoveAll(s.dir); err == nil && rmErr != nil {
		err = rmErr
	}
	if err != nil {
		return fmt.Errorf("pgtest: stop server: %v", err)
	}
	return nil
}

func (s *Server) run(ctx context.Context, prog string, args ...string) ([]byte, error) {
	path := filepath.Join(s.bindir, prog)
	var cmd *exec.Cmd
	if os.Geteuid() == 0 {
		cmd = exec.CommandContext(ctx, "runuser", append([]string{"-u", "postgres", "--", path}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, path, args...)
	}
	// pg_ctl's server keeps the inherited descriptors open; a file, not a
	// pipe, keeps CombinedOutput from waiting for the server to exit.
	out, err := os.CreateTemp("", "keybroker-pg-out-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(out.Name())
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	err = cmd.Run()
	b, _ := os.ReadFile(out.Name())
	return b, err
}

func findBindir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i], nil
		}
	}
	return "", errors.New("pgtest: no PostgreSQL server binaries in /usr/lib/postgresql/*/bin and " + EnvURL + " is unset: run `make deps` (scripts/deps.sh)")
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pgtest: find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func randomHex(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return hex.EncodeToString(b)
}

// errRedacted drops the text of URL parse errors, which may quote the URL
// (and so a password) when it is malformed.
func errRedacted(err error) error {
	var pe *pgconn.ParseConfigError
	if errors.As(err, &pe) {
		return errors.New("cannot parse database URL")
	}
	return err
}
