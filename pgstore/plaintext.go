package pgstore

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"golang.org/x/sync/errgroup"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/legacy"
	"github.com/profullstack/keybroker/provider"
)

// PlaintextSource names an existing table of plaintext secrets to migrate.
// Identifiers are taken literally (case-sensitive, quoted), never as SQL.
type PlaintextSource struct {
	// Table is "table" (found through the search_path) or "schema.table".
	Table string
	// KeyColumn orders the rows and lets a run resume: it must have a
	// single-column unique index (a primary key, typically).
	KeyColumn string
	// ProjectColumn and NameColumn give each secret's project id and name
	// (any type; converted to text).
	ProjectColumn, NameColumn string
	// ValueColumn holds the plaintext: bytea, or text/varchar (migrated as
	// its UTF-8 bytes). NULL values are skipped: that is what
	// ClearPlaintext leaves behind.
	ValueColumn string
}

// MigrateOptions configures MigratePlaintext.
type MigrateOptions struct {
	// BatchSize is the rows per transaction; DefaultBatchSize when zero.
	// Source rows of a batch stay locked until it commits.
	BatchSize int
	// ClearPlaintext sets ValueColumn to NULL, in the same transaction, for
	// each row whose secret is stored and verified. A NOT NULL ValueColumn
	// is refused (ErrSource) before any write.
	ClearPlaintext bool
	// DryRun validates the source and counts rows, and changes nothing.
	DryRun bool
	// StartAfter resumes after this key (as text, from MigrateProgress).
	// Optional: a run from the start is idempotent too, only slower.
	StartAfter string
	// Workers is how many batches run at once, each worker on its own
	// range of keys (split evenly when the call starts); 1 when zero.
	// With more than one, LastKey is not reported.
	Workers int
	// Progress, when set, is called after each committed batch.
	Progress func(MigrateProgress)
	// Legacy, when set, decodes each stored value into the plaintext to
	// store (legacy.Open("meshhook-v1://env/SECRETS_ENCRYPTION_KEY")
	// chained before legacy.Plaintext(), say); nil stores the value's
	// bytes as they are. A value the decoder claims but cannot decode (a
	// broken or foreign-key v1 ciphertext), that no decoder claims, or
	// that decodes to more than MaxValueLen bytes is left alone, plaintext
	// or ciphertext kept, and reported in Undecodable. The verification
	// compares the stored secret with the decoded plaintext.
	Legacy legacy.Decoder
}

// MigrateProgress reports MigratePlaintext's progress.
type MigrateProgress struct {
	Done    int64  // source rows processed so far by this call
	Total   int64  // source rows with a value (after StartAfter) when the call started
	LastKey string // key (as text) of the last row committed; empty with Workers > 1
}

// MigrateResult is what MigratePlaintext did, or (DryRun) would do.
type MigrateResult struct {
	Pending        int64 // source rows with a value (after StartAfter) when the call started
	Migrated       int64 // secrets written from source rows
	AlreadyPresent int64 // source rows whose secret was already stored with the same value
	Conflicts      int64 // source rows whose secret is stored with another value (or does not decrypt): left alone, plaintext kept
	// ConflictRows names the first MaxConflictRows conflicting rows found
	// (in key order with one worker); Conflicts counts them all.
	ConflictRows []MigrateConflict
	// Undecodable counts source rows left alone because opts.Legacy
	// could not decode their value; UndecodableRows names the first
	// MaxConflictRows of them (never a value).
	Undecodable     int64
	UndecodableRows []MigrateConflict
	Cleared         int64  // source values set to NULL
	LastKey         string // key (as text) of the last row handled; empty with Workers > 1
}

// MaxConflictRows bounds MigrateResult.ConflictRows.
const MaxConflictRows = 100

// MigrateConflict names a source row left alone because its secret is
// already stored with another value. It never carries a value.
type MigrateConflict struct {
	Key, Project, Name string // the row's key column (as text), project and name
}

