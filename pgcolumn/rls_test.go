package pgcolumn_test

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
)

// The application's role, bound by row-level security and owning nothing,
// seals, writes (the fence runs as its definer), opens, verifies and
// re-encrypts its projects' values; what needs every project refuses.
func TestRowSecurityRole(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p := e.project(t)
	role, roleURL := pgtest.NewRole(t, e.url)
	r := pgx.Identifier{role}.Sanitize()
	if _, err := e.pool.Exec(ctx, pgtest.TenantGrants(r)+`;
		GRANT SELECT, INSERT, UPDATE, DELETE ON public.secrets, public.projects TO `+r); err != nil {
		t.Fatal(err)
	}
	pool := pgtest.PoolFor(t, roleURL)
	store, err := pgstore.New(ctx, pool, pgstore.Config{KEK: e.store.Keyring()})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	col, err := pgcolumn.New(ctx, store, secretsColumn, pgcolumn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"A", "B"} {
		err := pgstore.WithProject(ctx, pool, p, func(tx pgx.Tx) error {
			return col.Write(ctx, tx, p, []string{key}, []byte("v-"+key), func(ctx context.Context, tx pgx.Tx, sealed []byte) error {
				_, err := tx.Exec(ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)`, p, key, sealed)
				return err
			})
		})
		if err != nil {
			t.Fatalf("write as the application's role: %v", err)
		}
	}
	// The role cannot call the fence function itself.
	if _, err := pool.Exec(ctx, `SELECT keybroker.column_fence_1()`); err == nil {
		t.Fatal("the application's role can execute the fence function")
	}
	res, err := col.Reencrypt(ctx, p, pgcolumn.ReencryptOptions{})
	if err != nil || res.Reencrypted != 2 || res.DestroyedKeys != 1 {
		t.Fatalf("Reencrypt as the application's role = %+v, %v", res, err)
	}
	v, err := col.Verify(ctx, pgcolumn.VerifyOptions{Project: p})
	if err != nil || v.Opened != 2 || v.Unreadable != 0 {
		t.Fatalf("Verify as the application's role = %+v, %v", v, err)
	}
	if _, err := col.Verify(ctx, pgcolumn.VerifyOptions{}); !errors.Is(err, pgcolumn.ErrInvalidArgument) {
		t.Fatalf("Verify of every project under row-level security: %v, want ErrInvalidArgument", err)
	}
	if _, err := col.Status(ctx); !errors.Is(err, pgcolumn.ErrInvalidArgument) {
		t.Fatalf("Status under row-level security: %v, want ErrInvalidArgument", err)
	}
	check(t, e, e.col, p, map[string]string{"A": "v-A", "B": "v-B"})
}
