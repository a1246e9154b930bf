package pgcolumn_test

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

// An application's secrets table, its rows and their sealed values written
// in one transaction, a run's secrets read back in one call, and the
// column re-encrypted in place.
func Example() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv(pgtest.EnvURL)) // the application's pool
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	kek, err := local.Generate("example") // in production: provider.Open(ctx, url)
	if err != nil {
		log.Fatal(err)
	}
	if err := pgstore.Migrate(ctx, pool, "example_kbcol"); err != nil {
		log.Fatal(err)
	}
	defer pool.Exec(ctx, `DROP SCHEMA example_kbcol CASCADE; DROP SCHEMA example_app CASCADE`)
	if _, err := pool.Exec(ctx, `CREATE SCHEMA example_app;
CREATE TABLE example_app.secrets (project_id uuid NOT NULL, key text NOT NULL, value_encrypted bytea NOT NULL, UNIQUE (project_id, key))`); err != nil {
		log.Fatal(err)
	}
	store, err := pgstore.New(ctx, pool, pgstore.Config{Schema: "example_kbcol", KEK: kek})
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()

	col := pgcolumn.Column{Table: "example_app.secrets", Project: "project_id", Key: []string{"key"}, Value: "value_encrypted"}
	if err := pgcolumn.Install(ctx, store, col); err != nil { // once, as the migrating role
		log.Fatal(err)
	}
	enc, err := pgcolumn.New(ctx, store, col, pgcolumn.Options{})
	if err != nil {
		log.Fatal(err)
	}

	project := "0b5b7a52-51a1-4c47-9d0e-3a9c1f0d6c11" // the uuid's text form
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		for _, name := range []string{"STRIPE_KEY", "GITHUB_TOKEN"} {
			err := enc.Write(ctx, tx, project, []string{name}, []byte("value of "+name), func(ctx context.Context, tx pgx.Tx, sealed []byte) error {
				_, err := tx.Exec(ctx, `INSERT INTO example_app.secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)`, project, name, sealed)
				return err
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}

	rows, err := pool.Query(ctx, `SELECT key, value_encrypted FROM example_app.secrets WHERE project_id = $1 ORDER BY key`, project)
	if err != nil {
		log.Fatal(err)
	}
	var batch []pgcolumn.Row
	var name string
	var stored []byte
	if _, err := pgx.ForEachRow(rows, []any{&name, &stored}, func() error {
		batch = append(batch, pgcolumn.Row{Key: []string{name}, Stored: stored})
		return nil
	}); err != nil {
		log.Fatal(err)
	}
	values, err := enc.OpenMany(ctx, project, batch)
	if err != nil {
		log.Fatal(err)
	}
	for i, v := range values {
		fmt.Printf("%s = %s\n", batch[i].Key[0], v)
	}

	res, err := enc.Reencrypt(ctx, project, pgcolumn.ReencryptOptions{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("re-encrypted %d values, destroyed %d data key\n", res.Reencrypted, res.DestroyedKeys)
	// Output:
	// GITHUB_TOKEN = value of GITHUB_TOKEN
	// STRIPE_KEY = value of STRIPE_KEY
	// re-encrypted 2 values, destroyed 1 data key
}
