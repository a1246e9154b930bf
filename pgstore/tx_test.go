package pgstore_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/pgstore"
)

// A Put in the caller's transaction commits or rolls back with the caller's
// own rows; inside the transaction Get, GetMany and List see it.
func TestInTransaction(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	if _, err := e.pool.Exec(ctx, `CREATE TABLE app_rows (project text, name text)`); err != nil {
		t.Fatal(err)
	}

	write := func(name string, commit bool) {
		t.Helper()
		tx, err := e.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		if _, err := tx.Exec(ctx, `INSERT INTO app_rows VALUES ('p', $1)`, name); err != nil {
			t.Fatal(err)
		}
		in := e.store.In(tx)
		if err := in.Put(ctx, "p", name, []byte("v-"+name)); err != nil {
			t.Fatal(err)
		}
		// The transaction reads its own write; the pool does not yet.
		if v, err := in.Get(ctx, "p", name); err != nil || !bytes.Equal(v, []byte("v-"+name)) {
			t.Fatalf("Get in tx = %q, %v", v, err)
		}
		if m, err := in.GetMany(ctx, "p", []string{name}); err != nil || len(m) != 1 {
			t.Fatalf("GetMany in tx = %d values, %v", len(m), err)
		}
		if l, err := in.List(ctx, "p"); err != nil || len(l) == 0 {
			t.Fatalf("List in tx = %d, %v", len(l), err)
		}
		if _, err := e.store.Get(ctx, "p", name); !errors.Is(err, pgstore.ErrNotFound) {
			t.Fatalf("Get outside the open tx: %v, want ErrNotFound", err)
		}
		if commit {
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	write("kept", true)
	write("dropped", false)

	if v, err := e.store.Get(ctx, "p", "kept"); err != nil || string(v) != "v-kept" {
		t.Fatalf("committed secret: %q, %v", v, err)
	}
	if _, err := e.store.Get(ctx, "p", "dropped"); !errors.Is(err, pgstore.ErrNotFound) {
		t.Fatalf("rolled-back secret: %v, want ErrNotFound", err)
	}
	var rows int
	if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM app_rows`).Scan(&rows); err != nil || rows != 1 {
		t.Fatalf("app rows = %d, %v; want 1", rows, err)
	}
	// The data key the rolled-back Put reserved is the project's active key,
	// used by the next Put: no orphan.
	var keys int
	if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM keybroker.data_keys WHERE project_id = 'p'`).Scan(&keys); err != nil || keys != 1 {
		t.Fatalf("data keys = %d, %v; want 1", keys, err)
	}

	// A Delete rolled back leaves the secret; committed, removes it.
	for _, commit := range []bool{false, true} {
		err := pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
			if err := e.store.In(tx).Delete(ctx, "p", "kept"); err != nil {
				return err
			}
			if !commit {
				return errRollback
			}
			return nil
		})
		if err != nil && !errors.Is(err, errRollback) {
			t.Fatal(err)
		}
		_, err = e.store.Get(ctx, "p", "kept")
		if commit != errors.Is(err, pgstore.ErrNotFound) {
			t.Fatalf("after Delete (commit %v): Get err %v", commit, err)
		}
	}
}

var errRollback = errors.New("roll back")
