package server

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

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
	log    *logBatcher // the rows of record, group-committed
	off    bool        // benchmarks only: measures what the log costs
	// writers bounds the write transactions held at once below the pool's
	// size: each holds a connection while pgstore may need another for a
	// budget reservation (see pgstore.Store.In), so without the bound a
	// burst of writes could hold every connection and wait for one forever.
	writers chan struct{}
}

// record inserts a finished access (reads, seals, opens, refusals, a
// shred's started and outcome rows) and returns once its row has
// committed, or an error wrapping errAuditFailed. The row is
// group-committed with the rows of concurrent requests (logBatcher).
func (a *auditor) record(ctx context.Context, tok *tokenRow, project string, names []string, op, outcome string) error {
	if a.off {
		return nil
	}
	return a.log.record(ctx, logRow{token: tok.id, project: project, names: names, op: op, outcome: outcome})
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
			return aerr
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

// errLogClosed: a row was offered after Server.Close.
var errLogClosed = errors.New("server closed")

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// Bounds of one access_log batch.
const (
	// logFlushers is how many batches can be in flight at once. Two keep
	// the database busy while one flusher waits for its answer, so a row
	// that arrives during a flush waits for at most one other statement's
	// round trip before its own starts, not for a whole queue.
	logFlushers = 2
	// maxBatchRows bounds the rows of one INSERT.
	maxBatchRows = 512
	// maxBatchNames bounds the names of one INSERT (a batch holds fewer
	// rows when they name many secrets, as get-many and open-many do;
	// one row is always taken, whatever its names). Each row's names are
	// a slice of one text[] parameter, found by walking it, so the
	// statement's work grows with rows × names: this keeps it small.
	maxBatchNames = 8192
)

// logRow is one row of access_log.
type logRow struct {
	token       [tokenIDLen]byte
	project     string
	names       []string
	op, outcome string
}

// waiter is a request waiting for its row's batch to commit.
type waiter struct {
	row  logRow
	done chan error // buffered (1): the flusher never waits for a waiter that gave up
}

// logBatcher group-commits access_log rows. A request queues its row and
// waits; one of logFlushers goroutines takes every queued row (up to
// maxBatchRows and maxBatchNames), inserts them with one autocommitted
// statement and hands each waiter the statement's result. Rows that
// arrive while a batch is in flight queue for the next one: there is no
// timer. A row that finds no statement in flight and nothing queued is
// written by its own goroutine (the single-row INSERT, as before group
// commit), so a lone request costs what it did; at most logFlushers+1
// statements are in flight.
type logBatcher struct {
	pool    *pgxpool.Pool
	one     string        // a row alone
	stmt    string        // many rows
	timeout time.Duration // bounds one statement

	mu     sync.Mutex
	queue  []*waiter
	busy   int // statements in flight (a flusher's batch or a lone row)
	closed bool
	wake   chan struct{} // buffered (1): rows are queued
	stop   chan struct{} // closed by close: drain the queue and end
	wg     sync.WaitGroup

	// For tests and benchmarks: statements run, rows offered to them, and
	// a hook called after each row is accepted (queued, or being written
	// by its own goroutine).
	statements, rows atomic.Int64
	queued           atomic.Pointer[func()]
}

func newLogBatcher(pool *pgxpool.Pool, q string, timeout time.Duration) *logBatcher {
	b := &logBatcher{
		pool:    pool,
		timeout: timeout,
		wake:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		// Columns travel as arrays, one element per row. names is text[]
		// per row, and PostgreSQL has no arrays of arrays of different
		// lengths, so every row's names go in one flat text[] ($7) and
		// row i takes its slice [lo:hi] (1-based, inclusive; lo > hi is
		// the empty array). Each name is then an element sent exactly as
		// the single-row INSERT sent it (no JSON or literal quoting).
		one: `INSERT INTO ` + q + `.access_log (token_id, project_id, names, operation, outcome)
VALUES ($1, $2, $3, $4, $5)`,
		stmt: `INSERT INTO ` + q + `.access_log (token_id, project_id, names, operation, outcome)
SELECT r.token_id, r.project_id, coalesce(($7::text[])[r.lo:r.hi], '{}'), r.operation, r.outcome
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int4[]) AS r(token_id, project_id, operation, outcome, lo, hi)`,
	}
	b.wg.Add(logFlushers)
	for range logFlushers {
		go b.run()
	}
	return b
}

// record queues row and waits until its batch has committed (nil) or
// failed, or ctx ends (both errors wrap errAuditFailed); or, when nothing
// is in flight or queued, inserts it itself under ctx. When ctx ends
// first the row may still commit afterwards: a row for an answer never
// sent is acceptable, an answer without its row is not.
func (b *logBatcher) record(ctx context.Context, row logRow) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", errAuditFailed, err)
	}
	w := &waiter{row: row, done: make(chan error, 1)}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return fmt.Errorf("%w: %w", errAuditFailed, errLogClosed)
	}
	if b.busy == 0 && len(b.queue) == 0 {
		// No statement in flight and none queued: nothing to share one
		// with, so this goroutine writes its row itself, sparing the
		// hand-off to a flusher and back (two goroutine wake-ups, about
		// 40 µs of CPU: BenchmarkAccessLogInsert). Rows that arrive
		// meanwhile queue for the flushers.
		b.busy++
		b.wg.Add(1) // close waits for it too; closed is false, so close's Wait has not begun
		b.mu.Unlock()
		b.accepted()
		err := b.insert(ctx, []*waiter{w})
		b.mu.Lock()
		b.busy--
		b.mu.Unlock()
		b.wg.Done()
		return err
	}
	b.queue = append(b.queue, w)
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default: // a wake-up is pending: its flusher will take this row too
	}
	b.accepted()
	select {
	case err := <-w.done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", errAuditFailed, ctx.Err())
	}
}