// MigratePlaintext encrypts the plaintext secrets of an existing table into
// encrypted_secrets. It first checks that the table and columns exist, that
// the value column's type is usable (and, with ClearPlaintext, nullable),
// the key column unique, and that no row with a value lacks a valid project
// or name; any problem is one error matching ErrSource, before any write.
//
// Rows are read in key order (keyset pagination, so the table is never
// locked as a whole) in batches, each one transaction: encrypt each value
// under its project's data key, insert (an existing secret is never
// overwritten), read back what is stored and decrypt it, and only if it
// equals the source bytes count the row as migrated (and, with
// ClearPlaintext, NULL the source value). A mismatch on a row this batch
// wrote aborts the batch with ErrVerify. Each batch records its
// migrate.plaintext event (count: the secrets it wrote) in its own
// transaction. Re-running is safe at any point: rows already stored with
// the same value count as AlreadyPresent.
//
// MigratePlaintext writes to many projects, so it needs a role that
// row-level security does not restrict.
func (s *Store) MigratePlaintext(ctx context.Context, src PlaintextSource, opts MigrateOptions) (MigrateResult, error) {
	var res MigrateResult
	batch := opts.BatchSize
	if batch == 0 {
		batch = DefaultBatchSize
	}
	if batch < 1 || opts.Workers < 0 {
		return res, fmt.Errorf("%w: batch size %d, workers %d", ErrInvalidArgument, batch, opts.Workers)
	}
	// A legacy ciphertext is longer than its plaintext: the decoded length
	// is checked after decoding.
	bound := MaxValueLen
	if opts.Legacy != nil {
		bound = maxLegacyStoredLen
	}
	m, err := s.plaintextSQL(ctx, src, opts.ClearPlaintext, bound)
	if err != nil {
		return res, err
	}
	// Counted after StartAfter, as the batches read, so that a resumed
	// run's progress ends at Total.
	count, countArgs := m.count, []any{}
	if opts.StartAfter != "" {
		count, countArgs = count+fmt.Sprintf(` AND %s > $1::%s`, m.key, m.keyType), append(countArgs, opts.StartAfter)
	}
	if err := s.pool.QueryRow(ctx, count, countArgs...).Scan(&res.Pending); err != nil {
		return res, fmt.Errorf("pgstore: migrate plaintext: %w", err)
	}
	var badKey pgtype.Text
	if err := s.pool.QueryRow(ctx, m.bad).Scan(&badKey); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return res, fmt.Errorf("pgstore: migrate plaintext: %w", err)
	}
	if badKey.Valid {
		return res, fmt.Errorf("%w: row with %s %q: project or name is NULL, empty or too long (%d, %d bytes at most), or value exceeds %d bytes",
			ErrSource, src.KeyColumn, badKey.String, MaxProjectLen, MaxNameLen, bound)
	}
	if opts.DryRun {
		return res, nil
	}
	ranges := []keyRange{{lo: opts.StartAfter, hasLo: opts.StartAfter != ""}}
	if opts.Workers > 1 {
		if ranges, err = s.splitKeys(ctx, m, ranges[0], opts.Workers); err != nil {
			return res, err
		}
	}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	for _, r := range ranges {
		g.Go(func() error {
			for {
				br, err := s.migrateBatch(gctx, m, src.Table, r, batch, opts.ClearPlaintext, opts.Legacy)
				if err != nil || br.n == 0 {
					return err
				}
				r.lo, r.hasLo = br.last, true
				mu.Lock()
				res.Migrated += br.migrated
				res.AlreadyPresent += br.present
				res.Conflicts += br.conflicts
				res.ConflictRows = append(res.ConflictRows, br.conflictRows[:min(len(br.conflictRows), MaxConflictRows-len(res.ConflictRows))]...)
				res.Undecodable += br.undecodable
				res.UndecodableRows = append(res.UndecodableRows, br.undecodableRows[:min(len(br.undecodableRows), MaxConflictRows-len(res.UndecodableRows))]...)
				res.Cleared += br.cleared
				if len(ranges) == 1 {
					res.LastKey = br.last
				}
				p := MigrateProgress{Done: res.Migrated + res.AlreadyPresent + res.Conflicts + res.Undecodable, Total: res.Pending, LastKey: res.LastKey}
				s.log.Info("pgstore: migrated plaintext batch", "rows", br.n, "done", p.Done, "last_key", p.LastKey)
				if opts.Progress != nil {
					opts.Progress(p)
				}
				mu.Unlock()
			}
		})
	}
	if err := g.Wait(); err != nil {
		return res, err
	}
	return res, nil
}

