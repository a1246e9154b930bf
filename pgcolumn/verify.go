package pgcolumn

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// VerifyOptions configures Verify.
type VerifyOptions struct {
	// Project limits Verify to one project's rows; empty: every row of the
	// table (which needs a role row-level security does not restrict).
	Project string
	// BatchSize is the rows read per statement; DefaultBatchSize when zero.
	BatchSize int
	// MaxReported bounds VerifyResult.UnreadableRows; 20 when zero.
	MaxReported int
}

// RowRef names a row: its project and key, as text. Never a value.
type RowRef struct {
	Project string
	Key     []string
}

// VerifyResult counts what Verify found. It holds no value.
type VerifyResult struct {
	Rows       int64 // rows read (NULL values included)
	Opened     int64 // sealed values that opened
	Unsealed   int64 // values that are not sealed (legacy)
	Null       int64 // NULL values
	Unreadable int64 // sealed values that did not open (envelope.ErrDecrypt)
	// UnreadableRows lists the first unreadable rows (MaxReported).
	UnreadableRows []RowRef
}

// Verify opens every sealed value of the column (of one project, or of the
// whole table) and counts the outcome; plaintexts are cleared as soon as
// they have opened, and nothing is written. A value that does not open is
// counted and named in UnreadableRows, not returned as an error; an error
// is returned only when Verify cannot go on (database or key service
// unreachable, ctx done). It reads the table in batches in key order, each
// batch a statement of its own, so it holds no long snapshot: rows written
// meanwhile may or may not be counted.
func (e *Encrypted) Verify(ctx context.Context, opts VerifyOptions) (VerifyResult, error) {
	var res VerifyResult
	if opts.Project != "" {
		if err := e.ks.CheckProject(opts.Project); err != nil {
			return res, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
		}
	} else if e.ks.RowSecurity() {
		return res, fmt.Errorf("%w: verify every project of %s.%s: the role is bound by row-level security (name a project)", ErrInvalidArgument, e.col.Table, e.col.Value)
	}
	batch := opts.BatchSize
	if batch == 0 {
		batch = DefaultBatchSize
	}
	if batch < 1 || opts.MaxReported < 0 {
		return res, fmt.Errorf("%w: batch size %d, max reported %d", ErrInvalidArgument, batch, opts.MaxReported)
	}
	maxReported := opts.MaxReported
	if maxReported == 0 {
		maxReported = 20
	}
	nk := len(e.col.Key)
	// Keyset pagination on (project, key...), compared in the columns' own
	// types so the unique index serves: after holds the last row's values
	// as text.
	cols := append([]string{e.col.Project}, e.col.Key...)
	types := append([]string{e.projType}, e.keyTypes...)
	sel := make([]string, len(cols))
	order := make([]string, len(cols))
	after := make([]string, len(cols))
	for i, c := range cols {
		sel[i] = "t." + pgx.Identifier{c}.Sanitize() + "::text"
		order[i] = "t." + pgx.Identifier{c}.Sanitize()
		after[i] = "CAST($" + strconv.Itoa(i+3) + "::text AS " + types[i] + ")"
	}
	base := `SELECT ` + strings.Join(sel, ", ") + `, t.` + pgx.Identifier{e.col.Value}.Sanitize() + ` FROM ` + e.quotedTable() + ` t WHERE ($1 = '' OR ` + e.projectIs("t", "nullif($1, '')") + `)`
	first := base + ` ORDER BY ` + strings.Join(order, ", ") + ` LIMIT $2`
	next := base + ` AND (` + strings.Join(order, ", ") + `) > (` + strings.Join(after, ", ") + `) ORDER BY ` + strings.Join(order, ", ") + ` LIMIT $2`
	var last []string
	for {
		args := []any{opts.Project, batch}
		stmt := first
		if last != nil {
			stmt = next
			for _, v := range last {
				args = append(args, v)
			}
		}
		type row struct {
			ref    RowRef
			stored []byte
			null   bool
		}
		var page []row
		err := e.scopedRead(ctx, opts.Project, func(tx pgx.Tx) error {
			rows, err := tx.Query(ctx, stmt, args...)
			if err != nil {
				return err
			}
			defer rows.Close()
			for rows.Next() {
				vals := make([]string, nk+1)
				var stored []byte
				dest := make([]any, 0, nk+2)
				for i := range vals {
					dest = append(dest, &vals[i])
				}
				if err := rows.Scan(append(dest, &stored)...); err != nil {
					return err
				}
				page = append(page, row{ref: RowRef{Project: vals[0], Key: vals[1:]}, stored: stored, null: stored == nil})
			}
			return rows.Err()
		})
		if err != nil {
			return res, fmt.Errorf("pgcolumn: verify %s.%s: %w", e.col.Table, e.col.Value, err)
		}
		for _, r := range page {
			res.Rows++
			switch {
			case r.null:
				res.Null++
				continue
			case !sealed(r.stored):
				res.Unsealed++
				continue
			}
			pt, err := e.Open(ctx, r.ref.Project, r.ref.Key, r.stored)
			switch {
			case err == nil:
				provider.Clear(pt)
				res.Opened++
			case errors.Is(err, envelope.ErrDecrypt), errors.Is(err, ErrInvalidArgument):
				// ErrInvalidArgument: a row whose key cannot be a Context
				// (too long, say) cannot hold a value that opens either.
				res.Unreadable++
				if len(res.UnreadableRows) < maxReported {
					res.UnreadableRows = append(res.UnreadableRows, r.ref)
				}
			default:
				return res, fmt.Errorf("pgcolumn: verify %s.%s: row %q of project %q: %w", e.col.Table, e.col.Value, r.ref.Key, r.ref.Project, err)
			}
		}
		if len(page) < batch {
			return res, nil
		}
		l := page[len(page)-1].ref
		last = append([]string{l.Project}, l.Key...)
	}
}

// scopedRead runs fn in a read-only transaction, with the project set
// for row-level security when one is named.
func (e *Encrypted) scopedRead(ctx context.Context, project string, fn func(pgx.Tx) error) error {
	if project != "" {
		return pgstore.WithProject(ctx, e.ks.Pool(), project, fn)
	}
	return pgx.BeginTxFunc(ctx, e.ks.Pool(), pgx.TxOptions{AccessMode: pgx.ReadOnly}, fn)
}
