package pgcolumn_test

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/internal/meshhook"
	"github.com/profullstack/keybroker/legacy"
	"github.com/profullstack/keybroker/pgcolumn"
)

// legacyFixture loads a small MeshHook fixture (Node's node:crypto v1
// values, plaintexts, look-alikes and forged v1 headers) into e's secrets
// table and returns it with a decoder chain for it.
func legacyFixture(t testing.TB, e *env, o meshhook.Options) (*meshhook.Fixture, *legacy.Chain) {
	t.Helper()
	ctx := context.Background()
	f, err := meshhook.Generate(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := meshhook.Load(ctx, e.pool, "public", f); err != nil {
		t.Fatal(err)
	}
	key, err := legacy.ParseMeshHookKey(f.KeyHex)
	if err != nil {
		t.Fatal(err)
	}
	v1, err := legacy.MeshHookV1(key)
	if err != nil {
		t.Fatal(err)
	}
	dec, err := legacy.NewChain(v1, legacy.Plaintext())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dec.Close() })
	return f, dec
}

// reader is a handle that accepts legacy values through dec.
func (e *env) reader(t testing.TB, dec legacy.Decoder) *pgcolumn.Encrypted {
	t.Helper()
	r, err := pgcolumn.New(context.Background(), e.store, secretsColumn, pgcolumn.Options{Legacy: dec})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func opener(r *pgcolumn.Encrypted) meshhook.Opener {
	return func(ctx context.Context, project, key string, stored []byte) ([]byte, error) {
		return r.Open(ctx, project, []string{key}, stored)
	}
}

func checkFixture(t testing.TB, e *env, exp meshhook.Expected, open meshhook.Opener) {
	t.Helper()
	rep, err := meshhook.Check(context.Background(), e.pool, "public", exp, open)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("check: %v", rep)
	}
}

const unsealed = `SELECT count(*) FROM secrets WHERE substring(value_encrypted FROM 1 FOR 4) <> 'KBEN'::bytea`