// plaintextQueries are the statements for one validated source.
type plaintextQueries struct {
	count, bad string
	// sel reads rows with a value; selectSQL adds key bounds and tail.
	sel, key, keyType, tail string
	// split has a %s for an optional lower bound ($2).
	split string
	clear string
}

// keyRange is a range of source keys (as text): (lo, hi], each bound
// optional.
type keyRange struct {
	lo, hi       string
	hasLo, hasHi bool
}

// selectSQL returns the batch query for r and its arguments: the limit
// (args[0], for the caller to set), then lo and hi when present.
func (m *plaintextQueries) selectSQL(r keyRange) (string, []any) {
	q, args := m.sel, []any{nil}
	if r.hasLo {
		args = append(args, r.lo)
		q += fmt.Sprintf(` AND src.%s > $%d::%s`, m.key, len(args), m.keyType)
	}
	if r.hasHi {
		args = append(args, r.hi)
		q += fmt.Sprintf(` AND src.%s <= $%d::%s`, m.key, len(args), m.keyType)
	}
	return q + m.tail, args
}

// splitKeys divides r (unbounded above) into up to n ranges holding about
// as many rows with a value each. The last stays unbounded above, so rows
// added meanwhile are not missed.
func (s *Store) splitKeys(ctx context.Context, m *plaintextQueries, r keyRange, n int) ([]keyRange, error) {
	sql, args := fmt.Sprintf(m.split, ""), []any{n}
	if r.hasLo {
		sql, args = fmt.Sprintf(m.split, fmt.Sprintf(` AND src.%s > $2::%s`, m.key, m.keyType)), append(args, r.lo)
	}
	rows, err := s.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("pgstore: migrate plaintext: split keys: %w", err)
	}
	bounds, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("pgstore: migrate plaintext: split keys: %w", err)
	}
	var out []keyRange
	for _, b := range bounds[:max(len(bounds)-1, 0)] {
		r.hi, r.hasHi = b, true
		out = append(out, r)
		r = keyRange{lo: b, hasLo: true}
	}
	return append(out, r), nil
}

// maxLegacyStoredLen bounds a stored value that a legacy decoder reads:
// room for a base64 encoding of MaxValueLen bytes and a header.
const maxLegacyStoredLen = MaxValueLen/3*4 + 4 + 1024

