package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/profullstack/keybroker/internal/meshhook"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

// projectRows counts what the keybroker tables hold of project.
func projectRows(t testing.TB, e *env, project string) (dataKeys, secrets int64) {
	t.Helper()
	return count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = $1`, project),
		count(t, e.pool, `SELECT count(*) FROM keybroker.encrypted_secrets WHERE project_id = $1`, project)
}

// ShredProject destroys every data key (active, spent, retired) and secret
// of the project, audits it, refuses later writes until ReopenProject, and
// leaves other projects alone.
func TestShredProject(t *testing.T) {
	ctx := context.Background()
	// A budget of 3 gives p0 several data keys, most of them spent.
	e := newEnv(t, pgstore.Config{Budget: 3, ReserveChunk: 1})
	for i := range 7 {
		for _, p := range []string{"p0", "p1"} {
			if err := e.store.Put(ctx, p, fmt.Sprintf("s%d", i), []byte("v-"+p)); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A retired key too: the shred must not filter on state.
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET state = 'retired' WHERE project_id = 'p0' AND state = 'spent'
		AND id = (SELECT min(id::text)::uuid FROM keybroker.data_keys WHERE project_id = 'p0' AND state = 'spent')`); err != nil {
		t.Fatal(err)
	}
	keys, secrets := projectRows(t, e, "p0")
	if keys < 3 || secrets != 7 {
		t.Fatalf("set-up: p0 has %d data keys and %d secrets", keys, secrets)
	}
	before := snapshotProject(t, e, "p1")

	pre, err := e.store.PreviewShred(ctx, "p0")
	if err != nil || pre.DataKeys != keys || pre.Secrets != 7 || pre.Shredded {
		t.Fatalf("PreviewShred = %+v, %v; want %d keys, 7 secrets, not shredded", pre, err, keys)
	}
	res, err := e.store.ShredProject(ctx, "p0")
	if err != nil {
		t.Fatal(err)
	}
	if res.DataKeys != keys || res.Secrets != 7 {
		t.Fatalf("ShredProject = %+v, want %d data keys and 7 secrets", res, keys)
	}
	if k, s := projectRows(t, e, "p0"); k != 0 || s != 0 {
		t.Fatalf("after the shred p0 has %d data keys and %d secrets", k, s)
	}
	if got := snapshotProject(t, e, "p1"); got != before {
		t.Fatal("the shred changed project p1")
	}
	if v, err := e.store.Get(ctx, "p1", "s3"); err != nil || string(v) != "v-p1" {
		t.Fatalf("p1 after shredding p0: %q, %v", v, err)
	}
	var (
		n      int64
		actor  string
		detail map[string]any
	)
	if err := e.pool.QueryRow(ctx, `SELECT count, coalesce(actor, ''), detail FROM keybroker.key_events WHERE event = 'project.shred' AND project_id = 'p0'`).
		Scan(&n, &actor, &detail); err != nil {
		t.Fatalf("audit event: %v", err)
	}
	// The Store has no Actor: the event names the session's role.
	if who := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'project.shred' AND actor = session_user`); n != keys ||
		detail["data_keys"] != float64(keys) || detail["secrets"] != float64(7) || detail["role"] != actor || who != 1 {
		t.Fatalf("audit event count %d, actor %q, detail %v", n, actor, detail)
	}

	// The id is dead: a write is refused and leaves nothing, from this
	// Store and from a fresh one (another process).
	other := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
	for _, s := range []*pgstore.Store{e.store, other} {
		if err := s.Put(ctx, "p0", "again", []byte("x")); !errors.Is(err, pgstore.ErrProjectShredded) {
			t.Fatalf("put into shredded project: %v, want ErrProjectShredded", err)
		}
	}
	if _, err := e.store.Get(ctx, "p0", "s1"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("get from shredded project: %v", err)
	}
	if k, s := projectRows(t, e, "p0"); k != 0 || s != 0 {
		t.Fatalf("refused writes left %d data keys and %d secrets", k, s)
	}
	// Again: nothing left, still audited.
	if res, err := e.store.ShredProject(ctx, "p0"); err != nil || res != (pgstore.ShredResult{}) {
		t.Fatalf("second shred = %+v, %v", res, err)
	}
	if pre, err := e.store.PreviewShred(ctx, "p0"); err != nil || !pre.Shredded || pre.DataKeys != 0 {
		t.Fatalf("PreviewShred after shred = %+v, %v", pre, err)
	}

	// Reopened on purpose, the id takes writes again; nothing old returns.
	if ok, err := e.store.ReopenProject(ctx, "p0"); err != nil || !ok {
		t.Fatalf("ReopenProject = %v, %v", ok, err)
	}
	if ok, err := e.store.ReopenProject(ctx, "p0"); err != nil || ok {
		t.Fatalf("second ReopenProject = %v, %v, want false", ok, err)
	}
	if err := other.Put(ctx, "p0", "new", []byte("y")); err != nil {
		t.Fatal(err)
	}
	if _, secrets := projectRows(t, e, "p0"); secrets != 1 {
		t.Fatalf("reopened p0 has %d secrets, want 1", secrets)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE project_id = 'p0' AND event IN ('project.shred', 'project.reopen')`); n != 3 {
		t.Fatalf("%d shred/reopen events, want 3", n)
	}

	for _, bad := range []string{"", string(make([]byte, pgstore.MaxProjectLen+1))} {
		if _, err := e.store.ShredProject(ctx, bad); !errors.Is(err, pgstore.ErrInvalidArgument) {
			t.Fatalf("ShredProject(%d bytes): %v", len(bad), err)
		}
	}
}

