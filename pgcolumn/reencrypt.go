package pgcolumn

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/profullstack/keybroker/internal/keys"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// DefaultBatchSize is the rows Reencrypt and Verify handle per statement.
const DefaultBatchSize = pgstore.DefaultBatchSize

// ReencryptOptions, ReencryptProgress and ReencryptResult are pgstore's:
// the fields mean what they mean for keybroker's own table, counting the
// column's rows where pgstore counts secrets.
type (
	ReencryptOptions  = pgstore.ReencryptOptions
	ReencryptProgress = pgstore.ReencryptProgress
	ReencryptResult   = pgstore.ReencryptResult
)

// Reencrypt re-encrypts the column's values of project under a fresh data
// key of the column's scope, in place, for when a data key may have been
// exposed; the data keys of keybroker's own secrets and of other columns
// are not touched. Like pgstore.Store.Reencrypt it retires the project's
// keys of the scope (locked FOR UPDATE, so every writer's fence — the
// column's trigger reads the key FOR KEY SHARE — waits for it and then
// sees the retirement; writers holding a reservation on a retired key get
// ErrStaleKey and seal again), then in batches, each its own transaction,
// opens each row's value, seals it under the new key, checks that the new
// value opens to the same bytes, and updates the rows still holding the
// value read (one UPDATE ... WHERE value = old, so a row an application
// rewrote meanwhile is left to it). Only the value column changes.
// Finally it deletes every retired key of the scope that no row of the
// table references, checked by NOT EXISTS in the DELETE statement itself:
// what it encrypted can never be decrypted again. Every step is audited
// in key_events (dek.retire, dek.reencrypt, dek.destroy, with the column's
// scope in detail.column).
//
// A value that does not open fails the call naming its row (re-encrypting
// cannot save it; Verify lists them). Unsealed values are left alone
// (migrating them is MigrateLegacy's job). A failed or interrupted call
// leaves every row readable; run it again with Resume to finish. Run one
// Reencrypt per column and project at a time.
func (e *Encrypted) Reencrypt(ctx context.Context, project string, opts ReencryptOptions) (ReencryptResult, error) {
	var res ReencryptResult
	if err := e.ks.CheckProject(project); err != nil {
		return res, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	batch := opts.BatchSize
	if batch == 0 {
		batch = DefaultBatchSize
	}
	if batch < 1 {
		return res, fmt.Errorf("%w: batch size %d", ErrInvalidArgument, batch)
	}
	states := []string{"retired"}
	if !opts.Resume {
		states = append(states, "active", "spent")
	}
	scope := e.col.Scope()
	err := pgstore.WithProject(ctx, e.ks.Pool(), project, func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, `SELECT count(*) FROM `+e.quotedTable()+` t JOIN `+e.q()+`.data_keys d
  ON d.project_id = $2 AND d.scope = $3 AND d.state = ANY($4) AND `+e.refersTo("t", "d.id")+`
WHERE `+e.projectIs("t", "$1")+``, project, project, scope, states).Scan(&res.Pending)
	})
	if err != nil {
		return res, e.errorf("reencrypt", project, err)
	}
	if opts.DryRun {
		return res, nil
	}
	if !opts.Resume {
		err := pgstore.WithProject(ctx, e.ks.Pool(), project, func(tx pgx.Tx) error {
			// FOR UPDATE first: the fence reads the key FOR KEY SHARE,
			// which a non-key UPDATE alone would not make wait.
			if _, err := tx.Exec(ctx, `SELECT id FROM `+e.q()+`.data_keys WHERE project_id = $1 AND scope = $2 AND state IN ('active', 'spent') FOR UPDATE`, project, scope); err != nil {
				return err
			}
			ct, err := tx.Exec(ctx, `UPDATE `+e.q()+`.data_keys SET state = 'retired' WHERE project_id = $1 AND scope = $2 AND state IN ('active', 'spent')`, project, scope)
			if err != nil {
				return err
			}
			res.RetiredKeys = ct.RowsAffected()
			return e.ks.Event(ctx, tx, "dek.retire", project, nil, res.RetiredKeys, map[string]any{"reason": "reencrypt", "column": scope})
		})
		if err != nil {
			return res, e.errorf("reencrypt: retire data keys", project, err)
		}
		e.ks.DropReservation(project, scope)
	}
	deadline := time.Now().Add(opts.Wait)
	for pause := 10 * time.Millisecond; ; pause = min(2*pause, time.Second) {
		if err := e.reencryptPass(ctx, project, batch, &res, opts.Progress); err != nil {
			return res, err
		}
		destroyed, remaining, err := e.destroyRetired(ctx, project)
		res.DestroyedKeys += destroyed
		res.RemainingKeys = remaining
		if err != nil {
			return res, err
		}
		if remaining == 0 || !time.Now().Add(pause).Before(deadline) {
			return res, nil
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return res, ctx.Err()
		case <-t.C:
		}
	}
}

// q is keybroker's schema, quoted.
func (e *Encrypted) q() string { return pgx.Identifier{e.ks.Schema()}.Sanitize() }

