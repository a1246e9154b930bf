package pgcolumn

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/legacy"
	"github.com/profullstack/keybroker/provider"
)

// DefaultMigrateBatch is MigrateOptions.BatchSize when zero.
const DefaultMigrateBatch = 1000

// MaxReportedRows bounds MigrateResult.UndecodableRows.
const MaxReportedRows = 100

// MigrateOptions configures MigrateLegacy.
type MigrateOptions struct {
	// Legacy decodes each unsealed value into the plaintext to seal:
	// legacy.NewChain(meshHookV1, legacy.Plaintext()) for a column holding
	// MeshHook v1 values and plaintext, legacy.Plaintext() for plaintext
	// only. Required.
	Legacy legacy.Decoder
	// BatchSize is the rows per transaction; DefaultMigrateBatch when zero.
	BatchSize int
	// StartAfter resumes after this row (MigrateProgress.Last of an earlier
	// run), in the order of the table's unique index on the project and
	// key columns. Optional: a run from the start finds only the values
	// still unsealed, so it is as correct, only a scan longer.
	StartAfter *RowRef
	// Progress, when set, is called after each committed batch.
	Progress func(MigrateProgress)
}

// MigrateProgress reports MigrateLegacy's progress.
type MigrateProgress struct {
	Done  int64  // unsealed rows handled so far by this call
	Total int64  // unsealed rows (after StartAfter) when the call started
	Last  RowRef // the last row of the last committed batch
}

// MigrateResult is what MigrateLegacy did.
type MigrateResult struct {
	Pending  int64 // unsealed values (after StartAfter) when the call started
	Migrated int64 // values sealed in place and verified
	// Changed counts rows whose value the application rewrote between the
	// batch's read and its update (sealed by new code, or a new legacy
	// value): left to the application, or to the next run.
	Changed int64
	// Undecodable counts values the decoder claimed but could not decode
	// (a broken or foreign v1 ciphertext), that no decoder claimed, or
	// that decoded to more than MaxValueLen bytes: left as they are.
	// UndecodableRows names the first MaxReportedRows of them.
	Undecodable     int64
	UndecodableRows []RowRef
	// Remaining counts the column's unsealed values when the call ended
	// (the undecodable ones, those written behind the run meanwhile);
	// RefuseLegacy succeeds only at zero.
	Remaining int64
	Last      *RowRef // the last row handled; nil when none was
}

// MigrateLegacy converts, in place, every unsealed value of the column —
// plaintext and legacy ciphertexts alike, decoded by opts.Legacy — into a
// sealed value, while the application keeps reading and writing.
//
// It walks the table by keyset over its unique index on the project and
// key columns, in batches, each one transaction: read the next rows whose
// value is unsealed (no row lock: the application is not held up), decode
// and Seal each, then one guarded UPDATE that sets a row's value only
// where it still holds the value read (a row the application rewrote
// meanwhile is left alone and counted in Changed). The rows the UPDATE
// returns — as stored, after the column's fence trigger accepted them —
// are opened again in the same transaction and compared with the decoded
// plaintext; any difference rolls the batch back with ErrVerify. Each
// batch records a column.migrate_legacy audit event (its count the values
// sealed) that commits with it. NOT NULL is kept: a value is only ever
// replaced by its sealed form, and no plaintext is written anywhere new
// (no temporary table, log line or error carries a value; errors and
// reports name rows by project and key only).
//
// It is stateless: killed at any point, it loses at most the uncommitted
// batch, and a rerun finds the values still unsealed. A value it cannot
// decode is left as it is and reported (Undecodable), and the walk goes
// on. Values the application writes behind the walk in legacy form are
// found by the next run; Remaining says how many there are.
//
// The old tuples holding the legacy values stay in the table's heap until
// VACUUM removes them (and in WAL and backups already taken); see
// docs/OPERATIONS.md. MigrateLegacy writes to many projects, so it needs a
// role that row-level security on data_keys does not restrict, with
// SELECT and UPDATE on the application table.
func (e *Encrypted) MigrateLegacy(ctx context.Context, opts MigrateOptions) (MigrateResult, error) {
	var res MigrateResult
	batch := opts.BatchSize
	if batch == 0 {
		batch = DefaultMigrateBatch
	}
	if batch < 1 || opts.Legacy == nil {
		return res, fmt.Errorf("%w: migrate: batch size %d (want >= 1) and a legacy decoder are required", ErrInvalidArgument, batch)
	}
	m, err := e.migrateSQL(ctx)
	if err != nil {
		return res, err
	}
	var after []string
	if opts.StartAfter != nil {
		if after, err = m.position(*opts.StartAfter); err != nil {
			return res, err
		}
	}
	q, args := m.countSQL(after)
	if err := e.ks.Pool().QueryRow(ctx, q, args...).Scan(&res.Pending); err != nil {
		return res, fmt.Errorf("pgcolumn: migrate %s.%s: count: %w", e.col.Table, e.col.Value, err)
	}
	for {
		br, err := e.migrateBatch(ctx, m, after, batch, opts.Legacy)
		if err != nil {
			return res, err
		}
		if br.rows == 0 {
			break
		}
		after = br.last
		res.Migrated += br.migrated
		res.Changed += br.changed
		res.Undecodable += int64(len(br.undecodable))
		for _, r := range br.undecodable {
			if len(res.UndecodableRows) < MaxReportedRows {
				res.UndecodableRows = append(res.UndecodableRows, m.ref(r))
			}
		}
		last := m.ref(br.last)
		res.Last = &last
		if opts.Progress != nil {
			opts.Progress(MigrateProgress{Done: res.Migrated + res.Changed + res.Undecodable, Total: res.Pending, Last: last})
		}
	}
	q, args = m.countSQL(nil)
	if err := e.ks.Pool().QueryRow(ctx, q, args...).Scan(&res.Remaining); err != nil {
		return res, fmt.Errorf("pgcolumn: migrate %s.%s: count: %w", e.col.Table, e.col.Value, err)
	}
	return res, nil
}

