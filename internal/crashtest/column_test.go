//go:build linux

package crashtest

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/internal/meshhook"
	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// The two MeshHook projects of TestCrashColumnReencrypt.
const (
	columnBig   = "00000000-0000-4000-8000-00000000b196"
	columnOther = "00000000-0000-4000-8000-000000000e4e"
)

var meshhookSecrets = pgcolumn.Column{Table: "public.secrets", Project: "project_id", Key: []string{"key"}, Value: "value_encrypted"}

// TestCrashColumnReencrypt SIGKILLs `column reencrypt BIG --batch 20` of
// 1,000 values in MeshHook's secrets table (schema verbatim from issue 13)
// three times in each of four rounds and finishes with a plain rerun: every
// value of BIG under its one active data key of the column and opening
// byte-exact, no retired key left, the other project untouched, and the
// audit exact (each retirement moved every value once and destroyed its
// key once).
func TestCrashColumnReencrypt(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if _, err := e.pool.Exec(e.ctx, meshhook.SchemaSQL); err != nil {
		t.Fatal(err)
	}
	if _, err := e.pool.Exec(e.ctx, `insert into projects (id, owner, name) values ($1, gen_random_uuid(), 'big'), ($2, gen_random_uuid(), 'other')`, columnBig, columnOther); err != nil {
		t.Fatal(err)
	}
	e.must("column", "install", "--table", "public.secrets", "--project-column", "project_id", "--key", "key", "--value", "value_encrypted")
	want := map[[2]string][]byte{}
	e.withColumn(func(col *pgcolumn.Encrypted) {
		err := pgx.BeginFunc(e.ctx, e.pool, func(tx pgx.Tx) error {
			for i := range 1100 {
				project := columnBig
				if i >= 1000 {
					project = columnOther
				}
				key := fmt.Sprint("SECRET_", i)
				v := make([]byte, 1+i%200)
				rand.Read(v)
				sealed, err := col.Seal(e.ctx, project, []string{key}, v)
				if err != nil {
					return err
				}
				if _, err := tx.Exec(e.ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)`, project, key, sealed); err != nil {
					return err
				}
				want[[2]string{project, key}] = v
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
	other := e.columnDigest(columnOther)
	args := []string{"column", "reencrypt", "--table", "public.secrets", "--value", "value_encrypted", columnBig, "--batch", "20"}
	scope := meshhookSecrets.Scope()
	for range 4 * scale(t) {
		for range 3 {
			// Progress lines at every tenth of the 1,000 values.
			e.runKilled(e.linePlan(10), args...)
		}
		e.finish(args...)
		left := e.count(`SELECT count(*) FROM `+schema+`.data_keys WHERE project_id = $1 AND scope = $2 AND state <> 'active'`, columnBig, scope)
		e.checks.ok("column-old-keys-gone", left == 0, "project big still has %d column data keys that are not active", left)
		stale := e.count(`SELECT count(*) FROM secrets t WHERE t.project_id = $1 AND NOT EXISTS (SELECT 1 FROM `+schema+`.data_keys d
WHERE d.project_id = $2 AND d.scope = $3 AND d.state = 'active' AND uuid_send(d.id) = substring(t.value_encrypted FROM 9 FOR 16))`, columnBig, columnBig, scope)
		e.checks.ok("column-all-moved", stale == 0, "%d values of big not under its active column data key", stale)
		e.checks.ok("column-other-untouched", e.columnDigest(columnOther) == other, "project other's values or column data keys changed")
		retirements := e.count(`SELECT count(*) FROM `+schema+`.key_events WHERE event = 'dek.retire' AND project_id = $1 AND detail->>'column' = $2 AND count > 0`, columnBig, scope)
		moved := e.count(`SELECT coalesce(sum(count), 0) FROM `+schema+`.key_events WHERE event = 'dek.reencrypt' AND project_id = $1 AND detail->>'column' = $2`, columnBig, scope)
		e.checks.ok("column-audit-reencrypt", moved == 1000*retirements, "dek.reencrypt events count %d values for %d retirements of 1,000", moved, retirements)
		retired := e.count(`SELECT coalesce(sum(count), 0) FROM `+schema+`.key_events WHERE event = 'dek.retire' AND project_id = $1 AND detail->>'column' = $2`, columnBig, scope)
		destroyed := e.count(`SELECT count(*) FROM `+schema+`.key_events WHERE event = 'dek.destroy' AND project_id = $1 AND detail->>'column' = $2`, columnBig, scope)
		e.checks.ok("column-audit-destroy", destroyed == retired, "%d dek.destroy events for %d retired keys", destroyed, retired)
		e.checkColumn(want)
		code, out, errOut := e.run("column", "verify", "--table", "public.secrets", "--value", "value_encrypted")
		e.checks.ok("column-verify-exit-0", code == 0, "keybroker column verify: exit %d: %s %s", code, lastLines(out, 2), lastLines(errOut, 2))
	}
}

// withColumn runs fn with the secrets column opened through a fresh Store
// on the test's keyring file.
func (e *env) withColumn(fn func(*pgcolumn.Encrypted)) {
	e.t.Helper()
	kek, err := provider.Open(e.ctx, "local://"+e.keyring)
	if err != nil {
		e.t.Fatal(err)
	}
	st, err := pgstore.New(e.ctx, e.pool, pgstore.Config{KEK: kek, Actor: "crashtest"})
	if err != nil {
		e.t.Fatal(err)
	}
	defer st.Close()
	col, err := pgcolumn.New(e.ctx, st, meshhookSecrets, pgcolumn.Options{})
	if err != nil {
		e.t.Fatal(err)
	}
	fn(col)
}

// checkColumn checks that the table holds exactly want's rows and that each
// opens byte-exact through a fresh Store.
func (e *env) checkColumn(want map[[2]string][]byte) {
	e.t.Helper()
	defer e.timed("read back")()
	e.withColumn(func(col *pgcolumn.Encrypted) {
		rows, err := e.pool.Query(e.ctx, `SELECT project_id::text, key, value_encrypted FROM secrets`)
		if err != nil {
			e.t.Fatal(err)
		}
		var (
			project, key string
			stored       []byte
			n, bad       int
			first        string
		)
		_, err = pgx.ForEachRow(rows, []any{&project, &key, &stored}, func() error {
			n++
			v, err := col.Open(e.ctx, project, []string{key}, stored)
			if w, ok := want[[2]string{project, key}]; err != nil || !ok || !bytes.Equal(v, w) {
				if bad++; first == "" {
					first = fmt.Sprintf("%s/%s (%v)", project, key, err)
				}
			}
			return nil
		})
		if err != nil {
			e.t.Fatal(err)
		}
		e.checks.ok("column-read-back", bad == 0 && n == len(want), "%d rows (want %d), %d do not open byte-exact, first: %s", n, len(want), bad, first)
	})
}

// columnDigest is a digest of a project's values and column data keys.
func (e *env) columnDigest(project string) string {
	e.t.Helper()
	var d string
	if err := e.pool.QueryRow(e.ctx, `SELECT md5(
  coalesce((SELECT string_agg(key || ':' || encode(value_encrypted, 'hex'), ',' ORDER BY key) FROM secrets WHERE project_id::text = $2), '') || '|' ||
  coalesce((SELECT string_agg(id || ':' || state || ':' || encode(wrapped_dek, 'hex'), ',' ORDER BY id)
    FROM `+schema+`.data_keys WHERE project_id = $1 AND scope <> ''), ''))`, project, project).Scan(&d); err != nil {
		e.t.Fatal(err)
	}
	return d
}