// plaintextSQL validates src against the catalog and builds the
// statements; rows whose value is over bound bytes are bad.
func (s *Store) plaintextSQL(ctx context.Context, src PlaintextSource, clear bool, bound int) (*plaintextQueries, error) {
	parts := strings.Split(src.Table, ".")
	if len(parts) > 2 {
		return nil, fmt.Errorf("%w: table %q: want table or schema.table", ErrSource, src.Table)
	}
	for _, name := range append(parts, src.KeyColumn, src.ProjectColumn, src.NameColumn, src.ValueColumn) {
		if name == "" || len(name) > 63 || !utf8.ValidString(name) || strings.ContainsRune(name, 0) {
			return nil, fmt.Errorf("%w: identifier %q must be 1..63 bytes of UTF-8 (table %q, columns key %q, project %q, name %q, value %q)",
				ErrSource, name, src.Table, src.KeyColumn, src.ProjectColumn, src.NameColumn, src.ValueColumn)
		}
	}
	table := pgx.Identifier(parts).Sanitize()
	var oid pgtype.Uint32
	if err := s.pool.QueryRow(ctx, `SELECT c.oid FROM pg_class c WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')`, table).Scan(&oid); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, fmt.Errorf("%w: table %q does not exist", ErrSource, src.Table)
		}
		return nil, fmt.Errorf("pgstore: migrate plaintext: %w", err)
	}
	type column struct {
		typ     string // format_type, for casts
		unique  bool
		notNull bool
	}
	cols := map[string]column{}
	rows, err := s.pool.Query(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod),
  EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indnkeyatts = 1
          AND i.indkey[0] = a.attnum AND i.indpred IS NULL), a.attnotnull
FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped`, oid)
	if err != nil {
		return nil, fmt.Errorf("pgstore: migrate plaintext: %w", err)
	}
	var name string
	var c column
	if _, err := pgx.ForEachRow(rows, []any{&name, &c.typ, &c.unique, &c.notNull}, func() error { cols[name] = c; return nil }); err != nil {
		return nil, fmt.Errorf("pgstore: migrate plaintext: %w", err)
	}
	for _, want := range []struct{ role, name string }{{"key", src.KeyColumn}, {"project", src.ProjectColumn}, {"name", src.NameColumn}, {"value", src.ValueColumn}} {
		if _, ok := cols[want.name]; !ok {
			return nil, fmt.Errorf("%w: table %q has no %s column %q", ErrSource, src.Table, want.role, want.name)
		}
	}
	key, val := cols[src.KeyColumn], cols[src.ValueColumn]
	if !key.unique {
		return nil, fmt.Errorf("%w: key column %q of table %q needs a single-column unique index (for example the primary key)", ErrSource, src.KeyColumn, src.Table)
	}
	if clear && val.notNull {
		// Checked here, before any write: the first batch's UPDATE would
		// fail after its data keys were made.
		return nil, fmt.Errorf("%w: value column %q of table %q is NOT NULL, so clearing the plaintext cannot set it to NULL", ErrSource, src.ValueColumn, src.Table)
	}
	q := func(col string) string { return pgx.Identifier{col}.Sanitize() }
	k, p, n, v := q(src.KeyColumn), q(src.ProjectColumn), q(src.NameColumn), q(src.ValueColumn)
	var valueBytes string
	switch {
	case val.typ == "bytea":
		valueBytes = v
	case val.typ == "text" || strings.HasPrefix(val.typ, "character varying") || strings.HasPrefix(val.typ, "character("):
		valueBytes = "convert_to(" + v + ", 'UTF8')"
	default:
		return nil, fmt.Errorf("%w: value column %q of table %q has type %s; want bytea or text", ErrSource, src.ValueColumn, src.Table, val.typ)
	}
	lock := "FOR SHARE"
	if clear {
		lock = "FOR NO KEY UPDATE"
	}
	// ORDER BY names src's column: a bare name would mean the text output.
	sel := `SELECT ` + k + `::text, ` + p + `::text, ` + n + `::text, ` + valueBytes + ` FROM ` + table + ` AS src WHERE ` + v + ` IS NOT NULL`
	tail := ` ORDER BY src.` + k + ` LIMIT $1 ` + lock
	return &plaintextQueries{
		count: `SELECT count(*) FROM ` + table + ` WHERE ` + v + ` IS NOT NULL`,
		bad: fmt.Sprintf(`SELECT %[1]s::text FROM %[2]s AS src WHERE %[3]s IS NOT NULL AND (%[4]s IS NULL OR %[5]s IS NULL
  OR octet_length(%[4]s::text) NOT BETWEEN 1 AND %[6]d OR octet_length(%[5]s::text) NOT BETWEEN 1 AND %[7]d
  OR octet_length(%[3]s) > %[8]d) ORDER BY src.%[1]s LIMIT 1`, k, table, v, p, n, MaxProjectLen, MaxNameLen, bound),
		sel:     sel,
		key:     k,
		keyType: key.typ,
		tail:    tail,
		split: `SELECT max(src.` + k + `)::text FROM (SELECT src.` + k + `, ntile($1) OVER (ORDER BY src.` + k + `) AS kb_tile FROM ` + table +
			` AS src WHERE ` + v + ` IS NOT NULL%s) AS src GROUP BY src.kb_tile ORDER BY max(src.` + k + `)`,
		clear: `UPDATE ` + table + ` SET ` + v + ` = NULL WHERE ` + k + ` = ANY($1::text[]::` + key.typ + `[])`,
	}, nil
}

type secretID struct{ project, name string }

// batchResult is what one migrateBatch committed.
type batchResult struct {
	n                                     int
	migrated, present, conflicts, cleared int64
	conflictRows                          []MigrateConflict // at most MaxConflictRows
	undecodable                           int64
	undecodableRows                       []MigrateConflict // at most MaxConflictRows
	last                                  string
}

// migrateBatch migrates the first rows of r in one transaction, redoing it
// under fresh data key reservations when a project's data key was retired
// or removed under it.
func (s *Store) migrateBatch(ctx context.Context, m *plaintextQueries, table string, r keyRange, batch int, clear bool, dec legacy.Decoder) (batchResult, error) {
	for attempt := 1; ; attempt++ {
		br, err := s.migrateOnce(ctx, m, table, r, batch, clear, dec)
		if !errors.Is(err, errStaleKey) {
			return br, err
		}
		if attempt == maxWriteAttempts {
			return br, fmt.Errorf("%w: migrate plaintext: data keys retired or removed on each of %d attempts", ErrNoActiveKey, attempt)
		}
	}
}

func (s *Store) migrateOnce(ctx context.Context, m *plaintextQueries, table string, r keyRange, batch int, clear bool, dec legacy.Decoder) (batchResult, error) {
	var br batchResult
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return br, fmt.Errorf("pgstore: migrate plaintext: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	sql, args := m.selectSQL(r)
	args[0] = batch
	rows, err := tx.Query(ctx, sql, args...)
	if err != nil {
		return br, fmt.Errorf("pgstore: migrate plaintext: read source: %w", err)
	}
	var keys, projects, names []string
	var values [][]byte
	var key, project, name string
	var value []byte
	if _, err := pgx.ForEachRow(rows, []any{&key, &project, &name, &value}, func() error {
		keys, projects, names, values = append(keys, key), append(projects, project), append(names, name), append(values, value)
		value = nil
		return nil
	}); err != nil {
		return br, fmt.Errorf("pgstore: migrate plaintext: read source: %w", err)
	}
	defer func() {
		for _, v := range values {
			provider.Clear(v)
		}
	}()
	if len(keys) == 0 {
		return br, nil
	}
	last := keys[len(keys)-1]
	var undecodable int64
	var undecodableRows []MigrateConflict
	if dec != nil {
		if keys, projects, names, values, undecodable, undecodableRows, err = decodeRows(dec, keys, projects, names, values); err != nil {
			return br, err
		}
		for _, u := range undecodableRows {
			s.log.Warn("pgstore: migrate plaintext: value does not decode; source row left alone", "key", u.Key, "project", u.Project, "name", u.Name)
		}
		if len(keys) == 0 {
			if err := s.event(ctx, tx, "migrate.plaintext", "", 0, nil, 0, map[string]any{"table": table, "rows": undecodable, "undecodable": undecodable}); err != nil {
				return br, err
			}
			if err := tx.Commit(ctx); err != nil {
				return br, fmt.Errorf("pgstore: migrate plaintext: commit: %w", err)
			}
			return batchResult{n: int(undecodable), undecodable: undecodable, undecodableRows: undecodableRows, last: last}, nil
		}
	}
	blobs := make([][]byte, len(keys))
	nonces := make([][]byte, len(keys))
	ids := make([]pgtype.UUID, len(keys))
	for i := range keys {
		id, blob, nonce, err := s.seal(ctx, projects[i], secretsScope, values[i], secretAAD(projects[i], names[i]))
		if err != nil {
			return br, fmt.Errorf("pgstore: migrate plaintext: row %q: %w", keys[i], err)
		}
		blobs[i], nonces[i], ids[i] = blob, nonce, uuidParam(id)
	}
	// RETURNING gives back each inserted row as stored; rows that were
	// already there (or duplicates within the batch) are read afterwards.
	type stored struct {
		blob, nonce []byte
		id          pgtype.UUID
	}
	inserted := map[secretID]bool{}
	now := map[secretID]*stored{}
	var st stored
	scan := func() error {
		c := st
		now[secretID{project, name}] = &c
		return nil
	}
	// Put's fence: a row is inserted only under a data key that is not
	// retired when the statement runs (see Store.put).
	ins, err := tx.Query(ctx, `INSERT INTO `+s.q+`.encrypted_secrets (project_id, name, encrypted_data, nonce, data_key_id)