// snapshotProject is every keybroker row of project, as text.
func snapshotProject(t testing.TB, e *env, project string) string {
	t.Helper()
	var s string
	if err := e.pool.QueryRow(context.Background(), `SELECT concat_ws('|',
		(SELECT string_agg(d::text, ',' ORDER BY d.id) FROM keybroker.data_keys d WHERE project_id = $1),
		(SELECT string_agg(s::text, ',' ORDER BY s.name) FROM keybroker.encrypted_secrets s WHERE project_id = $1))`, project).Scan(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

// beginShred starts shred_project(project) in a transaction of its own
// connection and returns the transaction, holding the shred's locks until
// it commits or rolls back.
func beginShred(t *testing.T, e *env, project string) pgx.Tx {
	t.Helper()
	ctx := context.Background()
	conn := pgtest.PoolFor(t, e.url)
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tx.Rollback(ctx) })
	if _, err := tx.Exec(ctx, `SELECT keybroker.shred_project($1, 'test')`, project); err != nil {
		t.Fatal(err)
	}
	return tx
}

// A Put racing a shred, with its data key reserved and cached beforehand,
// waits for the shred's lock on the key and then finds the project gone:
// ErrProjectShredded, nothing stored, no new data key.
func TestShredRacingPutOnExistingKey(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	if err := e.store.Put(ctx, "p0", "first", []byte("v")); err != nil {
		t.Fatal(err)
	}
	tx := beginShred(t, e, "p0")
	done := make(chan error, 1)
	go func() { done <- e.store.Put(ctx, "p0", "racing", []byte("w")) }()
	waitForLockWait(t, e.pool)
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, pgstore.ErrProjectShredded) {
		t.Fatalf("racing put: %v, want ErrProjectShredded", err)
	}
	if k, s := projectRows(t, e, "p0"); k != 0 || s != 0 {
		t.Fatalf("after the race p0 has %d data keys and %d secrets", k, s)
	}
}

