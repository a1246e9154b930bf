package pgstore

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PoolerSafeMode is the query exec mode ParseConfig and NewPool choose
// unless the connection string sets default_query_exec_mode: it sends
// every statement unnamed, with its parameters and execution in one round
// trip, so it works through a transaction-mode pooler (PgBouncer,
// Supavisor), where pgx's default (cache_statement, named prepared
// statements kept per session) fails.
const PoolerSafeMode = pgx.QueryExecModeExec

// ParseConfig is pgxpool.ParseConfig with one change: unless connString
// sets default_query_exec_mode, the pool uses PoolerSafeMode rather than
// pgx's cache_statement, so the same URL works direct to PostgreSQL and
// through a transaction-mode pooler. Adjust the result and pass it to
// pgxpool.NewWithConfig, as with pgx's own. A malformed connString is an
// ErrInvalidArgument error that does not quote it (it may hold a
// password).
func ParseConfig(connString string) (*pgxpool.Config, error) {
	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot parse the database URL", ErrInvalidArgument)
	}
	if !setsExecMode(cfg.ConnString()) {
		cfg.ConnConfig.DefaultQueryExecMode = PoolerSafeMode
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

// behindPooler reports whether pool reaches PostgreSQL through a
// connection pooler. PostgreSQL tells each client its backend's process ID
// (BackendKeyData) at startup; a pooler, whose clients are not tied to one
// server backend, hands out keys of its own, so the ID it announces is not
// the pg_backend_pid() of the backend serving the query. A plain TCP proxy
// passes the real one through. The probe uses the simple protocol, which
// works in any mode.
func behindPooler(ctx context.Context, pool *pgxpool.Pool) (bool, error) {
	c, err := pool.Acquire(ctx)
	if err != nil {
		return false, err
	}
	defer c.Release()
	var pid uint32
	if err := c.QueryRow(ctx, "SELECT pg_backend_pid()", pgx.QueryExecModeSimpleProtocol).Scan(&pid); err != nil {
		return false, err
	}
	return pid != c.Conn().PgConn().PID(), nil
}

// checkExecMode refuses a pool that reaches PostgreSQL through a pooler in
// a mode that relies on server-side statement state across round trips
// (cache_statement's named statements, describe_exec's unnamed one), unless
// its connection string chose that mode explicitly (PgBouncer 1.21 and
// later track protocol-level prepared statements when
// max_prepared_statements is set).
func checkExecMode(ctx context.Context, pool *pgxpool.Pool) error {
	mode := pool.Config().ConnConfig.DefaultQueryExecMode
	if mode != pgx.QueryExecModeCacheStatement && mode != pgx.QueryExecModeDescribeExec || setsExecMode(pool.Config().ConnString()) {
		return nil
	}
	pooled, err := behindPooler(ctx, pool)
	if err != nil {
		return fmt.Errorf("pgstore: connect: %w", err)
	}
	if pooled {
		name := "cache_statement"
		if mode == pgx.QueryExecModeDescribeExec {
			name = "describe_exec"
		}
		return fmt.Errorf("%w: the pool reaches PostgreSQL through a connection pooler in pgx's %s mode, whose server-side statements break under transaction pooling: build the pool with pgstore.NewPool or pgstore.ParseConfig, or set default_query_exec_mode in the URL", ErrPooler, name)
	}
	return nil
}

// checkDirect refuses a pool that reaches PostgreSQL through a pooler, for
// Migrate: its session advisory locks need one server session throughout,
// which a transaction-mode pooler does not give (a lock taken on one
// server connection and released on another stays held).
func checkDirect(ctx context.Context, pool *pgxpool.Pool) error {
	pooled, err := behindPooler(ctx, pool)
	if err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	if pooled {
		return fmt.Errorf("%w: Migrate holds session advisory locks, which a transaction-mode pooler does not keep: run it over a direct connection to PostgreSQL", ErrPooler)
	}
	return nil
}
