package main

import (
	"context"
	"errors"
	"fmt"
	"os/user"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/profullstack/keybroker/pgstore"
)

// session is an open database pool, keyring and store.
type session struct {
	pool  *pgxpool.Pool
	store *pgstore.Store
}

func (s *session) close() {
	s.store.Close()
	s.pool.Close()
}

// openStore opens the keyring, the database and the store on it.
func (a *app) openStore(ctx context.Context) (*session, error) {
	return a.openStoreWith(ctx, 8, actor(), nil)
}

// openStoreWith is openStore with a pool of maxConns connections, the
// given actor and observer.
func (a *app) openStoreWith(ctx context.Context, maxConns int32, who string, obs pgstore.Observer) (*session, error) {
	kr, err := a.openKeyring(ctx)
	if err != nil {
		return nil, err
	}
	pool, err := a.openDBConns(ctx, maxConns)
	if err != nil {
		return nil, err
	}
	st, err := pgstore.New(ctx, pool, pgstore.Config{
		Schema:           a.cfg.Schema,
		KEK:              kr,
		Budget:           a.cfg.Budget,
		DirectKEK:        a.cfg.DirectKEK,
		TenantKEKSchemes: a.cfg.TenantKEKSchemes,
		Actor:            who,
		Logger:           a.log,
		Observer:         obs,
	})
	if err != nil {
		pool.Close()
		if errors.Is(err, pgstore.ErrSchemaVersion) {
			err = fmt.Errorf("%w (keybroker migrate)", err)
		}
		return nil, err
	}
	return &session{pool: pool, store: st}, nil
}

// actor names who ran the command, for key_events.
func actor() string {
	name := "unknown"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	return "keybroker-cli:" + name
}