// A Put into a project with no data key yet, racing a shred, waits on the
// fence in the data key insert and is refused once the shred commits.
func TestShredRacingFirstKey(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	tx := beginShred(t, e, "fresh")
	done := make(chan error, 1)
	go func() { done <- e.store.Put(ctx, "fresh", "racing", []byte("w")) }()
	waitForLockWait(t, e.pool)
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, pgstore.ErrProjectShredded) {
		t.Fatalf("racing put: %v, want ErrProjectShredded", err)
	}
	if k, s := projectRows(t, e, "fresh"); k != 0 || s != 0 {
		t.Fatalf("after the race the project has %d data keys and %d secrets", k, s)
	}
}

// A data key and secret created in a transaction that is still open when
// the shred starts: the shred waits for it and destroys both once it
// commits, rather than leaving a key the tombstone did not see.
func TestShredWaitsForKeyInFlight(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	if err := e.store.Put(ctx, "other", "s", []byte("v")); err != nil { // a kek row to reference
		t.Fatal(err)
	}
	writer, err := pgtest.PoolFor(t, e.url).Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Rollback(ctx)
	if _, err := writer.Exec(ctx, `INSERT INTO keybroker.data_keys (id, project_id, kek_id, wrapped_dek)
		SELECT '00000000-0000-4000-8000-000000000001', 'p0', min(id), '\x01' FROM keybroker.kek`); err != nil {
		t.Fatal(err)
	}
	if _, err := writer.Exec(ctx, `INSERT INTO keybroker.encrypted_secrets (project_id, name, encrypted_data, nonce, data_key_id)
		VALUES ('p0', 's', '\x01', '\x02', '00000000-0000-4000-8000-000000000001')`); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	var res pgstore.ShredResult
	go func() { var err error; res, err = e.store.ShredProject(ctx, "p0"); done <- err }()
	waitForLockWait(t, e.pool)
	if err := writer.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if res.DataKeys != 1 || res.Secrets != 1 {
		t.Fatalf("shred destroyed %+v, want the in-flight key and secret", res)
	}
	if k, s := projectRows(t, e, "p0"); k != 0 || s != 0 {
		t.Fatalf("after the shred p0 has %d data keys and %d secrets", k, s)
	}
}