// migrateQueries are the statements of one column's migration. Rows are
// named by their index columns' values as text, in index order (order);
// projectAt and keyAt say where the project and each key column are.
type migrateQueries struct {
	e         *Encrypted
	order     []string // quoted column names, in the unique index's order
	types     []string // their SQL types
	projectAt int
	keyAt     []int
	// selHead, the keyset condition, selTail and a LIMIT parameter make
	// the batch read (concatenated: identifiers may hold any character).
	selHead, selTail string
	update           string
}

// ref turns index-ordered values into a RowRef.
func (m *migrateQueries) ref(vals []string) RowRef {
	r := RowRef{Project: vals[m.projectAt]}
	for _, i := range m.keyAt {
		r.Key = append(r.Key, vals[i])
	}
	return r
}

// position turns a RowRef into index-ordered values.
func (m *migrateQueries) position(r RowRef) ([]string, error) {
	if len(r.Key) != len(m.keyAt) {
		return nil, fmt.Errorf("%w: migrate: StartAfter has %d key values, the column %d", ErrInvalidArgument, len(r.Key), len(m.keyAt))
	}
	vals := make([]string, len(m.order))
	vals[m.projectAt] = r.Project
	for j, i := range m.keyAt {
		vals[i] = r.Key[j]
	}
	return vals, nil
}

// keyset is the condition "after vals" on the index columns, its
// parameters numbered from first.
func (m *migrateQueries) keyset(vals []string, first int) (string, []any) {
	if vals == nil {
		return "true", nil
	}
	var l, r []string
	var args []any
	for i, c := range m.order {
		l = append(l, "t."+c)
		r = append(r, "$"+strconv.Itoa(first+i)+"::"+m.types[i])
		args = append(args, vals[i])
	}
	return "(" + strings.Join(l, ", ") + ") > (" + strings.Join(r, ", ") + ")", args
}

func (m *migrateQueries) countSQL(after []string) (string, []any) {
	cond, args := m.keyset(after, 1)
	return `SELECT count(*) FROM ` + m.e.quotedTable() + ` AS t WHERE ` + m.e.unsealedSQL("t.") + ` AND ` + cond, args
}