SELECT u.p, u.n, u.b, u.nc, d.id FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::uuid[]) WITH ORDINALITY AS u(p, n, b, nc, k, i)
JOIN `+s.q+`.data_keys d ON d.id = u.k AND d.project_id = u.p AND d.state <> 'retired'
ORDER BY u.i FOR KEY SHARE OF d
ON CONFLICT (project_id, name) DO NOTHING RETURNING project_id, name, encrypted_data, nonce, data_key_id`, projects, names, blobs, nonces, ids)
	if err != nil {
		return br, fmt.Errorf("pgstore: migrate plaintext: insert: %w", err)
	}
	if _, err := pgx.ForEachRow(ins, []any{&project, &name, &st.blob, &st.nonce, &st.id}, scan); err != nil {
		return br, fmt.Errorf("pgstore: migrate plaintext: insert: %w", err)
	}
	for sid := range now {
		inserted[sid] = true
	}
	if len(inserted) < len(keys) {
		var ps, ns []string
		for i := range keys {
			if sid := (secretID{projects[i], names[i]}); !inserted[sid] {
				ps, ns = append(ps, sid.project), append(ns, sid.name)
			}
		}
		back, err := tx.Query(ctx, `SELECT s.project_id, s.name, s.encrypted_data, s.nonce, s.data_key_id