// The whole life of a legacy column: a legacy-accepting reader opens every
// kind of value; MigrateLegacy seals them in place in batches, verified,
// audited, leaving forged v1 headers alone and named; RefuseLegacy refuses
// while they remain and succeeds once the application rewrote them; then
// the trigger refuses unsealed writes and readers refuse unsealed values.
func TestMigrateLegacy(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f, dec := legacyFixture(t, e, meshhook.Options{Rows: 400, Projects: 5, V1: 160, Lookalike: 40, Forged: 3})
	exp := f.Expected()
	r := e.reader(t, dec)
	checkFixture(t, e, exp, opener(r))
	// A reader without a decoder refuses legacy values.
	row := f.Rows[0]
	if _, err := e.col.Open(ctx, row.Project, []string{row.Key}, row.Stored); !errors.Is(err, pgcolumn.ErrLegacyRefused) {
		t.Fatalf("Open of a legacy value without a decoder: %v", err)
	}
	var progress []pgcolumn.MigrateProgress
	res, err := e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: dec, BatchSize: 37,
		Progress: func(p pgcolumn.MigrateProgress) { progress = append(progress, p) }})
	if err != nil {
		t.Fatal(err)
	}
	if res.Pending != 400 || res.Migrated != 397 || res.Undecodable != 3 || res.Changed != 0 || res.Remaining != 3 {
		t.Fatalf("result %+v", res)
	}
	var forged []pgcolumn.RowRef
	for _, row := range f.Rows {
		if row.Kind == meshhook.KindForged {
			forged = append(forged, pgcolumn.RowRef{Project: row.Project, Key: []string{row.Key}})
		}
	}
	sortRefs := func(rs []pgcolumn.RowRef) {
		slices.SortFunc(rs, func(a, b pgcolumn.RowRef) int {
			if c := compare(a.Project, b.Project); c != 0 {
				return c
			}
			return compare(a.Key[0], b.Key[0])
		})
	}
	got := slices.Clone(res.UndecodableRows)
	sortRefs(got)
	sortRefs(forged)
	if !slices.EqualFunc(got, forged, func(a, b pgcolumn.RowRef) bool { return a.Project == b.Project && slices.Equal(a.Key, b.Key) }) {
		t.Fatalf("undecodable rows %v, want the forged ones %v", got, forged)
	}
	if len(progress) != 11 || progress[10].Done != 400 || progress[10].Total != 400 {
		t.Fatalf("progress: %d calls, last %+v", len(progress), progress[len(progress)-1])
	}
	// Every value opens to what it was, now without the decoder, and the
	// forged ones still hold their bytes.
	if n := count(t, e.pool, unsealed); n != 3 {
		t.Fatalf("%d unsealed values left, want the 3 forged", n)
	}
	checkFixture(t, e, exp, opener(r))
	sealedOnly := meshhook.Expected{}
	for k, w := range exp {
		if !w.Refused {
			sealedOnly[k] = w
		}
	}
	if _, err := e.pool.Exec(ctx, `CREATE TEMP TABLE forged AS SELECT project_id, key FROM secrets WHERE substring(value_encrypted FROM 1 FOR 4) <> 'KBEN'::bytea`); err != nil {
		t.Fatal(err)
	}
	// One event per batch, counting what it sealed.
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'column.migrate_legacy'`); n != 11 {
		t.Fatalf("%d migrate events, want 11", n)
	}
	if n := count(t, e.pool, `SELECT sum(count) FROM keybroker.key_events WHERE event = 'column.migrate_legacy'`); n != 397 {
		t.Fatalf("events count %d sealed values, want 397", n)
	}
	// A rerun only meets the forged rows.
	res, err = e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: dec})
	if err != nil || res.Pending != 3 || res.Migrated != 0 || res.Undecodable != 3 {
		t.Fatalf("rerun: %+v, %v", res, err)
	}

	// RefuseLegacy refuses to finish while unsealed values remain, and
	// leaves acceptance on.
	if err := e.col.RefuseLegacy(ctx); !errors.Is(err, pgcolumn.ErrLegacyRemaining) {
		t.Fatalf("RefuseLegacy with forged rows left: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.columns WHERE accept_legacy`); n != 1 {
		t.Fatal("a failed RefuseLegacy switched acceptance off")
	}
	// The application rewrites them (sealed), and the column finishes.
	for _, ref := range forged {
		sealed, err := e.col.Seal(ctx, ref.Project, ref.Key, []byte("rewritten"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = $3 WHERE project_id = $1 AND key = $2`, ref.Project, ref.Key[0], sealed); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.col.RefuseLegacy(ctx); err != nil {
		t.Fatal(err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'column.refuse_legacy'`); n != 1 {
		t.Fatalf("%d refuse_legacy events", n)
	}
	// The fence now refuses unsealed writes ...
	_, err = e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = 'plain' WHERE project_id = $1 AND key = $2`, row.Project, row.Key)
	if err = e.col.Refused(err, row.Project, []byte("plain")); !errors.Is(err, pgcolumn.ErrLegacyRefused) {
		t.Fatalf("unsealed write after RefuseLegacy: %v", err)
	}
	// ... and readers, even the one that accepted legacy values before
	// (it asks the database) and one made since, refuse an unsealed value
	// that got in past the trigger (here: with triggers disabled).
	late := e.reader(t, dec)
	conn, err := pgx.Connect(ctx, e.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `SET session_replication_role = replica`); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `UPDATE secrets SET value_encrypted = 'plain' WHERE project_id = $1 AND key = $2`, row.Project, row.Key); err != nil {
		t.Fatal(err)
	}
	for _, h := range []*pgcolumn.Encrypted{r, late} {
		if _, err := h.Open(ctx, row.Project, []string{row.Key}, []byte("plain")); !errors.Is(err, pgcolumn.ErrLegacyRefused) {
			t.Fatalf("legacy reader after RefuseLegacy: %v, want ErrLegacyRefused", err)
		}
		if _, err := h.OpenMany(ctx, row.Project, []pgcolumn.Row{{Key: []string{row.Key}, Stored: []byte("plain")}}); !errors.Is(err, pgcolumn.ErrLegacyRefused) {
			t.Fatalf("legacy OpenMany after RefuseLegacy: %v, want ErrLegacyRefused", err)
		}
	}
	// Finishing again is a no-op that still checks.
	if _, err := conn.Exec(ctx, `SET session_replication_role = origin`); err != nil {
		t.Fatal(err)
	}
	if err := e.col.RefuseLegacy(ctx); !errors.Is(err, pgcolumn.ErrLegacyRemaining) {
		t.Fatalf("RefuseLegacy with an unsealed value smuggled in: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.columns WHERE accept_legacy`); n != 0 {
		t.Fatal("legacy acceptance came back on")
	}
}