// migrateSQL finds the unique index on the project and key columns (its
// column order makes the keyset walk an index scan) and builds the
// statements.
func (e *Encrypted) migrateSQL(ctx context.Context) (*migrateQueries, error) {
	want := append([]string{e.col.Project}, e.col.Key...)
	var order []string
	err := e.ks.Pool().QueryRow(ctx, `SELECT (SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, n)
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att)
FROM pg_index i
WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
  AND i.indnatts = cardinality($2::text[])
  AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text) FROM unnest(i.indkey::int2[]) k
       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k)
    = (SELECT array_agg(x ORDER BY x) FROM unnest($2::text[]) x)
ORDER BY i.indisprimary DESC, i.indexrelid LIMIT 1`, e.quotedTable(), want).Scan(&order)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("%w: %s has no unique index on exactly (%s) any more", ErrNotDeclared, e.col.Table, strings.Join(want, ", "))
	}
	if err != nil {
		return nil, fmt.Errorf("pgcolumn: migrate %s.%s: look up its unique index: %w", e.col.Table, e.col.Value, err)
	}
	m := &migrateQueries{e: e, keyAt: make([]int, len(e.col.Key))}
	typeOf := map[string]string{e.col.Project: e.projType}
	for i, k := range e.col.Key {
		typeOf[k] = e.keyTypes[i]
	}
	for i, name := range order {
		m.order = append(m.order, pgx.Identifier{name}.Sanitize())
		m.types = append(m.types, typeOf[name])
		if name == e.col.Project {
			m.projectAt = i
		}
		if j := slices.Index(e.col.Key, name); j >= 0 {
			m.keyAt[j] = i
		}
	}
	v := pgx.Identifier{e.col.Value}.Sanitize()
	var texts []string
	for _, c := range m.order {
		texts = append(texts, "t."+c+"::text")
	}
	m.selHead = `SELECT ` + strings.Join(texts, ", ") + `, t.` + v + ` FROM ` + e.quotedTable() + ` AS t WHERE ` + e.unsealedSQL("t.") + ` AND `
	m.selTail = ` ORDER BY ` + strings.Join(prefixAll("t.", m.order), ", ") + ` LIMIT `
	// unnest's arrays: the index columns (as text), the old value, the new.
	var arrays, aliases, match []string
	for i, c := range m.order {
		arrays = append(arrays, "$"+strconv.Itoa(i+1)+"::text[]")
		aliases = append(aliases, "c"+strconv.Itoa(i))
		match = append(match, "t."+c+" = u.c"+strconv.Itoa(i)+"::"+m.types[i])
	}
	n := len(m.order)
	arrays = append(arrays, "$"+strconv.Itoa(n+1)+"::bytea[]", "$"+strconv.Itoa(n+2)+"::bytea[]")
	m.update = `UPDATE ` + e.quotedTable() + ` AS t SET ` + v + ` = u.new
FROM unnest(` + strings.Join(arrays, ", ") + `) AS u(` + strings.Join(aliases, ", ") + `, old, new)
WHERE ` + strings.Join(match, " AND ") + ` AND t.` + v + ` = u.old
RETURNING ` + strings.Join(texts, ", ") + `, t.` + v
	return m, nil
}

func prefixAll(p string, ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = p + s
	}
	return out
}

// migrateBatchResult is what one committed batch did.
type migrateBatchResult struct {
	rows              int
	migrated, changed int64
	undecodable       [][]string // index-ordered values of the rows left alone
	last              []string
}

// maxMigrateAttempts bounds how often a batch is redone after the fence
// refused a value because its data key was retired meanwhile.
const maxMigrateAttempts = 4

// migrateBatch migrates the rows after after, redoing the batch under
// fresh reservations when the fence trigger refused a value sealed under
// a data key retired meanwhile (a concurrent Reencrypt).
func (e *Encrypted) migrateBatch(ctx context.Context, m *migrateQueries, after []string, batch int, dec legacy.Decoder) (migrateBatchResult, error) {
	for attempt := 1; ; attempt++ {
		br, projects, err := e.migrateOnce(ctx, m, after, batch, dec)
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != SQLStateStaleKey {
			return br, err
		}
		for p := range projects {
			e.ks.DropReservation(p, e.col.Scope())
		}
		if attempt == maxMigrateAttempts {
			return br, fmt.Errorf("%w: migrate %s.%s: data keys retired on each of %d attempts", ErrStaleKey, e.col.Table, e.col.Value, attempt)
		}
	}
}

// pending is one row of a batch.
type pending struct {
	vals        []string // index columns as text
	old, sealed []byte
	plaintext   []byte
}