// accepted calls the test hook, if any.
func (b *logBatcher) accepted() {
	if f := b.queued.Load(); f != nil {
		(*f)()
	}
}

// run is one flusher: it flushes batches while rows are queued, sleeps
// until woken, and on close drains the queue and returns.
func (b *logBatcher) run() {
	defer b.wg.Done()
	for {
		if batch := b.take(); batch != nil {
			b.flush(batch)
			continue
		}
		select {
		case <-b.wake:
		case <-b.stop:
			// record refuses rows once closed is set (before stop is
			// closed), so this ends.
			for batch := b.take(); batch != nil; batch = b.take() {
				b.flush(batch)
			}
			return
		}
	}
}

// take removes and returns the queue's first rows, up to the batch
// bounds; nil when the queue is empty.
func (b *logBatcher) take() []*waiter {
	b.mu.Lock()
	defer b.mu.Unlock()
	n, names := 0, 0
	for n < len(b.queue) && n < maxBatchRows {
		k := len(b.queue[n].row.names)
		if n > 0 && names+k > maxBatchNames {
			break
		}
		names += k
		n++
	}
	if n == 0 {
		return nil
	}
	b.busy++ // until flush has answered the batch
	batch := b.queue[:n:n]
	b.queue = b.queue[n:]
	if len(b.queue) == 0 {
		b.queue = nil
	}
	return batch
}

// flush inserts batch and answers every waiter. When the statement fails
// because of a row's data (SQLSTATE classes 22 and 23: a name PostgreSQL
// cannot store as text, a constraint), each row is retried alone, so one
// request's row cannot refuse the others; any other failure (connection,
// privilege, timeout) is every waiter's answer.
func (b *logBatcher) flush(batch []*waiter) {
	ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
	defer cancel()
	defer func() {
		b.mu.Lock()
		b.busy--
		b.mu.Unlock()
	}()
	err := b.insert(ctx, batch)
	if err != nil && len(batch) > 1 && rowSpecific(err) {
		for _, w := range batch {
			w.done <- b.insert(ctx, []*waiter{w})
		}
		return
	}
	for _, w := range batch {
		w.done <- err
	}
}

// insert writes batch's rows in one statement: a batch of one with the
// single-row INSERT ... VALUES (PostgreSQL plans the unnest form afresh
// for each execution, which costs a lone row about half again as much
// CPU: BenchmarkAccessLogInsert), more rows with insertMany.
func (b *logBatcher) insert(ctx context.Context, batch []*waiter) error {
	if len(batch) != 1 {
		return b.insertMany(ctx, batch)
	}
	r := batch[0].row
	b.statements.Add(1)
	b.rows.Add(1)
	if _, err := b.pool.Exec(ctx, b.one, pgtype.UUID{Bytes: r.token, Valid: true}, r.project, nonNil(r.names), r.op, r.outcome); err != nil {
		return fmt.Errorf("%w: %w", errAuditFailed, err)
	}
	return nil
}

// insertMany writes batch's rows with one INSERT ... SELECT FROM unnest.
func (b *logBatcher) insertMany(ctx context.Context, batch []*waiter) error {
	n := len(batch)
	var (
		ids           = make([]pgtype.UUID, n)
		projects, ops = make([]string, n), make([]string, n)
		outcomes      = make([]string, n)
		lo, hi        = make([]int32, n), make([]int32, n)
		total         int
	)
	for _, w := range batch {
		total += len(w.row.names)
	}
	names := make([]string, 0, total) // never nil: a nil slice is sent as NULL
	for i, w := range batch {
		ids[i] = pgtype.UUID{Bytes: w.row.token, Valid: true}
		projects[i], ops[i], outcomes[i] = w.row.project, w.row.op, w.row.outcome
		lo[i] = int32(len(names) + 1)
		names = append(names, w.row.names...)
		hi[i] = int32(len(names))
	}
	b.statements.Add(1)
	b.rows.Add(int64(n))
	if _, err := b.pool.Exec(ctx, b.stmt, ids, projects, ops, outcomes, lo, hi, names); err != nil {
		return fmt.Errorf("%w: %w", errAuditFailed, err)
	}
	return nil
}

// rowSpecific reports whether err is PostgreSQL refusing a row's data
// rather than the statement.
func rowSpecific(err error) bool {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || len(pe.Code) < 2 {
		return false
	}
	return pe.Code[:2] == "22" || pe.Code[:2] == "23"
}

// close refuses new rows, flushes every queued one and returns when the
// flushers have ended. It may be called more than once.
func (b *logBatcher) close() {
	b.shut()
	b.wg.Wait()
}

// shut is close without the wait: from now on record refuses rows, and
// the flushers end once the queue is empty.
func (b *logBatcher) shut() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.closed {
		b.closed = true
		close(b.stop)
	}
}