func compare(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// OpenMany reads a run's values, sealed and legacy mixed, in one call with
// one registry query.
func TestOpenManyLegacy(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f, dec := legacyFixture(t, e, meshhook.Options{Rows: 20, Projects: 1, V1: 8, Lookalike: 2})
	r := e.reader(t, dec)
	p := f.Rows[0].Project
	var rows []pgcolumn.Row
	var want [][]byte
	for i, row := range f.Rows[:10] {
		stored := row.Stored
		if i%2 == 0 { // half of them sealed already
			var err error
			if stored, err = e.col.Seal(ctx, p, []string{row.Key}, row.Plaintext); err != nil {
				t.Fatal(err)
			}
		}
		rows, want = append(rows, pgcolumn.Row{Key: []string{row.Key}, Stored: stored}), append(want, row.Plaintext)
	}
	got, err := r.OpenMany(ctx, p, rows)
	if err != nil {
		t.Fatal(err)
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("row %d: wrong value", i)
		}
	}
	// A broken v1 value among them fails the call with ErrDecrypt.
	for _, row := range f.Rows {
		if row.Kind != meshhook.KindV1 || len(row.Plaintext) < 3 {
			continue
		}
		broken := bytes.Clone(row.Stored)
		broken[len("v1:")+16+1+24+1] ^= 1 // the first ciphertext character: the header stays well formed, so the value is claimed and fails
		rows[1] = pgcolumn.Row{Key: []string{row.Key}, Stored: broken}
		if _, err := r.OpenMany(ctx, p, rows); !errors.Is(err, envelope.ErrDecrypt) {
			t.Fatalf("broken v1 in OpenMany: %v", err)
		}
		return
	}
	t.Fatal("no v1 row of 3 bytes or more in the fixture")
}

