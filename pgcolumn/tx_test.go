package pgcolumn_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
)

// MeshHook's flow: a project row and its sealed secrets are inserted in one
// transaction; committed they open, rolled back nothing is left to read.
func TestTransactionCommitRollback(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	create := func(commit bool) string {
		t.Helper()
		tx, err := e.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		var p string
		if err := tx.QueryRow(ctx, `INSERT INTO projects (owner, name) VALUES (gen_random_uuid(), 'run') RETURNING id::text`).Scan(&p); err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			name := fmt.Sprintf("S%d", i)
			err := e.col.Write(ctx, tx, p, []string{name}, []byte("value-"+name), func(ctx context.Context, tx pgx.Tx, sealed []byte) error {
				_, err := tx.Exec(ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)`, p, name, sealed)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		// The transaction reads its own rows.
		var stored []byte
		if err := tx.QueryRow(ctx, `SELECT value_encrypted FROM secrets WHERE project_id = $1 AND key = 'S0'`, p).Scan(&stored); err != nil {
			t.Fatal(err)
		}
		if v, err := e.col.Open(ctx, p, []string{"S0"}, stored); err != nil || string(v) != "value-S0" {
			t.Fatalf("Open in the transaction = %q, %v", v, err)
		}
		if commit {
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
		}
		return p
	}
	kept, dropped := create(true), create(false)
	rows, err := e.pool.Query(ctx, `SELECT key, value_encrypted FROM secrets WHERE project_id = $1 ORDER BY key`, kept)
	if err != nil {
		t.Fatal(err)
	}
	var got []pgcolumn.Row
	var r pgcolumn.Row
	var k string
	if _, err := pgx.ForEachRow(rows, []any{&k, &r.Stored}, func() error {
		got = append(got, pgcolumn.Row{Key: []string{k}, Stored: bytes.Clone(r.Stored)})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	vals, err := e.col.OpenMany(ctx, kept, got)
	if err != nil || len(vals) != 3 || string(vals[2]) != "value-S2" {
		t.Fatalf("committed project: OpenMany = %q, %v", vals, err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM secrets WHERE project_id = $1`, dropped); n != 0 {
		t.Fatalf("rolled-back project left %d secrets", n)
	}
	// The rolled-back project has no data key in use: the key created for
	// it (outside the transaction, as pgstore.Store.In documents) encrypts
	// nothing that was stored.
	if n := count(t, e.pool, `SELECT count(*) FROM secrets s JOIN keybroker.data_keys d ON d.project_id = s.project_id::text WHERE d.project_id = $1`, dropped); n != 0 {
		t.Fatalf("rolled-back project: %d stored values under its data keys", n)
	}
}

func TestOpenMany(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p := e.project(t)
	var rows []pgcolumn.Row
	for i := range 10 {
		key := []string{fmt.Sprintf("K%d", i)}
		s, err := e.col.Seal(ctx, p, key, []byte(fmt.Sprintf("v%d", i)))
		if err != nil {
			t.Fatal(err)
		}
		rows = append(rows, pgcolumn.Row{Key: key, Stored: s})
	}
	// A second Store (cold cache) opens them, each data key loaded once.
	col, err := pgcolumn.New(ctx, newStoreOn(t, e), secretsColumn, pgcolumn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	vals, err := col.OpenMany(ctx, p, rows)
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range vals {
		if string(v) != fmt.Sprintf("v%d", i) {
			t.Fatalf("value %d = %q", i, v)
		}
	}
	if vals, err := col.OpenMany(ctx, p, nil); err != nil || len(vals) != 0 {
		t.Fatalf("OpenMany of nothing = %v, %v", vals, err)
	}
	// One value in the wrong row fails the call with ErrDecrypt naming it.
	bad := append([]pgcolumn.Row(nil), rows...)
	bad[7].Key = []string{"K0"}
	if vals, err := col.OpenMany(ctx, p, bad); !errors.Is(err, envelope.ErrDecrypt) || vals != nil || err.Error() != "pgcolumn: row 7: "+envelope.ErrDecrypt.Error() {
		t.Fatalf("OpenMany with a moved value = %q, %v", vals, err)
	}
	bad[7] = pgcolumn.Row{Key: []string{"K7"}, Stored: []byte("legacy")}
	if _, err := col.OpenMany(ctx, p, bad); !errors.Is(err, pgcolumn.ErrLegacyRefused) {
		t.Fatalf("OpenMany with an unsealed value: %v, want ErrLegacyRefused", err)
	}
}

// Shredding a project (pgstore.Store.ShredProject) destroys its column
// data keys too: its values no longer open (read by a fresh process) and
// no value can be sealed for it; other projects keep theirs.
func TestShreddedProject(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p, q := e.project(t), e.project(t)
	e.fill(t, p, 3)
	wantQ := e.fill(t, q, 3)
	var stored []byte
	if err := e.pool.QueryRow(ctx, `SELECT value_encrypted FROM secrets WHERE project_id = $1 AND key = 'R0'`, p).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.ShredProject(ctx, p); err != nil {
		t.Fatal(err)
	}
	col, err := pgcolumn.New(ctx, newStoreOn(t, e), secretsColumn, pgcolumn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := col.Open(ctx, p, []string{"R0"}, stored); err != envelope.ErrDecrypt {
		t.Fatalf("Open after the shred: %v, want ErrDecrypt", err)
	}
	if _, err := col.Seal(ctx, p, []string{"R9"}, []byte("v")); !errors.Is(err, pgstore.ErrProjectShredded) {
		t.Fatalf("Seal for a shredded project: %v, want pgstore.ErrProjectShredded", err)
	}
	check(t, e, col, q, wantQ)
}
