package pgcolumn_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgcolumn"
)

// fill inserts n rows R0..R<n-1> of project with values "<project>-<i>"
// and returns the expected values by key.
func (e *env) fill(t testing.TB, project string, n int) map[string]string {
	t.Helper()
	want := map[string]string{}
	for i := range n {
		key := fmt.Sprint("R", i)
		want[key] = fmt.Sprintf("%s-%d", project, i)
		s, err := e.col.Seal(context.Background(), project, []string{key}, []byte(want[key]))
		if err != nil {
			t.Fatal(err)
		}
		if err := e.insert(t, project, key, s); err != nil {
			t.Fatal(err)
		}
	}
	return want
}

// check opens every row of project with col and compares it with want.
func check(t testing.TB, e *env, col *pgcolumn.Encrypted, project string, want map[string]string) {
	t.Helper()
	rows, err := e.pool.Query(context.Background(), `SELECT key, value_encrypted FROM secrets WHERE project_id = $1`, project)
	if err != nil {
		t.Fatal(err)
	}
	var (
		key    string
		stored []byte
		n      int
	)
	if _, err := pgx.ForEachRow(rows, []any{&key, &stored}, func() error {
		n++
		v, err := col.Open(context.Background(), project, []string{key}, stored)
		if err != nil || string(v) != want[key] {
			return fmt.Errorf("row %s: %q, %v; want %q", key, v, err, want[key])
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n != len(want) {
		t.Fatalf("project %s: %d rows, want %d", project, n, len(want))
	}
}

// Reencrypt moves a project's rows to a fresh key of the column's scope
// while two writers (each with its own Store, as other processes) keep
// rewriting rows; nothing they committed is lost, every row opens, the old
// keys are destroyed, and other projects and keybroker's own secrets keep
// theirs.
func TestReencryptWithWriters(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p, q := e.project(t), e.project(t)
	want := e.fill(t, p, 300)
	wantQ := e.fill(t, q, 20)
	if err := e.store.Put(ctx, p, "own-secret", []byte("kept")); err != nil {
		t.Fatal(err)
	}
	oldKeys := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = $1 AND scope = $2`, p, secretsColumn.Scope())
	if oldKeys != 1 {
		t.Fatalf("%d column keys before, want 1", oldKeys)
	}
	ownKey := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = $1 AND scope = '' AND state = 'active'`, p)

	res, err := e.col.Reencrypt(ctx, p, pgcolumn.ReencryptOptions{DryRun: true})
	if err != nil || res.Pending != 300 || res.RetiredKeys != 0 {
		t.Fatalf("DryRun = %+v, %v; want 300 pending, nothing done", res, err)
	}

	var (
		mu      sync.Mutex
		wg      sync.WaitGroup
		stop    = make(chan struct{})
		started sync.WaitGroup
	)
	for w := range 2 {
		col, err := pgcolumn.New(ctx, newStoreOn(t, e), secretsColumn, pgcolumn.Options{})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		started.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				key := fmt.Sprint("R", (2*i+w)%300)
				val := fmt.Sprintf("w%d-%d", w, i)
				tx, err := e.pool.Begin(ctx)
				if err != nil {
					t.Error(err)
					return
				}
				err = col.Write(ctx, tx, p, []string{key}, []byte(val), func(ctx context.Context, tx pgx.Tx, sealed []byte) error {
					_, err := tx.Exec(ctx, `UPDATE secrets SET value_encrypted = $3, updated_at = now() WHERE project_id = $1 AND key = $2`, p, key, sealed)
					return err
				})
				if err == nil {
					err = tx.Commit(ctx)
				}
				tx.Rollback(ctx)
				if err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				mu.Lock()
				want[key] = val
				mu.Unlock()
				if i == 0 {
					started.Done()
				}
				select {
				case <-stop:
					return
				default:
				}
			}
		}()
	}
	started.Wait()
	var progress []pgcolumn.ReencryptProgress
	res, err = e.col.Reencrypt(ctx, p, pgcolumn.ReencryptOptions{BatchSize: 50, Progress: func(p pgcolumn.ReencryptProgress) { progress = append(progress, p) }})
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if res.RetiredKeys != 1 || res.DestroyedKeys != 1 || res.RemainingKeys != 0 || res.Reencrypted == 0 || len(progress) == 0 {
		t.Fatalf("Reencrypt = %+v (%d progress calls); want 1 key retired and destroyed, none left", res, len(progress))
	}
	// A fresh Store (cold cache) reads every row with the value last
	// committed.
	fresh, err := pgcolumn.New(ctx, newStoreOn(t, e), secretsColumn, pgcolumn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	check(t, e, fresh, p, want)
	check(t, e, fresh, q, wantQ)
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = $1 AND scope = $2 AND state = 'retired'`, p, secretsColumn.Scope()); n != 0 {
		t.Fatalf("%d retired column keys left", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = $1 AND scope = $2 AND state = 'active'`, q, secretsColumn.Scope()); n != 1 {
		t.Fatalf("other project: %d active column keys, want 1 (untouched)", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = $1 AND scope = '' AND state = 'active'`, p); n != ownKey {
		t.Fatalf("keybroker's own secrets' key: %d active, want %d", n, ownKey)
	}
	if v, err := e.store.Get(ctx, p, "own-secret"); err != nil || string(v) != "kept" {
		t.Fatalf("own secret after Reencrypt: %q, %v", v, err)
	}
	for _, ev := range []string{"dek.retire", "dek.reencrypt", "dek.destroy"} {
		if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = $1 AND project_id = $2 AND detail->>'column' = $3`, ev, p, secretsColumn.Scope()); n == 0 {
			t.Errorf("no %s event naming the column", ev)
		}
	}
	if n := count(t, e.pool, `SELECT coalesce(sum(count), 0) FROM keybroker.key_events WHERE event = 'dek.reencrypt' AND project_id = $1`, p); n != res.Reencrypted {
		t.Errorf("dek.reencrypt events count %d rows, Reencrypt says %d", n, res.Reencrypted)
	}
}