// MeshHook's schema verbatim with the trigger attached: `delete from
// projects where id = …`, run by the application's own role (one row-level
// security binds, granted EXECUTE on shred_project), cascades to its
// secrets table and shreds the project in keybroker, in the same
// transaction; other projects are untouched; a rolled-back delete shreds
// nothing; a role without EXECUTE cannot delete the project at all.
func TestShredThroughMeshHookCascade(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	if err := meshhook.CreateSchema(ctx, e.pool, "app"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.pool.Exec(ctx, `CREATE TRIGGER keybroker_shred AFTER DELETE ON app.projects
		FOR EACH ROW EXECUTE FUNCTION keybroker.shred_project_trigger('id')`); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := range 3 {
		var id string
		if err := e.pool.QueryRow(ctx, `INSERT INTO app.projects (owner, name) VALUES (gen_random_uuid(), $1) RETURNING id::text`,
			fmt.Sprintf("project %d", i)).Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
		for j := range 5 {
			name := fmt.Sprintf("s%d", j)
			if _, err := e.pool.Exec(ctx, `INSERT INTO app.secrets (project_id, key, value_encrypted) VALUES ($1, $2, 'x')`, id, name); err != nil {
				t.Fatal(err)
			}
			if err := e.store.Put(ctx, id, name, []byte("value of "+name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	app := pgtest.PoolFor(t, tenantURL(t, e)) // keybroker's tenant grants: no EXECUTE on shred_project

	// Without EXECUTE on shred_project the delete fails whole.
	tenantRole := app.Config().ConnConfig.User
	if _, err := e.pool.Exec(ctx, `GRANT USAGE ON SCHEMA app TO `+pgx.Identifier{tenantRole}.Sanitize()+`;
		GRANT SELECT, INSERT, UPDATE, DELETE ON app.projects, app.secrets TO `+pgx.Identifier{tenantRole}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	_, err := app.Exec(ctx, `delete from app.projects where id = $1`, ids[0])
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "42501" {
		t.Fatalf("delete without EXECUTE on shred_project: %v, want permission denied", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM app.secrets WHERE project_id = $1`, ids[0]); n != 5 {
		t.Fatalf("refused delete left %d app secrets, want 5", n)
	}
	if _, err := e.pool.Exec(ctx, `GRANT EXECUTE ON FUNCTION keybroker.shred_project(text, text) TO `+pgx.Identifier{tenantRole}.Sanitize()); err != nil {
		t.Fatal(err)
	}

	// A rolled-back delete shreds nothing.
	before := snapshotProject(t, e, ids[0])
	tx, err := app.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `delete from app.projects where id = $1`, ids[0]); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if snapshotProject(t, e, ids[0]) != before {
		t.Fatal("a rolled-back project delete changed keybroker's rows")
	}

	others := map[string]string{ids[1]: snapshotProject(t, e, ids[1]), ids[2]: snapshotProject(t, e, ids[2])}
	ct, err := app.Exec(ctx, `delete from app.projects where id = $1`, ids[0])
	if err != nil || ct.RowsAffected() != 1 {
		t.Fatalf("delete project: %v (%d rows)", err, ct.RowsAffected())
	}
	if n := count(t, e.pool, `SELECT count(*) FROM app.secrets WHERE project_id = $1`, ids[0]); n != 0 {
		t.Fatalf("cascade left %d app secrets", n)
	}
	if k, s := projectRows(t, e, ids[0]); k != 0 || s != 0 {
		t.Fatalf("deleted project keeps %d data keys and %d secrets in keybroker", k, s)
	}
	if _, err := e.store.Get(ctx, ids[0], "s1"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("get from deleted project: %v", err)
	}
	var actor string
	var secrets float64
	if err := e.pool.QueryRow(ctx, `SELECT actor, (detail->>'secrets')::float8 FROM keybroker.key_events WHERE event = 'project.shred' AND project_id = $1`, ids[0]).
		Scan(&actor, &secrets); err != nil {
		t.Fatalf("audit event: %v", err)
	}
	if want := "trigger app.projects by " + tenantRole; actor != want || secrets != 5 {
		t.Fatalf("audit actor %q secrets %v, want %q and 5", actor, secrets, want)
	}
	for id, snap := range others {
		if snapshotProject(t, e, id) != snap {
			t.Fatalf("project %s changed", id)
		}
		if n := count(t, e.pool, `SELECT count(*) FROM app.secrets WHERE project_id = $1`, id); n != 5 {
			t.Fatalf("project %s has %d app secrets, want 5", id, n)
		}
		if v, err := e.store.Get(ctx, id, "s4"); err != nil || string(v) != "value of s4" {
			t.Fatalf("project %s: %q, %v", id, v, err)
		}
	}
	// The id stays dead for a racing or late write.
	if err := e.store.Put(ctx, ids[0], "late", []byte("x")); !errors.Is(err, pgstore.ErrProjectShredded) {
		t.Fatalf("late put: %v", err)
	}
}

// The trigger fails the delete, loudly, when attached wrongly.
func TestShredTriggerMisattached(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	if _, err := e.pool.Exec(ctx, `CREATE TABLE projects (id uuid PRIMARY KEY);
		CREATE TRIGGER shred AFTER DELETE ON projects FOR EACH ROW EXECUTE FUNCTION keybroker.shred_project_trigger('project_id');
		INSERT INTO projects VALUES (gen_random_uuid())`); err != nil {
		t.Fatal(err)
	}
	_, err := e.pool.Exec(ctx, `DELETE FROM projects`)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "22023" || pe.Message != "keybroker: shred_project_trigger: public.projects has no column project_id or it is NULL" {
		t.Fatalf("delete with a misattached trigger: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM projects`); n != 1 {
		t.Fatalf("the failed delete removed rows: %d left", n)
	}
}
