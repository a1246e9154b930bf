package meshhook_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/meshhook"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/internal/testbin"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// loaded is a fresh database with MeshHook's schema in "app" holding a
// fixture of o.
func loaded(t *testing.T, o meshhook.Options) (*pgxpool.Pool, string, *meshhook.Fixture) {
	t.Helper()
	ctx := context.Background()
	f, err := meshhook.Generate(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	url := pgtest.NewDatabase(t)
	pool := pgtest.PoolFor(t, url)
	if err := meshhook.CreateSchema(ctx, pool, "app"); err != nil {
		t.Fatal(err)
	}
	if err := meshhook.Load(ctx, pool, "app", f); err != nil {
		t.Fatal(err)
	}
	return pool, url, f
}

func legacyOpener(t *testing.T, f *meshhook.Fixture) meshhook.Opener {
	t.Helper()
	open, c, err := meshhook.LegacyOpener(f.KeyHex)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return open
}

// The standard fixture, made by node:crypto, has exactly the promised
// shape, loads with COPY into MeshHook's verbatim schema, and every one of
// its 20,000 rows reads back as its plaintext the way MeshHook reads it
// (v1 values decrypted, look-alikes not claimed by the v1 decoder). The
// checker notices a row changed behind its back.
func TestStandardFixture(t *testing.T) {
	ctx := context.Background()
	o := meshhook.Standard()
	pool, _, f := loaded(t, o)
	if len(f.Rows) != 20000 || len(f.Projects) != 50 || f.Count(meshhook.KindV1) != 8000 ||
		f.Count(meshhook.KindLookalike) != 1200 || f.Count(meshhook.KindPlain) != 10800 || f.Count(meshhook.KindForged) != 0 {
		t.Fatalf("fixture: %d rows, %d projects, kinds v1 %d lookalike %d plain %d forged %d", len(f.Rows), len(f.Projects),
			f.Count(meshhook.KindV1), f.Count(meshhook.KindLookalike), f.Count(meshhook.KindPlain), f.Count(meshhook.KindForged))
	}
	perProject := map[string]int{}
	for _, r := range f.Rows {
		perProject[r.Project]++
		v1 := bytes.HasPrefix(r.Stored, []byte("v1:"))
		switch r.Kind {
		case meshhook.KindV1:
			if !v1 || bytes.Equal(r.Stored, r.Plaintext) {
				t.Fatalf("v1 row %s/%s is not a v1 ciphertext", r.Project, r.Key)
			}
		case meshhook.KindLookalike:
			if !v1 || !bytes.Equal(r.Stored, r.Plaintext) {
				t.Fatalf("look-alike row %s/%s", r.Project, r.Key)
			}
		case meshhook.KindPlain:
			if v1 || !bytes.Equal(r.Stored, r.Plaintext) {
				t.Fatalf("plain row %s/%s", r.Project, r.Key)
			}
		}
	}
	for p, n := range perProject {
		if n != 400 {
			t.Fatalf("project %s has %d rows, want 400", p, n)
		}
	}
	// CreateSchema put the tables in "app" only, and its search_path did
	// not outlive it.
	var elsewhere bool
	if err := pool.QueryRow(ctx, `SELECT to_regclass('public.secrets') IS NOT NULL OR current_setting('search_path') LIKE '%app%'`).Scan(&elsewhere); err != nil || elsewhere {
		t.Fatalf("tables outside app or search_path left set: %v, %v", elsewhere, err)
	}
	exp := f.Expected()
	rep, err := meshhook.Check(ctx, pool, "app", exp, legacyOpener(t, f))
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() || rep.Matched != 20000 {
		t.Fatalf("check: %v", rep)
	}
	// Changed, deleted and added rows are each reported, by name only.
	r0, r1 := f.Rows[0], f.Rows[1]
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{`UPDATE app.secrets SET value_encrypted = 'changed' WHERE project_id = $1 AND key = $2`, []any{r0.Project, r0.Key}},
		{`DELETE FROM app.secrets WHERE project_id = $1 AND key = $2`, []any{r1.Project, r1.Key}},
		{`INSERT INTO app.secrets (project_id, key, value_encrypted) VALUES ($1, 'extra', 'x')`, []any{r0.Project}},
	} {
		if _, err := pool.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatal(err)
		}
	}
	rep, err = meshhook.Check(ctx, pool, "app", exp, legacyOpener(t, f))
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Mismatched != 1 || rep.Missing != 1 || rep.Unexpected != 1 || rep.Matched != 19998 {
		t.Fatalf("check after tampering: %v", rep)
	}
	if s := rep.String(); strings.Contains(s, "changed") {
		t.Fatalf("report carries a value: %s", s)
	}
}