func (e *Encrypted) errorf(what, project string, err error) error {
	return fmt.Errorf("pgcolumn: %s %s.%s of project %q: %w", what, e.col.Table, e.col.Value, project, err)
}

// projectIs is the condition that table alias t's row is of the project
// in parameter p (text), compared in the column's own type so that its
// index serves.
func (e *Encrypted) projectIs(t, p string) string {
	return t + "." + pgx.Identifier{e.col.Project}.Sanitize() + " = CAST(" + p + "::text AS " + e.projType + ")"
}

// refersTo is the condition that table alias t's value is sealed under
// data key id (a uuid expression); see fenceSQL for the offsets.
func (e *Encrypted) refersTo(t, id string) string {
	v := t + "." + pgx.Identifier{e.col.Value}.Sanitize()
	return "substring(" + v + " FROM 1 FOR 4) = 'KBEN'::bytea AND substring(" + v + " FROM 9 FOR 16) = uuid_send(" + id + ")"
}

// keyText lists table alias t's key columns as text, for SELECT.
func (e *Encrypted) keyText(t string) string {
	var b strings.Builder
	for i, k := range e.col.Key {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(t + "." + pgx.Identifier{k}.Sanitize() + "::text")
	}
	return b.String()
}

// keyOrder lists table alias t's key columns for ORDER BY.
func (e *Encrypted) keyOrder(t string) string {
	var b strings.Builder
	for i, k := range e.col.Key {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(t + "." + pgx.Identifier{k}.Sanitize())
	}
	return b.String()
}

// reencryptPass re-encrypts, batch by batch, the project's rows under
// retired data keys (keys.ReencryptPasses: until a read finds none or
// three batches in a row change nothing).
func (e *Encrypted) reencryptPass(ctx context.Context, project string, batch int, res *ReencryptResult, progress func(ReencryptProgress)) error {
	before := res.Reencrypted
	var report func(int64)
	if progress != nil {
		report = func(done int64) { progress(ReencryptProgress{Done: before + done, Total: res.Pending}) }
	}
	n, err := keys.ReencryptPasses(func() (int64, int64, error) { return e.reencryptBatch(ctx, project, batch) }, report)
	res.Reencrypted += n
	return err
}

// errStaleKey aborts a batch whose new data key the fence refused (retired
// or removed concurrently): it is redone under a fresh one.
var errStaleKey = errors.New("pgcolumn: new data key retired or removed concurrently")

func (e *Encrypted) reencryptBatch(ctx context.Context, project string, batch int) (read, n int64, err error) {
	for attempt := 1; ; attempt++ {
		read, n, err = e.reencryptOnce(ctx, project, batch)
		if !errors.Is(err, errStaleKey) {
			return read, n, err
		}
		e.ks.DropReservation(project, e.col.Scope())
		if attempt == maxWriteAttempts {
			return read, 0, fmt.Errorf("%w: reencrypt %s.%s of project %q: new data key retired or removed on each of %d attempts",
				ErrStaleKey, e.col.Table, e.col.Value, project, attempt)
		}
	}
}

