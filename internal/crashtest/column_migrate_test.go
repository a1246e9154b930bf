//go:build linux

package crashtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/profullstack/keybroker/internal/meshhook"
	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// TestCrashColumnMigrate is issue 13's MeshHook test. MeshHook's schema
// verbatim with 20,000 rows over 50 projects made by Node's node:crypto
// (40% v1, 60% plaintext of which 1,200 look like v1). Two application
// writers run as separate OS processes while `keybroker column migrate
// --legacy meshhook-v1://env/SECRETS_ENCRYPTION_KEY --batch 200` is
// SIGKILLed at random points (a stderr line or its audit event) and rerun:
// one writes v1 values as today's MeshHook does, one sealed values as the
// new code does. Then the v1 writer stops (the deploy), a plain rerun must
// exit 0, every row must open — without any legacy decoder — to the
// fixture's value or the writers' acknowledged write, and `column finish`
// switches legacy acceptance off. Then a project is deleted through
// MeshHook's ON DELETE CASCADE with keybroker's shred trigger, and the
// application flow: a row and its sealed value inserted in one
// transaction, another rolled back, a run's 10 secrets read in one
// OpenMany.
func TestCrashColumnMigrate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := e.ctx
	if err := meshhook.CreateSchema(ctx, e.pool, "public"); err != nil {
		t.Fatal(err)
	}
	f, err := meshhook.Generate(ctx, meshhook.Standard())
	if err != nil {
		t.Fatal(err)
	}
	if err := meshhook.Load(ctx, e.pool, "public", f); err != nil {
		t.Fatal(err)
	}
	kek, err := provider.Open(ctx, "local://"+e.keyring)
	if err != nil {
		t.Fatal(err)
	}
	st, err := pgstore.New(ctx, e.pool, pgstore.Config{KEK: kek, Actor: "crashtest"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	decl := pgcolumn.Column{Table: "public.secrets", Project: "project_id", Key: []string{"key"}, Value: "value_encrypted"}
	if err := pgcolumn.Install(ctx, st, decl); err != nil {
		t.Fatal(err)
	}
	col, err := pgcolumn.New(ctx, st, decl, pgcolumn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e.extraEnv = []string{"SECRETS_ENCRYPTION_KEY=" + f.KeyHex} // the children's environment; never a command line

	// The application writers, each its own OS process.
	appwriter := buildAppwriter(t)
	dir := t.TempDir()
	type writer struct {
		cmd *exec.Cmd
		log string
		out bytes.Buffer
	}
	start := func(worker int, mode string) *writer {
		w := &writer{log: filepath.Join(dir, fmt.Sprintf("writer-%d.log", worker))}
		w.cmd = exec.Command(appwriter, "-schema", "public", "-mode", mode, "-log", w.log,
			"-worker", strconv.Itoa(worker), "-workers", "2", "-seed", strconv.FormatUint(e.rng.Uint64(), 10))
		w.cmd.Env = append(e.childEnv(fmt.Sprintf("appwriter-%d", worker)), "DATABASE_URL="+e.dbURL)
		w.cmd.Stdout, w.cmd.Stderr = &w.out, &w.out
		if err := w.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return w
	}
	stop := func(w *writer) {
		_ = w.cmd.Process.Signal(syscall.SIGTERM)
		if err := w.cmd.Wait(); err != nil {
			t.Fatalf("appwriter: %v: %s", err, w.out.String())
		}
	}
	legacyWriter, sealedWriter := start(0, "v1"), start(1, "sealed")
	defer func() { // on a failure path
		for _, w := range []*writer{legacyWriter, sealedWriter} {
			if w.cmd.ProcessState == nil {
				_ = w.cmd.Process.Kill()
				_ = w.cmd.Wait()
			}
		}
	}()

	e.incompleteOK = true // the v1 writer writes behind the walk
	const batch = 200
	args := []string{"column", "migrate", "--table", "public.secrets", "--value", "value_encrypted",
		"--legacy", "meshhook-v1://env/SECRETS_ENCRYPTION_KEY", "--batch", strconv.Itoa(batch)}
	unsealed := `SELECT count(*) FROM secrets WHERE substring(value_encrypted FROM 1 FOR 4) <> 'KBEN'::bytea`
	kills := 0
	for range 4 {
		pending := e.count(unsealed)
		if o := e.runKilled(e.linePlan(int(pending/batch)), args...); o.killed {
			kills++
			// At any instant: each committed batch audited exactly.
			e.checkColumnAudit("after-kill")
		}
	}
	// The deploy: today's writer stops; the rerun seals what it wrote.
	stop(legacyWriter)
	e.incompleteOK = false
	e.finish(args...)
	e.checks.ok("column-all-sealed", e.count(unsealed) == 0, "%d unsealed values after the rerun", e.count(unsealed))
	e.checkColumnAudit("after-rerun")
	stop(sealedWriter)

	// Every row opens, with no legacy decoder, to its fixture value or
	// the last acknowledged write (or a write cut in flight).
	exp := f.Expected()
	for _, w := range []*writer{legacyWriter, sealedWriter} {
		if err := exp.ApplyLogFile(w.log); err != nil {
			t.Fatal(err)
		}
	}
	// Audit: a value is sealed by the migration once (a sealed value is
	// never migrated again), so the events count at least every fixture
	// row no writer touched, and at most those plus the v1 writer's writes.
	untouched := 0
	for k, w := range f.Expected() {
		if now := exp[k]; len(now.Values) == 1 && now.Values[0] == w.Values[0] {
			untouched++
		}
	}
	v1Writes := e.countLines(legacyWriter.log)
	audited := e.eventSum("column.migrate_legacy")
	e.checks.ok("column-audit-count", audited >= int64(untouched) && audited <= int64(untouched)+v1Writes,
		"migrate events count %d sealed values; %d untouched fixture rows, %d v1 writes", audited, untouched, v1Writes)
	strict := func(ctx context.Context, project, key string, stored []byte) ([]byte, error) {
		return col.Open(ctx, project, []string{key}, stored)
	}
	rep, err := meshhook.Check(ctx, e.pool, "public", exp, strict)
	if err != nil {
		t.Fatal(err)
	}
	e.checks.ok("column-values-exact", rep.OK(), "%v", rep)
	t.Logf("%d kills; %v", kills, rep)

	// Finish: legacy refused from now on, by the trigger.
	e.must("column", "finish", "--table", "public.secrets", "--value", "value_encrypted")
	row := f.Rows[0]
	_, err = e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = 'plain' WHERE project_id = $1 AND key = $2`, row.Project, row.Key)
	var pe *pgconn.PgError
	e.checks.ok("column-legacy-refused", errors.As(err, &pe) && pe.Code == pgcolumn.SQLStateLegacyRefused, "plaintext write after finish: %v", err)

	// Project deletion through MeshHook's cascade, keybroker's trigger on
	// its projects table.
	if _, err := e.pool.Exec(ctx, `CREATE TRIGGER keybroker_shred AFTER DELETE ON projects FOR EACH ROW EXECUTE FUNCTION `+schema+`.shred_project_trigger('id')`); err != nil {
		t.Fatal(err)
	}
	gone := f.Projects[0].ID
	if _, err := e.pool.Exec(ctx, `DELETE FROM projects WHERE id = $1`, gone); err != nil {
		t.Fatal(err)
	}
	e.checks.ok("shred-rows-gone", e.count(`SELECT count(*) FROM secrets WHERE project_id = $1`, gone) == 0, "secrets rows of the deleted project remain")
	e.checks.ok("shred-keys-gone", e.count(`SELECT count(*) FROM `+schema+`.data_keys WHERE project_id = $1`, gone) == 0, "data keys of the deleted project remain")
	exp.DropProject(gone)
	rep, err = meshhook.Check(ctx, e.pool, "public", exp, strict)
	if err != nil {
		t.Fatal(err)
	}
	e.checks.ok("shred-others-intact", rep.OK(), "after the delete: %v", rep)

	// The application flow. A row and its sealed value in one transaction;
	// another rolled back leaves nothing.
	p := f.Projects[1].ID
	if _, err := e.pool.Exec(ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, 'run_0', $2)`, p, mustSeal(t, col, p, "run_0", "v0")); err != nil {
		t.Fatal(err)
	}
	write := func(key, value string, commit bool) {
		tx, err := e.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		if err := col.Write(ctx, tx, p, []string{key}, []byte(value), func(ctx context.Context, tx pgx.Tx, sealed []byte) error {
			_, err := tx.Exec(ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)
ON CONFLICT (project_id, key) DO UPDATE SET value_encrypted = EXCLUDED.value_encrypted, updated_at = now()`, p, key, sealed)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if commit {
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	var keys []string
	for i := 1; i <= 9; i++ {
		keys = append(keys, "run_"+strconv.Itoa(i))
		write(keys[len(keys)-1], "v"+strconv.Itoa(i), true)
	}
	write("rolled_back", "never", false)
	e.checks.ok("app-rollback", e.count(`SELECT count(*) FROM secrets WHERE project_id = $1 AND key = 'rolled_back'`, p) == 0, "a rolled-back row is there")
	rows, err := e.pool.Query(ctx, `SELECT key, value_encrypted FROM secrets WHERE project_id = $1 AND key = ANY($2) ORDER BY key`, p, append(keys, "run_0"))
	if err != nil {
		t.Fatal(err)
	}
	var batchRows []pgcolumn.Row
	var k string
	var v []byte
	if _, err := pgx.ForEachRow(rows, []any{&k, &v}, func() error {
		batchRows = append(batchRows, pgcolumn.Row{Key: []string{k}, Stored: bytes.Clone(v)})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	vals, err := col.OpenMany(ctx, p, batchRows)
	if err != nil || len(vals) != 10 {
		t.Fatalf("OpenMany of a run's 10 secrets: %d values, %v", len(vals), err)
	}
	for i, r := range batchRows {
		e.checks.ok("app-openmany", string(vals[i]) == "v"+r.Key[0][len("run_"):], "%s: wrong value", r.Key[0])
	}
}

func mustSeal(t *testing.T, col *pgcolumn.Encrypted, project, key, value string) []byte {
	t.Helper()
	b, err := col.Seal(context.Background(), project, []string{key}, []byte(value))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// checkColumnAudit: every column.migrate_legacy event names the column
// and counts no more values than its batch read rows.
func (e *env) checkColumnAudit(when string) {
	e.t.Helper()
	bad := e.count(`SELECT count(*) FROM ` + schema + `.key_events WHERE event = 'column.migrate_legacy'
  AND (detail->>'column' <> 'column:public.secrets.value_encrypted' OR count > (detail->>'rows')::bigint)`)
	e.checks.ok("column-audit-"+when, bad == 0, "%d migrate events name another column or count more than their rows", bad)
}

// countLines counts the lines of a writer log ("try" and "ack": an upper
// bound on its writes, twice over).
func (e *env) countLines(path string) int64 {
	e.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		e.t.Fatal(err)
	}
	return int64(bytes.Count(b, []byte("\n")))
}

// buildAppwriter compiles internal/meshhook's appwriter.
func buildAppwriter(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "appwriter")
	cmd := exec.Command("go", "build", "-ldflags=-s -w", "-o", bin, "github.com/profullstack/keybroker/internal/meshhook/appwriter")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build appwriter: %v\n%s", err, out)
	}
	return bin
}
