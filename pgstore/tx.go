package pgstore

import (
	"context"

	"github.com/jackc/pgx/v5"
)

// DB is what a Store returned by In runs its statements on: a pgx.Tx (or a
// *pgxpool.Tx), a *pgx.Conn, a *pgxpool.Conn or a *pgxpool.Pool all
// satisfy it. Every statement of Put, Get, GetMany, Delete and List is sent
// as one batch (one round trip).
type DB interface {
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

// In returns a Store whose Put, Get, GetMany, Delete and List run on db,
// typically the caller's transaction, so that a secret and the
// application's own rows commit or roll back together: a Put rolled back
// with its transaction leaves nothing readable behind, and a Get in the
// transaction sees the transaction's own uncommitted Puts. The returned
// Store shares s's keyring, cache of unwrapped data keys and budget
// reservations; it must not be used after db is finished (committed,
// rolled back, closed). Closing it closes s.
//
// Data keys are not part of the caller's transaction: reserving budget and
// creating a project's data key run on s's pool, each in a transaction of
// its own, committed whatever the caller's transaction does. A rolled-back
// Put therefore leaves at most a data key with budget reserved and no
// secret under it, which the project's next Put uses (the key is not
// orphaned: it is the project's active key, and its reserved encryptions
// are never reused). This is also why db may be a transaction in any
// isolation level, with one limit: under REPEATABLE READ or SERIALIZABLE,
// a Put for a project whose data key was created after the transaction's
// snapshot was taken cannot see that key's row (the database's fence reads
// it) and fails with ErrNoActiveKey, nothing written; PostgreSQL's default
// READ COMMITTED has no such limit. The pool must have a connection free
// for those reservations while db holds one of its own.
//
// Key management (MigratePlaintext, Rewrap, Reencrypt, RetireKEK, Status,
// ...) keeps running on s's pool in its own transactions. Under row-level
// security, each call sets keybroker.project_id for db's transaction (see
// the package doc), which then names the last project used until the
// transaction ends.
func (s *Store) In(db DB) *Store {
	c := *s
	c.db = db
	return &c
}
