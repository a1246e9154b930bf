// Package pgtest gives tests a fresh PostgreSQL database on a real server.
//
// The server is the one KEYBROKER_TEST_DATABASE_URL names (a superuser URL,
// as scripts/test.sh exports). When the variable is unset, Main starts a
// throwaway server (internal/pgserver) and removes it when the package's
// tests end, so `go test ./pkg/` works on its own. Tests never skip: a
// missing server or binary is a test failure naming `make deps`.
//
// Use it from a package's TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
//
// then NewDatabase or Pool in each test that needs a database, and
// PoolerURL for a database reached through PgBouncer in transaction mode.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgserver"
)

// EnvURL is the environment variable naming the superuser URL of the test
// server.
const EnvURL = "KEYBROKER_TEST_DATABASE_URL"

// EnvPooler is the environment variable that, set to "pgbouncer", makes
// Pooled report true: tests that support it then send their traffic
// through PoolerURL (scripts/test.sh's second pass over pgstore).
const EnvPooler = "KEYBROKER_TEST_POOLER"

var (
	mu       sync.Mutex
	mainRan  bool
	adminURL string
	server   *pgserver.Server
	bouncer  *pgserver.Bouncer
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
		s, err := pgserver.Start(context.Background(), pgserver.Options{TCP: true})
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
	for _, stop := range []func() error{stopBouncer, stopServer} {
		if err := stop(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			if code == 0 {
				code = 1
			}
		}
	}
	return code
}

func stopBouncer() error {
	if bouncer == nil {
		return nil
	}
	return bouncer.Stop()
}

func stopServer() error {
	if server == nil {
		return nil
	}
	return server.Stop()
}

// Pooled reports whether EnvPooler asks for traffic through PoolerURL.
func Pooled() bool { return os.Getenv(EnvPooler) == "pgbouncer" }

// PoolerURL returns dbURL, a superuser URL of a database on the test server
// (NewDatabase's), rewritten to reach it through a PgBouncer in transaction
// mode with two server connections per database
// (pgserver.StartBouncer). The bouncer is started on first use and stopped
// when Main's tests end. It lets in only the test server's superuser, so
// NewRole's roles cannot connect through it.
func PoolerURL(t testing.TB, dbURL string) string {
	t.Helper()
	admin := AdminURL(t)
	mu.Lock()
	defer mu.Unlock()
	if bouncer == nil {
		if !mainRan {
			t.Fatal("pgtest: PoolerURL needs the package's TestMain to call pgtest.Main, which stops the bouncer")
		}
		b, err := pgserver.StartBouncer(context.Background(), admin, pgserver.BouncerOptions{})
		if err != nil {
			t.Fatal(err)
		}
		bouncer = b
	}
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatalf("pgtest: parse database URL: %v", errRedacted(err))
	}
	pooled, err := WithDatabase(bouncer.URL, strings.TrimPrefix(u.Path, "/"))
	if err != nil {
		t.Fatal(err)
	}
	return pooled
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

// TenantGrants is the SQL granting role (already quoted) what a
// tenant-facing service needs on keybroker's default schema: the list
// pgstore's package documentation gives under "Row-level security", plus
// SELECT on pgcolumn's registry. One copy, so every test's tenant is the
// documented one.
func TenantGrants(role string) string {
	return `GRANT USAGE ON SCHEMA keybroker TO ` + role + `;
GRANT SELECT ON keybroker.schema_version, keybroker.kek, keybroker.project_keks, keybroker.tenant_chains, keybroker.columns TO ` + role + `;
GRANT SELECT, INSERT ON keybroker.key_events TO ` + role + `;
GRANT SELECT, INSERT, UPDATE, DELETE ON keybroker.data_keys, keybroker.encrypted_secrets TO ` + role + `;
GRANT EXECUTE ON FUNCTION keybroker.record_kek(text, text, text, text) TO ` + role + `;
GRANT SELECT ON keybroker.intermediate_keys TO ` + role + `;
GRANT EXECUTE ON FUNCTION keybroker.add_intermediate_key(text, integer, bigint, bytea, text) TO ` + role
}