// Forged rows (a well-formed v1 header, a tag that does not verify) are
// refused by MeshHook's v1 decoder, which Check counts as expected; an
// opener that accepts them is caught.
func TestForgedRows(t *testing.T) {
	ctx := context.Background()
	pool, _, f := loaded(t, meshhook.Options{Rows: 200, Projects: 4, V1: 50, Lookalike: 50, Forged: 20})
	exp := f.Expected()
	rep, err := meshhook.Check(ctx, pool, "app", exp, legacyOpener(t, f))
	if err != nil || !rep.OK() {
		t.Fatalf("check: %v, %v", rep, err)
	}
	plain := func(_ context.Context, _, _ string, stored []byte) ([]byte, error) { return stored, nil }
	rep, err = meshhook.Check(ctx, pool, "app", exp, plain)
	if err != nil || rep.Accepted != 20 || rep.Mismatched != 50 {
		t.Fatalf("check with a plaintext opener: %v, %v", rep, err)
	}
}

// buildAppwriter compiles cmd appwriter into a temporary directory.
func buildAppwriter(t *testing.T) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go command: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "appwriter")
	if out, err := exec.Command(goBin, "build", "-o", bin, "github.com/profullstack/keybroker/internal/meshhook/appwriter").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// acks counts the acknowledged writes in a writer log so far.
func acks(t *testing.T, path string) int {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return bytes.Count(data, []byte(`"op":"ack"`))
}

