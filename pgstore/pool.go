package pgstore

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PoolerSafeMode is the query exec mode ParseConfig's pools use through a
// connection pooler. It keeps no statement on the server between round
// trips (it caches only statement descriptions, per client connection, and
// executes through the unnamed statement, parse and execution in one round
// trip), so it works through a transaction-mode pooler (PgBouncer,
// Supavisor), where pgx's default (cache_statement, named prepared
// statements kept per session) fails. It still encodes parameters by their
// server-side types, which exec and simple_protocol do not (see New). It
// costs a parse and plan per statement, which cache_statement saves on a
// direct connection (docs/BENCHMARKS.md).
const PoolerSafeMode = pgx.QueryExecModeCacheDescribe

// ParseConfig is pgxpool.ParseConfig that makes the same URL work direct to
// PostgreSQL and through a transaction-mode pooler. Unless connString sets
// default_query_exec_mode, the config's BeforeConnect hook, when the pool
// opens its first connection, first opens one short-lived connection to
// see whether a pooler answers (see behindPooler), and then gives every
// connection pgx's cache_statement mode if none does, PoolerSafeMode if one
// does. Adjust the result and pass it to pgxpool.NewWithConfig, as with
// pgx's own; a BeforeConnect of your own must call the one it replaces. A
// malformed connString is an ErrInvalidArgument error that does not quote
// it (it may hold a password).
func ParseConfig(connString string) (*pgxpool.Config, error) {
	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot parse the database URL", ErrInvalidArgument)
	}
	if !setsExecMode(cfg.ConnString()) {
		cfg.BeforeConnect = (&modeChooser{}).beforeConnect
	}
	return cfg, nil
}

// NewPool is ParseConfig followed by pgxpool.NewWithConfig. Like pgxpool.New
// it does not connect until first used.
func NewPool(ctx context.Context, connString string) (*pgxpool.Pool, error) {
	cfg, err := ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	return pool, nil
}

// modeChooser picks one pool's exec mode on its first connection.
type modeChooser struct {
	mu    sync.Mutex
	known bool
	mode  pgx.QueryExecMode
}

func (m *modeChooser) beforeConnect(ctx context.Context, cc *pgx.ConnConfig) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.known {
		probe := cc.Copy()
		probe.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
		conn, err := pgx.ConnectConfig(ctx, probe)
		if err != nil {
			return err
		}
		pooled, err := behindPooler(ctx, conn)
		conn.Close(ctx)
		if err != nil {
			return err
		}
		m.mode, m.known = pgx.QueryExecModeCacheStatement, true
		if pooled {
			m.mode = PoolerSafeMode
		}
	}
	cc.DefaultQueryExecMode = m.mode
	return nil
}

// setsExecMode reports whether connString names default_query_exec_mode
// (pgx removes it from the parameters it parses, so parse it again at the
// pgconn level, which keeps it).
func setsExecMode(connString string) bool {
	c, err := pgconn.ParseConfig(connString)
	if err != nil {
		return false
	}
	_, ok := c.RuntimeParams["default_query_exec_mode"]
	return ok
}

// behindPooler reports whether conn reaches PostgreSQL through a
// connection pooler. PostgreSQL tells each client its backend's process ID
// (BackendKeyData) at startup; a pooler, whose clients are not tied to one
// server backend, hands out keys of its own (PgBouncer a random one), so
// the ID it announces is not the pg_backend_pid() of the backend serving
// the query. A plain TCP proxy passes the real one through. The query uses
// the simple protocol, which works in any mode.
func behindPooler(ctx context.Context, conn *pgx.Conn) (bool, error) {
	var pid uint32
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()", pgx.QueryExecModeSimpleProtocol).Scan(&pid); err != nil {
		return false, err
	}
	return pid != conn.PgConn().PID(), nil
}

// probePool returns the exec mode of one of pool's connections (which a
// BeforeConnect hook such as ParseConfig's may have chosen) and whether it
// reaches PostgreSQL through a pooler.
func probePool(ctx context.Context, pool *pgxpool.Pool) (pgx.QueryExecMode, bool, error) {
	c, err := pool.Acquire(ctx)
	if err != nil {
		return 0, false, err
	}
	defer c.Release()
	pooled, err := behindPooler(ctx, c.Conn())
	return c.Conn().Config().DefaultQueryExecMode, pooled, err
}

// checkExecMode refuses a pool whose mode pgstore's statements cannot work
// in: exec and simple_protocol, which guess parameter types from Go types
// and so send the []byte of a jsonb parameter as bytea; and, through a
// pooler, the modes that rely on server-side statement state across round
// trips (cache_statement's named statements, describe_exec's unnamed one),
// unless the connection string chose that mode explicitly (PgBouncer 1.21
// and later track protocol-level prepared statements when
// max_prepared_statements is set).
func checkExecMode(ctx context.Context, pool *pgxpool.Pool) error {
	mode, pooled, err := probePool(ctx, pool)
	if err != nil {
		return fmt.Errorf("pgstore: connect: %w", err)
	}
	switch {
	case mode == pgx.QueryExecModeExec || mode == pgx.QueryExecModeSimpleProtocol:
		return fmt.Errorf("%w: pgx's %s mode sends parameters typed by their Go type, which some of pgstore's are not: use cache_describe or cache_statement, or leave the choice to pgstore.ParseConfig", ErrInvalidArgument, modeName(mode))
	case pooled && (mode == pgx.QueryExecModeCacheStatement || mode == pgx.QueryExecModeDescribeExec) && !setsExecMode(pool.Config().ConnString()):
		return fmt.Errorf("%w: the pool reaches PostgreSQL through a connection pooler in pgx's %s mode, whose server-side statements break under transaction pooling: build the pool with pgstore.NewPool or pgstore.ParseConfig, or set default_query_exec_mode=cache_describe in the URL", ErrPooler, modeName(mode))
	}
	return nil
}

// modeName is the default_query_exec_mode value that selects mode.
func modeName(mode pgx.QueryExecMode) string {
	return strings.ReplaceAll(mode.String(), " ", "_")
}

// checkDirect refuses a pool that reaches PostgreSQL through a pooler, for
// Migrate: its session advisory locks need one server session throughout,
// which a transaction-mode pooler does not give (a lock taken on one
// server connection and released on another stays held).
func checkDirect(ctx context.Context, pool *pgxpool.Pool) error {
	_, pooled, err := probePool(ctx, pool)
	if err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	if pooled {
		return fmt.Errorf("%w: Migrate holds session advisory locks, which a transaction-mode pooler does not keep: run it over a direct connection to PostgreSQL", ErrPooler)
	}
	return nil
}