// A value the application rewrites between the batch's read and its
// update is left alone (the guarded UPDATE), counted as changed; the next
// run seals it if it is legacy.
func TestMigrateLegacyAppRewrites(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p := e.project(t)
	for _, k := range []string{"a", "b", "c"} {
		if _, err := e.pool.Exec(ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)`, p, k, []byte("old-"+k)); err != nil {
			t.Fatal(err)
		}
	}
	sealedB, err := e.col.Seal(ctx, p, []string{"b"}, []byte("new-b"))
	if err != nil {
		t.Fatal(err)
	}
	// The decoder runs between the read and the update: it plays the
	// application, rewriting b (sealed) and c (a new plaintext) from
	// another connection.
	var calls atomic.Int32
	hook := legacy.Func(func(stored []byte) ([]byte, bool, error) {
		if calls.Add(1) == 1 {
			if _, err := e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = $2 WHERE project_id = $1 AND key = 'b'`, p, sealedB); err != nil {
				return nil, false, err
			}
			if _, err := e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = 'newer-c' WHERE project_id = $1 AND key = 'c'`, p); err != nil {
				return nil, false, err
			}
		}
		return append([]byte(nil), stored...), true, nil
	})
	res, err := e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: hook})
	if err != nil {
		t.Fatal(err)
	}
	if res.Migrated != 1 || res.Changed != 2 || res.Remaining != 1 {
		t.Fatalf("result %+v", res)
	}
	want := map[string]string{"a": "old-a", "b": "new-b", "c": "newer-c"}
	r := e.reader(t, legacy.Plaintext())
	for k, w := range want {
		var stored []byte
		if err := e.pool.QueryRow(ctx, `SELECT value_encrypted FROM secrets WHERE project_id = $1 AND key = $2`, p, k).Scan(&stored); err != nil {
			t.Fatal(err)
		}
		got, err := r.Open(ctx, p, []string{k}, stored)
		if err != nil || string(got) != w {
			t.Fatalf("%s: %q, %v; want %q", k, got, err, w)
		}
	}
	res, err = e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: legacy.Plaintext()})
	if err != nil || res.Migrated != 1 || res.Remaining != 0 {
		t.Fatalf("second run: %+v, %v", res, err)
	}
}

// A stored value that does not open to the decoded plaintext rolls the
// batch back with ErrVerify: here a trigger after the fence corrupts one
// sealed value on its way into the table.
func TestMigrateLegacyVerify(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p := e.project(t)
	for _, k := range []string{"a", "b", "c"} {
		if _, err := e.pool.Exec(ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)`, p, k, []byte("plain-"+k)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.pool.Exec(ctx, `CREATE FUNCTION corrupt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.key = 'b' THEN NEW.value_encrypted := overlay(NEW.value_encrypted PLACING '\xff'::bytea FROM length(NEW.value_encrypted)); END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER zz_corrupt BEFORE UPDATE ON secrets FOR EACH ROW EXECUTE FUNCTION corrupt()`); err != nil {
		t.Fatal(err)
	}
	_, err := e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: legacy.Plaintext()})
	if !errors.Is(err, pgcolumn.ErrVerify) {
		t.Fatalf("MigrateLegacy through a corrupting trigger: %v, want ErrVerify", err)
	}
	if bytes.Contains([]byte(err.Error()), []byte("plain-")) {
		t.Fatalf("error carries a value: %v", err)
	}
	if n := count(t, e.pool, unsealed); n != 3 {
		t.Fatalf("%d unsealed values after a failed batch, want all 3 (rolled back)", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'column.migrate_legacy'`); n != 0 {
		t.Fatal("the rolled-back batch left an event")
	}
}

// StartAfter resumes after a row; bad options are refused before any
// write.
func TestMigrateLegacyOptions(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	f, dec := legacyFixture(t, e, meshhook.Options{Rows: 30, Projects: 2, V1: 10})
	if _, err := e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{}); !errors.Is(err, pgcolumn.ErrInvalidArgument) {
		t.Fatalf("no decoder: %v", err)
	}
	if _, err := e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: dec, BatchSize: -1}); !errors.Is(err, pgcolumn.ErrInvalidArgument) {
		t.Fatalf("batch -1: %v", err)
	}
	if _, err := e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: dec, StartAfter: &pgcolumn.RowRef{Project: f.Rows[0].Project}}); !errors.Is(err, pgcolumn.ErrInvalidArgument) {
		t.Fatalf("StartAfter without key: %v", err)
	}
	var mid pgcolumn.RowRef
	res, err := e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: dec, BatchSize: 10,
		Progress: func(p pgcolumn.MigrateProgress) {
			if p.Done == 10 {
				mid = p.Last
			}
		}})
	if err != nil || res.Migrated != 30 {
		t.Fatalf("%+v, %v", res, err)
	}
	if _, err := e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = 'x'`); err != nil {
		t.Fatal(err)
	}
	res, err = e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: dec, StartAfter: &mid})
	if err != nil || res.Pending != 20 || res.Migrated != 20 || res.Remaining != 10 {
		t.Fatalf("after %v: %+v, %v", mid, res, err)
	}
}
