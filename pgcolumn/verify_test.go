package pgcolumn_test

import (
	"context"
	"slices"
	"testing"

	"github.com/profullstack/keybroker/pgcolumn"
)

func TestVerifyAndStatus(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p, q := e.project(t), e.project(t)
	e.fill(t, p, 25)
	e.fill(t, q, 3)
	if err := e.insert(t, p, "legacy", []byte("plaintext")); err != nil {
		t.Fatal(err)
	}
	// R0's value copied into R1 (same project and column: the fence lets
	// it through, the row binding does not).
	if _, err := e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = (SELECT value_encrypted FROM secrets WHERE project_id = $1 AND key = 'R0')
WHERE project_id = $1 AND key = 'R1'`, p); err != nil {
		t.Fatal(err)
	}
	// q's data key destroyed behind keybroker's back.
	if _, err := e.pool.Exec(ctx, `DELETE FROM keybroker.data_keys WHERE project_id = $1`, q); err != nil {
		t.Fatal(err)
	}
	col, err := pgcolumn.New(ctx, newStoreOn(t, e), secretsColumn, pgcolumn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := col.Verify(ctx, pgcolumn.VerifyOptions{BatchSize: 4, MaxReported: 2})
	if err != nil {
		t.Fatal(err)
	}
	if res.Rows != 29 || res.Opened != 24 || res.Unsealed != 1 || res.Unreadable != 4 || len(res.UnreadableRows) != 2 {
		t.Fatalf("Verify = %+v; want 29 rows, 24 opened, 1 unsealed, 4 unreadable (2 reported)", res)
	}
	res, err = col.Verify(ctx, pgcolumn.VerifyOptions{Project: p})
	if err != nil {
		t.Fatal(err)
	}
	if res.Rows != 26 || res.Opened != 24 || res.Unreadable != 1 || len(res.UnreadableRows) != 1 ||
		res.UnreadableRows[0].Project != p || !slices.Equal(res.UnreadableRows[0].Key, []string{"R1"}) {
		t.Fatalf("Verify of one project = %+v; want R1 unreadable", res)
	}

	st, err := col.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Rows != 29 || st.Unsealed != 1 || st.NoKey != 3 || st.Malformed != 0 || !st.AcceptLegacy || len(st.Keys) != 1 ||
		st.Keys[0].State != "active" || st.Keys[0].Rows != 25 || st.Keys[0].DataKeys != 1 || st.Keys[0].Provider != "local" {
		t.Fatalf("Status = %+v", st)
	}
}
