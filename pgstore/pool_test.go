package pgstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

// A mode the URL names is kept; otherwise ParseConfig leaves the choice to
// its BeforeConnect hook (TestTransactionPooler, TestNewPoolDirectMode).
func TestParseConfigExecMode(t *testing.T) {
	for _, c := range []struct {
		url  string
		want pgx.QueryExecMode // 0: chosen on connect
	}{
		{"postgres://u@h/db", 0},
		{"postgres://u@h/db?pool_max_conns=3", 0},
		{"postgres://u@h/db?default_query_exec_mode=cache_statement", pgx.QueryExecModeCacheStatement},
		{"host=h user=u default_query_exec_mode=cache_describe", pgx.QueryExecModeCacheDescribe},
	} {
		cfg, err := pgstore.ParseConfig(c.url)
		if err != nil {
			t.Fatalf("%s: %v", c.url, err)
		}
		if hook := cfg.BeforeConnect != nil; hook != (c.want == 0) {
			t.Errorf("%s: BeforeConnect set: %v", c.url, hook)
		}
		if got := cfg.ConnConfig.DefaultQueryExecMode; c.want != 0 && got != c.want {
			t.Errorf("%s: mode %v, want %v", c.url, got, c.want)
		}
	}
	_, err := pgstore.ParseConfig("postgres://u:hunter2@h:notaport/db")
	if !errors.Is(err, pgstore.ErrInvalidArgument) || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("malformed URL: %v", err)
	}
}

// connMode is the exec mode of one of pool's connections.
func connMode(t *testing.T, pool *pgxpool.Pool) pgx.QueryExecMode {
	t.Helper()
	c, err := pool.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	return c.Conn().Config().DefaultQueryExecMode
}

// Direct to PostgreSQL, NewPool keeps pgx's fastest mode.
func TestNewPoolDirectMode(t *testing.T) {
	pool, err := pgstore.NewPool(context.Background(), pgtest.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if m := connMode(t, pool); m != pgx.QueryExecModeCacheStatement {
		t.Fatalf("direct: mode %v, want cache_statement", m)
	}
}

// Through PgBouncer in transaction mode, pgx's default mode
// (cache_statement) fails as soon as two client connections prepare the
// same statement on one server connection; New refuses such a pool, and a
// pool from NewPool serves concurrent Puts and Gets without an error.
func TestTransactionPooler(t *testing.T) {
	ctx := context.Background()
	u := pgtest.NewDatabase(t)
	direct := pgtest.PoolFor(t, u)
	if err := pgstore.Migrate(ctx, direct, ""); err != nil {
		t.Fatal(err)
	}
	pooled := pgtest.PoolerURL(t, u)
	kek := newKEK(t, "test")

	t.Run("pgx default mode", func(t *testing.T) {
		pool, err := pgxpool.New(ctx, pooled)
		if err != nil {
			t.Fatal(err)
		}
		defer pool.Close()
		// The database's bouncer pool is new: its one server connection
		// serves both clients in turn, and the second prepare of the
		// same statement name collides.
		a, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer a.Release()
		b, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Release()
		var n int
		if err := a.QueryRow(ctx, "SELECT $1::int", 1).Scan(&n); err != nil {
			t.Fatal(err)
		}
		err = b.QueryRow(ctx, "SELECT $1::int", 1).Scan(&n)
		if err == nil || !strings.Contains(err.Error(), "42P05") {
			t.Fatalf("second client's prepare: %v, want SQLSTATE 42P05 (is the bouncer in transaction mode?)", err)
		}
		if _, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek}); !errors.Is(err, pgstore.ErrPooler) || !strings.Contains(err.Error(), "pgstore.NewPool") {
			t.Fatalf("New on a cache_statement pool through the pooler: %v, want ErrPooler naming the fix", err)
		}
		before := snapshot(t, direct)
		if err := pgstore.Migrate(ctx, pool, "kb_other"); !errors.Is(err, pgstore.ErrPooler) {
			t.Fatalf("Migrate through the pooler: %v, want ErrPooler", err)
		}
		if n := count(t, direct, `SELECT count(*) FROM pg_namespace WHERE nspname = 'kb_other'`); n != 0 || snapshot(t, direct) != before {
			t.Fatal("Migrate through the pooler changed the database")
		}
	})

	t.Run("explicit cache_statement", func(t *testing.T) {
		// PgBouncer 1.21+ with max_prepared_statements supports it: a mode
		// the URL names is the caller's choice.
		pool, err := pgstore.NewPool(ctx, pooled+"&default_query_exec_mode=cache_statement")
		if err != nil {
			t.Fatal(err)
		}
		defer pool.Close()
		s, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek})
		if err != nil {
			t.Fatalf("New with an explicit mode: %v", err)
		}
		s.Close()
	})

	t.Run("NewPool", func(t *testing.T) {
		pool, err := pgstore.NewPool(ctx, pooled)
		if err != nil {
			t.Fatal(err)
		}
		defer pool.Close()
		if m := connMode(t, pool); m != pgstore.PoolerSafeMode {
			t.Fatalf("through the pooler: mode %v, want %v", m, pgstore.PoolerSafeMode)
		}
		s := newStore(t, pool, pgstore.Config{KEK: kek})
		const workers, each = 8, 25
		var wg sync.WaitGroup
		errs := make(chan error, workers*each)
		for w := range workers {
			wg.Go(func() {
				for i := range each {
					name, v := fmt.Sprintf("s%d-%d", w, i), []byte(fmt.Sprintf("v%d-%d", w, i))
					if err := s.Put(ctx, "p", name, v); err != nil {
						errs <- err
						continue
					}
					if got, err := s.Get(ctx, "p", name); err != nil || !bytes.Equal(got, v) {
						errs <- fmt.Errorf("get %s: %q, %v", name, got, err)
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		var failed []error
		for err := range errs {
			failed = append(failed, err)
		}
		if len(failed) > 0 {
			t.Fatalf("%d of %d Put+Get failed through the pooler, first: %v", len(failed), workers*each, failed[0])
		}
		if n := count(t, direct, `SELECT count(*) FROM keybroker.encrypted_secrets`); n != workers*each {
			t.Fatalf("%d secrets stored, want %d", n, workers*each)
		}
	})
}

// exec and simple_protocol guess parameter types from Go types and send
// the audit trail's JSON ([]byte) as bytea; New refuses them rather than
// failing at the first key rotation.
func TestNewRefusesGuessingModes(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	for _, mode := range []string{"exec", "simple_protocol"} {
		pool := pgtest.PoolFor(t, e.url+"&default_query_exec_mode="+mode)
		if _, err := pgstore.New(ctx, pool, pgstore.Config{KEK: e.kek}); !errors.Is(err, pgstore.ErrInvalidArgument) || !strings.Contains(err.Error(), mode) {
			t.Errorf("%s: %v, want ErrInvalidArgument naming the mode", mode, err)
		}
	}
}