// An interrupted Reencrypt (keys retired, rows not yet moved) is finished
// by Resume, which retires nothing new.
func TestReencryptResume(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p := e.project(t)
	want := e.fill(t, p, 30)
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET state = 'retired' WHERE project_id = $1`, p); err != nil {
		t.Fatal(err)
	}
	res, err := e.col.Reencrypt(ctx, p, pgcolumn.ReencryptOptions{Resume: true, BatchSize: 7})
	if err != nil || res.Pending != 30 || res.Reencrypted != 30 || res.RetiredKeys != 0 || res.DestroyedKeys != 1 {
		t.Fatalf("Resume = %+v, %v", res, err)
	}
	check(t, e, e.col, p, want)
	// Nothing left to do: a second Resume changes nothing.
	if res, err := e.col.Reencrypt(ctx, p, pgcolumn.ReencryptOptions{Resume: true}); err != nil || res.Pending != 0 || res.Reencrypted != 0 {
		t.Fatalf("second Resume = %+v, %v", res, err)
	}
}

// A value that does not open stops Reencrypt with an error naming its row
// (never its value); the retired key it still needs is kept, everything
// else stays readable, and Resume finishes once the row is repaired.
func TestReencryptUnreadableRow(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p := e.project(t)
	want := e.fill(t, p, 10)
	if _, err := e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = (SELECT value_encrypted FROM secrets WHERE project_id = $1 AND key = 'R0')
WHERE project_id = $1 AND key = 'R5'`, p); err != nil {
		t.Fatal(err)
	}
	_, err := e.col.Reencrypt(ctx, p, pgcolumn.ReencryptOptions{BatchSize: 3})
	if !errors.Is(err, envelope.ErrDecrypt) || !strings.Contains(err.Error(), `row ["R5"]`) || strings.Contains(err.Error(), want["R0"]) {
		t.Fatalf("Reencrypt with an unreadable row: %v; want ErrDecrypt naming row R5", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = $1 AND state = 'retired'`, p); n != 1 {
		t.Fatalf("%d retired keys after the failed run, want the old one kept", n)
	}
	// Repair R5 (the application writes it again), then resume.
	sealed, err := e.col.Seal(ctx, p, []string{"R5"}, []byte(want["R5"]))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = $2 WHERE project_id = $1 AND key = 'R5'`, p, sealed); err != nil {
		t.Fatal(err)
	}
	res, err := e.col.Reencrypt(ctx, p, pgcolumn.ReencryptOptions{Resume: true})
	if err != nil || res.DestroyedKeys != 1 || res.RemainingKeys != 0 {
		t.Fatalf("Resume after the repair = %+v, %v", res, err)
	}
	check(t, e, e.col, p, want)
}
