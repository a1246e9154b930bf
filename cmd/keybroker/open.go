package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// openDB connects to the configured database and checks it answers. The
// pool is pgstore.ParseConfig's, so the same URL works through a
// transaction-mode pooler (PgBouncer, Supavisor).
func (a *app) openDB(ctx context.Context) (*pgxpool.Pool, error) { return a.openDBConns(ctx, 8) }

// openDBConns is openDB with a pool of at most maxConns connections.
func (a *app) openDBConns(ctx context.Context, maxConns int32) (*pgxpool.Pool, error) {
	if a.cfg.DatabaseURL == "" {
		return nil, usageErrorf("no database: set --database-url or %s", envDatabaseURL)
	}
	cfg, err := pgstore.ParseConfig(a.cfg.DatabaseURL)
	if err != nil {
		// Not err: pgx's parse errors may quote the URL, and with it a password.
		return nil, usageErrorf("database URL: cannot parse it")
	}
	cfg.MaxConns = maxConns
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("database: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("database: %w", err)
	}
	return pool, nil
}

// openKeyring opens the primary KEK provider and the decrypt-only ones.
func (a *app) openKeyring(ctx context.Context) (*provider.Keyring, error) {
	if a.cfg.KEK == "" {
		return nil, usageErrorf("no KEK: set --kek or %s (for example local:///path/keyring.json, see keybroker keygen)", envKEK)
	}
	primary, err := openProvider(ctx, a.cfg.KEK)
	if err != nil {
		return nil, err
	}
	var others []provider.KEKProvider
	for _, u := range a.cfg.DecryptOnly {
		p, err := openProvider(ctx, u)
		if err != nil {
			return nil, err
		}
		others = append(others, p)
	}
	kr, err := provider.NewKeyring(primary, others...)
	if err != nil {
		return nil, &codeError{code: exitUsage, err: err}
	}
	return kr, nil
}

// openProvider opens one provider URL. Opening checks the URL and the
// backend's local configuration (parameters, keyring file, credentials
// source); any failure is a usage error (exit 2), since rerunning with the
// same configuration cannot help, except an unavailable key service, a
// timeout or cancellation, which stay errors (exit 1).
func openProvider(ctx context.Context, rawURL string) (provider.KEKProvider, error) {
	p, err := provider.Open(ctx, rawURL)
	if err != nil && !errors.Is(err, provider.ErrUnavailable) && !errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		return nil, &codeError{code: exitUsage, err: err}
	}
	return p, err
}