// reencryptOnce re-encrypts up to batch rows still under retired keys and
// returns how many it read and how many it changed. It holds no lock while
// it decrypts and encrypts: the read takes none, and the update replaces
// only rows still holding the value read, under a new key the fence
// accepts then.
func (e *Encrypted) reencryptOnce(ctx context.Context, project string, batch int) (read, n int64, err error) {
	scope := e.col.Scope()
	nk := len(e.col.Key)
	var keys [][]string
	var olds [][]byte
	err = pgstore.WithProject(ctx, e.ks.Pool(), project, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `SELECT `+e.keyText("t")+`, t.`+pgx.Identifier{e.col.Value}.Sanitize()+` FROM `+e.quotedTable()+` t
WHERE `+e.projectIs("t", "$1")+` AND substring(t.`+pgx.Identifier{e.col.Value}.Sanitize()+` FROM 1 FOR 4) = 'KBEN'::bytea
  AND substring(t.`+pgx.Identifier{e.col.Value}.Sanitize()+` FROM 9 FOR 16) = ANY (SELECT uuid_send(d.id) FROM `+e.q()+`.data_keys d
      WHERE d.project_id = $2 AND d.scope = $3 AND d.state = 'retired')
ORDER BY `+e.keyOrder("t")+` LIMIT $4`, project, project, scope, batch)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			key := make([]string, nk)
			var old []byte
			dest := make([]any, 0, nk+1)
			for i := range key {
				dest = append(dest, &key[i])
			}
			if err := rows.Scan(append(dest, &old)...); err != nil {
				return err
			}
			keys, olds = append(keys, key), append(olds, old)
		}
		return rows.Err()
	})
	if err != nil || len(keys) == 0 {
		if err != nil {
			err = e.errorf("reencrypt", project, err)
		}
		return 0, 0, err
	}
	news := make([][]byte, len(keys))
	for i, key := range keys {
		pt, err := e.Open(ctx, project, key, olds[i])
		if err != nil {
			return 0, 0, fmt.Errorf("pgcolumn: reencrypt %s.%s of project %q: row %q: %w", e.col.Table, e.col.Value, project, key, err)
		}
		news[i], err = e.sealVerified(ctx, project, key, pt)
		provider.Clear(pt)
		if err != nil {
			return 0, 0, fmt.Errorf("pgcolumn: reencrypt %s.%s of project %q: row %q: %w", e.col.Table, e.col.Value, project, key, err)
		}
	}
	// One array per key column (transposed), then the old and new values.
	args := []any{project}
	cols := make([]string, 0, nk+2)
	conds := make([]string, 0, nk)
	for j, k := range e.col.Key {
		col := make([]string, len(keys))
		for i := range keys {
			col[i] = keys[i][j]
		}
		args = append(args, col)
		cols = append(cols, "$"+strconv.Itoa(len(args))+"::text[]")
		conds = append(conds, "t."+pgx.Identifier{k}.Sanitize()+" = CAST(u.k"+strconv.Itoa(j)+" AS "+e.keyTypes[j]+")")
	}
	args = append(args, olds, news)
	cols = append(cols, "$"+strconv.Itoa(nk+2)+"::bytea[]", "$"+strconv.Itoa(nk+3)+"::bytea[]")
	names := make([]string, 0, nk+2)
	for j := range nk {
		names = append(names, "k"+strconv.Itoa(j))
	}
	names = append(names, "old", "new")
	v := pgx.Identifier{e.col.Value}.Sanitize()
	update := `UPDATE ` + e.quotedTable() + ` t SET ` + v + ` = u.new
FROM unnest(` + strings.Join(cols, ", ") + `) AS u(` + strings.Join(names, ", ") + `)
WHERE ` + e.projectIs("t", "$1") + ` AND ` + strings.Join(conds, " AND ") + ` AND t.` + v + ` = u.old`
	err = pgstore.WithProject(ctx, e.ks.Pool(), project, func(tx pgx.Tx) error {
		ct, err := tx.Exec(ctx, update, args...)
		if err != nil {
			return err
		}
		if n = ct.RowsAffected(); n == 0 {
			return nil
		}
		return e.ks.Event(ctx, tx, "dek.reencrypt", project, nil, n, map[string]any{"column": scope})
	})
	if sqlstate(err) == SQLStateStaleKey {
		return int64(len(keys)), 0, errStaleKey
	}
	if err != nil {
		return int64(len(keys)), 0, e.errorf("reencrypt", project, err)
	}
	return int64(len(keys)), n, nil
}

// sealVerified seals pt for row key and checks that the result opens to
// pt through the same path Open takes.
func (e *Encrypted) sealVerified(ctx context.Context, project string, key []string, pt []byte) ([]byte, error) {
	sealed, err := e.Seal(ctx, project, key, pt)
	if err != nil {
		return nil, err
	}
	back, err := e.Open(ctx, project, key, sealed)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrVerify, err)
	}
	same := len(back) == len(pt) && subtle.ConstantTimeCompare(back, pt) == 1
	provider.Clear(back)
	if !same {
		return nil, ErrVerify
	}
	return sealed, nil
}

// destroyRetired deletes the project's retired data keys of the column's
// scope that no row of the table references, and counts those left. The
// NOT EXISTS is in the DELETE itself; a writer racing it is fenced (its
// trigger's FOR KEY SHARE of the key waits for the delete, then finds no
// row: KB005).
func (e *Encrypted) destroyRetired(ctx context.Context, project string) (destroyed, remaining int64, err error) {
	scope := e.col.Scope()
	var gone []pgtype.UUID
	err = pgstore.WithProject(ctx, e.ks.Pool(), project, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `DELETE FROM `+e.q()+`.data_keys d WHERE d.project_id = $1 AND d.scope = $2 AND d.state = 'retired'
AND NOT EXISTS (SELECT 1 FROM `+e.quotedTable()+` t WHERE `+e.projectIs("t", "$1")+` AND `+e.refersTo("t", "d.id")+`)
RETURNING d.id`, project, scope)
		if err != nil {
			return err
		}
		if gone, err = pgx.CollectRows(rows, pgx.RowTo[pgtype.UUID]); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM `+e.q()+`.data_keys WHERE project_id = $1 AND scope = $2 AND state = 'retired'`, project, scope).Scan(&remaining); err != nil {
			return err
		}
		for _, id := range gone {
			if err := e.ks.Event(ctx, tx, "dek.destroy", project, &id.Bytes, 1, map[string]any{"column": scope}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, 0, e.errorf("reencrypt: destroy retired data keys", project, err)
	}
	for _, id := range gone {
		e.ks.Uncache(project, id.Bytes)
	}
	return int64(len(gone)), remaining, nil
}

// sqlstate is err's SQLSTATE, or "".
func sqlstate(err error) string {
	var pe interface{ SQLState() string }
	if errors.As(err, &pe) {
		return pe.SQLState()
	}
	return ""
}
