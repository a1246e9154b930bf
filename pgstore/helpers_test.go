package pgstore_test

import (
	"context"
	"io"
	"net"
	"net/url"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// env is a migrated database, a local KEK and a Store over them. Under
// pgtest.Pooled (scripts/test.sh's pooler pass) pool, and so the Store,
// reach the database through PgBouncer in transaction mode (pooledPool);
// url stays direct, and Migrate, which needs a direct connection, runs over
// it.
type env struct {
	url   string
	pool  *pgxpool.Pool
	kek   *local.Provider
	store *pgstore.Store
}

func newEnv(t testing.TB, cfg pgstore.Config) *env {
	t.Helper()
	ctx := context.Background()
	u := pgtest.NewDatabase(t)
	pool := pgtest.PoolFor(t, u)
	if err := pgstore.Migrate(ctx, pool, cfg.Schema); err != nil {
		t.Fatal(err)
	}
	if pgtest.Pooled() {
		pool = pooledPool(t, u)
	}
	e := &env{url: u, pool: pool}
	if cfg.KEK == nil {
		e.kek = newKEK(t, "test")
		cfg.KEK = e.kek
	}
	e.store = newStore(t, pool, cfg)
	return e
}

// pooledPool is a pool built by pgstore.NewPool that reaches the database
// dbURL names through the test PgBouncer (transaction mode), closed when t
// ends.
func pooledPool(t testing.TB, dbURL string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgstore.NewPool(context.Background(), pgtest.PoolerURL(t, dbURL))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func newKEK(t testing.TB, id string) *local.Provider {
	t.Helper()
	p, err := local.Generate(id)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func newStore(t testing.TB, pool *pgxpool.Pool, cfg pgstore.Config) *pgstore.Store {
	t.Helper()
	s, err := pgstore.New(context.Background(), pool, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func keyring(t testing.TB, primary provider.KEKProvider, others ...provider.KEKProvider) *provider.Keyring {
	t.Helper()
	kr, err := provider.NewKeyring(primary, others...)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

func count(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// snapshot returns every row of the keybroker tables as text, to check that
// a failed operation changed nothing.
func snapshot(t testing.TB, pool *pgxpool.Pool) string {
	t.Helper()
	var s string
	err := pool.QueryRow(context.Background(), `SELECT concat_ws('|',
		(SELECT string_agg(k::text, ',' ORDER BY k.id) FROM keybroker.kek k),
		(SELECT string_agg(d::text, ',' ORDER BY d.id) FROM keybroker.data_keys d),
		(SELECT string_agg(s::text, ',' ORDER BY s.project_id, s.name) FROM keybroker.encrypted_secrets s),
		(SELECT string_agg(e::text, ',' ORDER BY e.id) FROM keybroker.key_events e))`).Scan(&s)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// proxy forwards TCP connections to a database server until cut, which
// severs every connection: a lost network connection, for real.
type proxy struct {
	ln    net.Listener
	to    string
	mu    sync.Mutex
	conns []net.Conn
}

// newProxy returns a proxy to the server dbURL names and dbURL rewritten to
// go through it.
func newProxy(t testing.TB, dbURL string) (*proxy, string) {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, to: u.Host}
	t.Cleanup(p.cut)
	go p.serve()
	u.Host = ln.Addr().String()
	return p, u.String()
}

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.to)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		go func() { io.Copy(s, c); s.Close() }()
		go func() { io.Copy(c, s); c.Close() }()
	}
}

func (p *proxy) cut() {
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}