// Three appwriter processes (the old application, writing v1 values) share
// the table; one is SIGKILLed mid-run and restarted, a project is deleted
// under them. Afterwards every row holds what the logs say was last
// acknowledged (or the write the kill cut, whose outcome is unknown), and
// every row of the fixture nobody wrote still holds its original value.
func TestAppWriters(t *testing.T) {
	ctx := context.Background()
	pool, url, f := loaded(t, meshhook.Options{Rows: 2000, Projects: 10, V1: 800, Lookalike: 120})
	bin := buildAppwriter(t)
	dir := t.TempDir()
	start := func(worker int, extra ...string) (*exec.Cmd, *bytes.Buffer) {
		cmd := exec.Command(bin, append([]string{"-schema", "app", "-mode", "v1", "-workers", "3",
			"-worker", fmt.Sprint(worker), "-log", filepath.Join(dir, fmt.Sprintf("w%d.log", worker)), "-seed", "7"}, extra...)...)
		cmd.Env = append(os.Environ(), "DATABASE_URL="+url, "SECRETS_ENCRYPTION_KEY="+f.KeyHex)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		testbin.KillWithParent(cmd)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd, &out
	}
	w0, out0 := start(0, "-ops", "300")
	w1, out1 := start(1, "-ops", "300")
	victim, _ := start(2) // until killed
	for acks(t, filepath.Join(dir, "w2.log")) < 100 {
		if t.Context().Err() != nil {
			t.Fatal("writer 2 made no progress")
		}
	}
	if err := victim.Process.Kill(); err != nil { // SIGKILL
		t.Fatal(err)
	}
	victim.Wait()
	// A project deleted while writers run: cascade, and the writers drop it.
	deleted := f.Projects[3].ID
	if _, err := pool.Exec(ctx, `DELETE FROM app.projects WHERE id = $1`, deleted); err != nil {
		t.Fatal(err)
	}
	again, outAgain := start(2, "-ops", "100")
	for _, w := range []struct {
		cmd *exec.Cmd
		out *bytes.Buffer
	}{{w0, out0}, {w1, out1}, {again, outAgain}} {
		if err := w.cmd.Wait(); err != nil {
			t.Fatalf("appwriter: %v\n%s", err, w.out)
		}
		var sum meshhook.WriterSummary
		if err := json.NewDecoder(bufio.NewReader(w.out)).Decode(&sum); err != nil || sum.Acked < 100 {
			t.Fatalf("appwriter summary %+v, %v: %s", sum, err, w.out)
		}
	}
	exp := f.Expected()
	for i := range 3 {
		if err := exp.ApplyLogFile(filepath.Join(dir, fmt.Sprintf("w%d.log", i))); err != nil {
			t.Fatal(err)
		}
	}
	exp.DropProject(deleted)
	rep, err := meshhook.Check(ctx, pool, "app", exp, legacyOpener(t, f))
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("check: %v", rep)
	}
	// The writers wrote v1 values, never plaintext.
	var plain int64
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM app.secrets WHERE key LIKE 'app_w%' AND position('v1:'::bytea in value_encrypted) <> 1`).Scan(&plain); err != nil || plain != 0 {
		t.Fatalf("%d writer rows not v1 (%v)", plain, err)
	}
}

// MeshHook on keybroker's own table, several appwriter processes writing
// through pgstore (mode keybroker-store), while the application deletes a
// project from its projects table with keybroker's trigger attached, and
// one writer is SIGKILLed: the deleted project leaves nothing in keybroker
// even though writers kept writing to it (no data key, no secret: the
// tombstone refused them), its deletion is audited, and every other row
// reads back as the logs say.
func TestShredUnderAppWriters(t *testing.T) {
	ctx := context.Background()
	pool, url, f := loaded(t, meshhook.Options{Rows: 600, Projects: 6, V1: 200, Lookalike: 30})
	if err := pgstore.Migrate(ctx, pool, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `CREATE TRIGGER keybroker_shred AFTER DELETE ON app.projects
		FOR EACH ROW EXECUTE FUNCTION keybroker.shred_project_trigger('id')`); err != nil {
		t.Fatal(err)
	}
	kek, err := local.Generate("meshhook")
	if err != nil {
		t.Fatal(err)
	}
	keyring := filepath.Join(t.TempDir(), "keyring.json")
	if err := kek.Save(keyring); err != nil {
		t.Fatal(err)
	}
	bin := buildAppwriter(t)
	dir := t.TempDir()
	type proc struct {
		cmd *exec.Cmd
		out *bytes.Buffer
	}
	var procs []proc
	for i := range 3 {
		cmd := exec.Command(bin, "-schema", "app", "-mode", "keybroker-store", "-workers", "3", "-worker", fmt.Sprint(i),
			"-log", filepath.Join(dir, fmt.Sprintf("w%d.log", i)), "-new-every", "3", "-seed", "11") // until SIGTERM
		cmd.Env = append(os.Environ(), "DATABASE_URL="+url, "KEYBROKER_KEK=local://"+keyring)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		testbin.KillWithParent(cmd)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		procs = append(procs, proc{cmd, &out})
	}
	for i := range 3 {
		for acks(t, filepath.Join(dir, fmt.Sprintf("w%d.log", i))) < 60 {
			if t.Context().Err() != nil {
				t.Fatalf("writer %d made no progress", i)
			}
		}
	}
	deleted := f.Projects[2].ID
	if _, err := pool.Exec(ctx, `delete from app.projects where id = $1`, deleted); err != nil {
		t.Fatal(err)
	}
	if err := procs[2].cmd.Process.Kill(); err != nil { // SIGKILL, wherever it is
		t.Fatal(err)
	}
	procs[2].cmd.Wait()
	// The other two keep writing, to the deleted project too, for 150
	// acknowledged writes each, then stop on SIGTERM with their summaries.
	gone := 0
	for i, p := range procs[:2] {
		log := filepath.Join(dir, fmt.Sprintf("w%d.log", i))
		for target := acks(t, log) + 150; acks(t, log) < target; {
			if t.Context().Err() != nil {
				t.Fatalf("writer %d stopped writing", i)
			}
		}
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := p.cmd.Wait(); err != nil {
			t.Fatalf("appwriter: %v\n%s", err, p.out)
		}
		var sum meshhook.WriterSummary
		if err := json.Unmarshal(p.out.Bytes(), &sum); err != nil || sum.ProjectsGone > 1 {
			t.Fatalf("appwriter summary %+v, %v: %s", sum, err, p.out)
		}
		gone += sum.ProjectsGone
	}
	// 300 writes over 6 projects: the deleted one was tried (and refused).
	if gone == 0 {
		t.Fatal("no writer wrote to the deleted project after its deletion")
	}
	var keys, secrets, events int64
	if err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM keybroker.data_keys WHERE project_id = $1),
		(SELECT count(*) FROM keybroker.encrypted_secrets WHERE project_id = $1),
		(SELECT count(*) FROM keybroker.key_events WHERE project_id = $1 AND event = 'project.shred')`, deleted).Scan(&keys, &secrets, &events); err != nil {
		t.Fatal(err)
	}
	if keys != 0 || secrets != 0 || events != 1 {
		t.Fatalf("deleted project: %d data keys, %d secrets, %d shred events in keybroker", keys, secrets, events)
	}
	// Every other project: as the logs say, read through keybroker.
	store, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	leg := legacyOpener(t, f)
	open := func(ctx context.Context, project, key string, stored []byte) ([]byte, error) {
		if bytes.HasPrefix(stored, []byte(meshhook.StoreMarker)) {
			return store.Get(ctx, project, key)
		}
		return leg(ctx, project, key, stored)
	}
	exp := f.Expected()
	for i := range 3 {
		if err := exp.ApplyLogFile(filepath.Join(dir, fmt.Sprintf("w%d.log", i))); err != nil {
			t.Fatal(err)
		}
	}
	exp.DropProject(deleted)
	rep, err := meshhook.Check(ctx, pool, "app", exp, open)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("check: %v", rep)
	}
	var viaStore int64
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM app.secrets WHERE position($1::bytea in value_encrypted) = 1`, meshhook.StoreMarker).Scan(&viaStore); err != nil || viaStore < 100 {
		t.Fatalf("%d rows went through keybroker (%v)", viaStore, err)
	}
}
