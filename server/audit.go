package server

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgtype"
)

// Outcomes recorded in access_log.outcome.
const (
	outcomePending   = "pending" // a write that has not finished (or whose server died)
	outcomeOK        = "ok"
	outcomeNotFound  = "not_found"
	outcomeForbidden = "forbidden"
	outcomeInvalid   = "invalid"
	outcomeError     = "error"
)

// auditor writes access_log rows. Each call is one statement that commits
// before it returns, so a row the server relied on survives a crash.
type auditor struct {
	tokens *Tokens
	off    bool // benchmarks only: measures what the log costs
}

// record inserts a finished access (reads, refusals).
func (a *auditor) record(ctx context.Context, tok *tokenRow, project string, names []string, op, outcome string) error {
	if a.off {
		return nil
	}
	_, err := a.tokens.pool.Exec(ctx, `INSERT INTO `+a.tokens.q+`.access_log (token_id, project_id, names, operation, outcome, done_at)
VALUES ($1, $2, $3, $4, $5, now())`, pgtype.UUID{Bytes: tok.id, Valid: true}, project, nonNil(names), op, outcome)
	if err != nil {
		return fmt.Errorf("server: access log: %w", err)
	}
	return nil
}

// begin inserts a pending row for a write about to be made and returns its
// id for finish.
func (a *auditor) begin(ctx context.Context, tok *tokenRow, project string, names []string, op string) (int64, error) {
	if a.off {
		return 0, nil
	}
	var id int64
	err := a.tokens.pool.QueryRow(ctx, `INSERT INTO `+a.tokens.q+`.access_log (token_id, project_id, names, operation, outcome)
VALUES ($1, $2, $3, $4, 'pending') RETURNING id`, pgtype.UUID{Bytes: tok.id, Valid: true}, project, nonNil(names), op).Scan(&id)
	if err != nil {
		return 0, fmt.Errorf("server: access log: %w", err)
	}
	return id, nil
}

// finish records the outcome of the write begin announced.
func (a *auditor) finish(ctx context.Context, id int64, outcome string) error {
	if a.off {
		return nil
	}
	_, err := a.tokens.pool.Exec(ctx, `UPDATE `+a.tokens.q+`.access_log SET outcome = $2, done_at = now() WHERE id = $1`, id, outcome)
	if err != nil {
		return fmt.Errorf("server: access log: %w", err)
	}
	return nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}
