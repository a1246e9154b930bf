package server

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgtype"

	"github.com/profullstack/keybroker/pgstore"
)

// Outcomes recorded in access_log.outcome.
const (
	outcomeStarted   = "started" // a project deletion about to run (its outcome follows in another row)
	outcomeOK        = "ok"
	outcomeNotFound  = "not_found"
	outcomeForbidden = "forbidden"
	outcomeInvalid   = "invalid"
	outcomeError     = "error"
)

// auditor writes access_log rows. Each row commits before the response
// it records is written, so a row the server relied on survives a crash.
type auditor struct {
	tokens *Tokens
	off    bool // benchmarks only: measures what the log costs
	// writers bounds the write transactions held at once below the pool's
	// size: each holds a connection while pgstore may need another for a
	// budget reservation (see pgstore.Store.In), so without the bound a
	// burst of writes could hold every connection and wait for one forever.
	writers chan struct{}
}

// record inserts a finished access (reads, refusals).
func (a *auditor) record(ctx context.Context, tok *tokenRow, project string, names []string, op, outcome string) error {
	if a.off {
		return nil
	}
	_, err := a.tokens.pool.Exec(ctx, `INSERT INTO `+a.tokens.q+`.access_log (token_id, project_id, names, operation, outcome)
VALUES ($1, $2, $3, $4, $5)`, pgtype.UUID{Bytes: tok.id, Valid: true}, project, nonNil(names), op, outcome)
	if err != nil {
		return fmt.Errorf("server: access log: %w", err)
	}
	return nil
}

// write runs do on a Store bound to a transaction that also inserts the
// write's access_log row: the write and its row commit together or not at
// all. When do fails the transaction is rolled back and the failure is
// recorded in a row of its own; the error returned is do's (or the log's,
// errAuditFailed, when nothing was written for want of the log).
func (a *auditor) write(ctx context.Context, st *pgstore.Store, tok *tokenRow, project string, names []string, op string, do func(*pgstore.Store) error) error {
	if a.off {
		return do(st)
	}
	select {
	case a.writers <- struct{}{}:
		defer func() { <-a.writers }()
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", errAuditFailed, ctx.Err())
	}
	tx, err := a.tokens.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("%w: %w", errAuditFailed, err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) // a no-op after Commit
	if _, err := tx.Exec(ctx, `INSERT INTO `+a.tokens.q+`.access_log (token_id, project_id, names, operation, outcome)
VALUES ($1, $2, $3, $4, 'ok')`, pgtype.UUID{Bytes: tok.id, Valid: true}, project, nonNil(names), op); err != nil {
		return fmt.Errorf("%w: %w", errAuditFailed, err)
	}
	if err := do(st.In(tx)); err != nil {
		tx.Rollback(context.WithoutCancel(ctx))
		if aerr := a.record(ctx, tok, project, names, op, classify(err)); aerr != nil {
			return fmt.Errorf("%w: %w", errAuditFailed, aerr)
		}
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("server: commit: %w", err)
	}
	return nil
}

// errAuditFailed: the access log could not be written, so the request was
// not served.
var errAuditFailed = errors.New("server: access log unavailable")

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
