package pgstore

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PoolerSafeMode is the query exec mode ParseConfig and NewPool choose
// unless the connection string sets default_query_exec_mode. It keeps no
// statement on the server between round trips (it caches only statement
// descriptions, per client connection, and executes through the unnamed
// statement, parse and execution in one round trip), so it works through a
// transaction-mode pooler (PgBouncer, Supavisor), where pgx's default
// (cache_statement, named prepared statements kept per session) fails. It
// still encodes parameters by their server-side types, which exec and
// simple_protocol do not (see New).
const PoolerSafeMode = pgx.QueryExecModeCacheDescribe

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

// checkExecMode refuses a pool whose mode pgstore's statements cannot work
// in: exec and simple_protocol, which guess parameter types from Go types
// and so send the []byte of a jsonb parameter as bytea; and, through a
// pooler, the modes that rely on server-side statement state across round
// trips (cache_statement's named statements, describe_exec's unnamed one),
// unless the connection string chose that mode explicitly (PgBouncer 1.21
// and later track protocol-level prepared statements when
// max_prepared_statements is set).
func checkExecMode(ctx context.Context, pool *pgxpool.Pool) error {
	mode := pool.Config().ConnConfig.DefaultQueryExecMode
	if mode == pgx.QueryExecModeExec || mode == pgx.QueryExecModeSimpleProtocol {
		return fmt.Errorf("%w: pgx's %s mode sends parameters typed by their Go type, which some of pgstore's are not: use cache_describe (pgstore.NewPool's default) or cache_statement", ErrInvalidArgument, modeName(mode))
	}
	if mode != pgx.QueryExecModeCacheStatement && mode != pgx.QueryExecModeDescribeExec || setsExecMode(pool.Config().ConnString()) {
		return nil
	}
	pooled, err := behindPooler(ctx, pool)
	if err != nil {
		return fmt.Errorf("pgstore: connect: %w", err)
	}
	if pooled {
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
	pooled, err := behindPooler(ctx, pool)
	if err != nil {
		return fmt.Errorf("pgstore: migrate: %w", err)
	}
	if pooled {
		return fmt.Errorf("%w: Migrate holds session advisory locks, which a transaction-mode pooler does not keep: run it over a direct connection to PostgreSQL", ErrPooler)
	}
	return nil
}