func (e *Encrypted) migrateOnce(ctx context.Context, m *migrateQueries, after []string, batch int, dec legacy.Decoder) (br migrateBatchResult, projects map[string]bool, err error) {
	fail := func(what string, err error) (migrateBatchResult, map[string]bool, error) {
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == SQLStateStaleKey {
			return br, projects, err // migrateBatch redoes the batch
		}
		return br, projects, fmt.Errorf("pgcolumn: migrate %s.%s: %s: %w", e.col.Table, e.col.Value, what, err)
	}
	tx, err := e.ks.Pool().Begin(ctx)
	if err != nil {
		return fail("begin", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	cond, args := m.keyset(after, 1)
	rows, err := tx.Query(ctx, m.selHead+cond+m.selTail+"$"+strconv.Itoa(len(args)+1), append(args, batch)...)
	if err != nil {
		return fail("read", err)
	}
	var batchRows []*pending
	defer func() {
		for _, p := range batchRows {
			provider.Clear(p.old)
			provider.Clear(p.plaintext)
		}
	}()
	n := len(m.order)
	for rows.Next() {
		p := &pending{vals: make([]string, n)}
		dst := make([]any, n+1)
		for i := range p.vals {
			dst[i] = &p.vals[i]
		}
		dst[n] = &p.old
		if err := rows.Scan(dst...); err != nil {
			rows.Close()
			return fail("read", err)
		}
		batchRows = append(batchRows, p)
	}
	if err := rows.Err(); err != nil {
		return fail("read", err)
	}
	if len(batchRows) == 0 {
		return br, nil, nil
	}
	br.rows, br.last = len(batchRows), batchRows[len(batchRows)-1].vals
	projects = map[string]bool{}
	byRow := make(map[string]*pending, len(batchRows))
	var cols = make([][]string, n)
	var olds, news [][]byte
	for _, p := range batchRows {
		pt, err := decodeLegacy(dec, p.old)
		if errors.Is(err, envelope.ErrDecrypt) {
			br.undecodable = append(br.undecodable, p.vals)
			continue
		}
		if err != nil {
			return fail("legacy decoder", err)
		}
		p.plaintext = pt
		ref := m.ref(p.vals)
		if p.sealed, err = e.Seal(ctx, ref.Project, ref.Key, pt); err != nil {
			return fail("seal row "+rowName(ref), err)
		}
		projects[ref.Project] = true
		byRow[rowID(p.vals)] = p
		for i, v := range p.vals {
			cols[i] = append(cols[i], v)
		}
		olds, news = append(olds, p.old), append(news, p.sealed)
	}
	if len(olds) > 0 {
		uargs := make([]any, 0, n+2)
		for _, c := range cols {
			uargs = append(uargs, c)
		}
		uargs = append(uargs, olds, news)
		back, err := tx.Query(ctx, m.update, uargs...)
		if err != nil {
			return fail("update", err)
		}
		vals := make([]string, n)
		var stored []byte
		dst := make([]any, n+1)
		for i := range vals {
			dst[i] = &vals[i]
		}
		dst[n] = &stored
		var verr error
		_, err = pgx.ForEachRow(back, dst, func() error {
			p := byRow[rowID(vals)]
			if p == nil {
				return fmt.Errorf("update returned a row it was not given") // cannot happen: the WHERE matches given rows only
			}
			// Read back as stored and opened under the row's own context:
			// the value is bound to where it now lives.
			ref := m.ref(vals)
			pt, err := e.Open(ctx, ref.Project, ref.Key, stored)
			switch {
			case errors.Is(err, envelope.ErrDecrypt) || err == nil && (len(pt) != len(p.plaintext) || subtle.ConstantTimeCompare(pt, p.plaintext) != 1):
				verr = fmt.Errorf("%w: %s.%s row %s: the stored value does not open to the decoded plaintext; batch rolled back", ErrVerify, e.col.Table, e.col.Value, rowName(ref))
			case err != nil:
				verr = err
			}
			provider.Clear(pt)
			if verr != nil {
				return verr
			}
			br.migrated++
			return nil
		})
		if errors.Is(err, ErrVerify) {
			return br, projects, err
		}
		if err != nil {
			return fail("update", err)
		}
		br.changed = int64(len(olds)) - br.migrated
	}
	if err := e.ks.Event(ctx, tx, "column.migrate_legacy", "", nil, br.migrated, map[string]any{
		"column": e.col.Scope(), "rows": br.rows, "changed": br.changed, "undecodable": len(br.undecodable),
	}); err != nil {
		return fail("audit", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fail("commit", err)
	}
	return br, projects, nil
}

// decodeLegacy decodes one stored value for the migration: envelope.ErrDecrypt
// for a value to leave alone (claimed but broken, claimed by no decoder,
// over the bounds), any other error for a decoder that cannot work.
func decodeLegacy(dec legacy.Decoder, stored []byte) ([]byte, error) {
	if len(stored) > maxLegacyStoredLen {
		return nil, envelope.ErrDecrypt
	}
	pt, ok, err := dec.Decode(stored)
	switch {
	case errors.Is(err, envelope.ErrDecrypt):
		return nil, envelope.ErrDecrypt
	case err != nil:
		return nil, err
	case !ok || len(pt) > MaxValueLen:
		provider.Clear(pt)
		return nil, envelope.ErrDecrypt
	}
	return pt, nil
}

// rowID is a map key for index-ordered values.
func rowID(vals []string) string {
	var b strings.Builder
	for _, v := range vals {
		b.WriteString(strconv.Itoa(len(v)))
		b.WriteByte(':')
		b.WriteString(v)
	}
	return b.String()
}

// rowName names a row in an error: project and key, never a value.
func rowName(r RowRef) string {
	return strconv.Quote(r.Project) + "/" + strconv.Quote(strings.Join(r.Key, "/"))
}
