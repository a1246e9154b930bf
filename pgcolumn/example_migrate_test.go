package pgcolumn_test

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/legacy"
	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

// A column of plaintext (and, with a MeshHook key, "v1:") values sealed in
// place: readers accept both kinds meanwhile, and once every value is
// sealed legacy values are refused for good.
func ExampleEncrypted_MigrateLegacy() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv(pgtest.EnvURL))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	kek, err := local.Generate("example")
	if err != nil {
		log.Fatal(err)
	}
	if err := pgstore.Migrate(ctx, pool, "example_kbmig"); err != nil {
		log.Fatal(err)
	}
	defer pool.Exec(ctx, `DROP SCHEMA example_kbmig CASCADE; DROP SCHEMA example_mig CASCADE`)
	if _, err := pool.Exec(ctx, `CREATE SCHEMA example_mig;
CREATE TABLE example_mig.secrets (project_id uuid NOT NULL, key text NOT NULL, value_encrypted bytea NOT NULL, UNIQUE (project_id, key));
INSERT INTO example_mig.secrets VALUES ('0b5b7a52-51a1-4c47-9d0e-3a9c1f0d6c11', 'STRIPE_KEY', 'sk_live_plaintext')`); err != nil {
		log.Fatal(err)
	}
	store, err := pgstore.New(ctx, pool, pgstore.Config{Schema: "example_kbmig", KEK: kek})
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	col := pgcolumn.Column{Table: "example_mig.secrets", Project: "project_id", Key: []string{"key"}, Value: "value_encrypted"}
	if err := pgcolumn.Install(ctx, store, col); err != nil {
		log.Fatal(err)
	}
	// With MeshHook values: legacy.NewChain(v1, legacy.Plaintext()), v1
	// from legacy.Open("meshhook-v1://env/SECRETS_ENCRYPTION_KEY").
	enc, err := pgcolumn.New(ctx, store, col, pgcolumn.Options{Legacy: legacy.Plaintext()})
	if err != nil {
		log.Fatal(err)
	}
	res, err := enc.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: legacy.Plaintext()})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("sealed %d, remaining %d\n", res.Migrated, res.Remaining)
	if err := enc.RefuseLegacy(ctx); err != nil {
		log.Fatal(err)
	}
	var stored []byte
	if err := pool.QueryRow(ctx, `SELECT value_encrypted FROM example_mig.secrets`).Scan(&stored); err != nil {
		log.Fatal(err)
	}
	v, err := enc.Open(ctx, "0b5b7a52-51a1-4c47-9d0e-3a9c1f0d6c11", []string{"STRIPE_KEY"}, stored)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(v))
	// Output:
	// sealed 1, remaining 0
	// sk_live_plaintext
}