FROM unnest($1::text[], $2::text[]) AS u(p, n)
JOIN `+s.q+`.encrypted_secrets s ON s.project_id = u.p AND s.name = u.n`, ps, ns)
		if err != nil {
			return br, fmt.Errorf("pgstore: migrate plaintext: read existing: %w", err)
		}
		if _, err := pgx.ForEachRow(back, []any{&project, &name, &st.blob, &st.nonce, &st.id}, scan); err != nil {
			return br, fmt.Errorf("pgstore: migrate plaintext: read existing: %w", err)
		}
	}
	stale := false
	for i := range keys {
		if now[secretID{projects[i], names[i]}] == nil { // neither inserted nor there: the fence refused it
			s.dropReservation(projects[i], secretsScope)
			stale = true
		}
	}
	if stale {
		return br, errStaleKey
	}
	var clearKeys []string
	var migrated, present, conflicts int64
	var conflictRows []MigrateConflict
	for i := range keys {
		sid := secretID{projects[i], names[i]}
		cur := now[sid]
		var same bool
		if cur != nil {
			pt, err := s.open(ctx, sid.project, cur.id.Bytes, nil, cur.blob, cur.nonce, secretAAD(sid.project, sid.name))
			if err != nil && !errors.Is(err, envelope.ErrDecrypt) {
				// A lost connection or an unreachable key service says
				// nothing about the stored secret: fail the batch rather
				// than count the row as a conflict.
				return br, fmt.Errorf("pgstore: migrate plaintext: read back row %q: %w", keys[i], err)
			}
			same = err == nil && len(pt) == len(values[i]) && subtle.ConstantTimeCompare(pt, values[i]) == 1
			provider.Clear(pt)
		}
		switch {
		case inserted[sid] && !same:
			return br, fmt.Errorf("%w: row %q: stored ciphertext does not decrypt to the source value; batch rolled back", ErrVerify, keys[i])
		case inserted[sid]:
			migrated++
			delete(inserted, sid) // a duplicate (project, name) later in the batch compares as present
		case same:
			present++
		default:
			conflicts++
			if len(conflictRows) < MaxConflictRows {
				conflictRows = append(conflictRows, MigrateConflict{Key: keys[i], Project: sid.project, Name: sid.name})
			}
			s.log.Warn("pgstore: migrate plaintext: secret already stored with another value; source row left alone", "key", keys[i], "project", sid.project, "name", sid.name)
			continue
		}
		clearKeys = append(clearKeys, keys[i])
	}
	var cleared int64
	if clear && len(clearKeys) > 0 {
		ct, err := tx.Exec(ctx, m.clear, clearKeys)
		if err != nil {
			return br, fmt.Errorf("pgstore: migrate plaintext: clear source: %w", err)
		}
		cleared = ct.RowsAffected()
	}
	// The audit event commits with the batch, so a killed run leaves one
	// per committed batch, its count the secrets it wrote.
	detail := map[string]any{"table": table, "rows": int64(len(keys)) + undecodable, "already_present": present, "conflicts": conflicts, "cleared": cleared}
	if dec != nil {
		detail["undecodable"] = undecodable
	}
	if err := s.event(ctx, tx, "migrate.plaintext", "", 0, nil, migrated, detail); err != nil {
		return br, err
	}
	if err := tx.Commit(ctx); err != nil {
		return br, fmt.Errorf("pgstore: migrate plaintext: commit: %w", err)
	}
	return batchResult{n: len(keys) + int(undecodable), migrated: migrated, present: present, conflicts: conflicts, conflictRows: conflictRows,
		undecodable: undecodable, undecodableRows: undecodableRows, cleared: cleared, last: last}, nil
}

// decodeRows replaces each stored value with what dec decodes it to, in
// place, and drops the rows it cannot decode (counted, the first
// MaxConflictRows named). An error that is not about the value (a closed
// decoder: anything not matching envelope.ErrDecrypt) fails the batch.
func decodeRows(dec legacy.Decoder, keys, projects, names []string, values [][]byte) ([]string, []string, []string, [][]byte, int64, []MigrateConflict, error) {
	var n int64
	var bad []MigrateConflict
	out := 0
	for i := range keys {
		pt, ok, err := dec.Decode(values[i])
		if err != nil && !errors.Is(err, envelope.ErrDecrypt) {
			provider.Clear(pt)
			for _, v := range values { // decoded plaintexts and stored values alike
				provider.Clear(v)
			}
			return keys, projects, names, values, 0, nil, fmt.Errorf("pgstore: migrate plaintext: legacy decoder: %w", err)
		}
		provider.Clear(values[i])
		if err != nil || !ok || len(pt) > MaxValueLen {
			provider.Clear(pt)
			values[i] = nil
			n++
			if len(bad) < MaxConflictRows {
				bad = append(bad, MigrateConflict{Key: keys[i], Project: projects[i], Name: names[i]})
			}
			continue
		}
		keys[out], projects[out], names[out], values[out] = keys[i], projects[i], names[i], pt
		out++
	}
	clear(values[out:])
	return keys[:out], projects[:out], names[:out], values[:out], n, bad, nil
}
