package pgstore_test

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

// exampleDB connects to the test server (any database will do; the example
// uses its own schema and drops it afterwards).
func exampleDB(ctx context.Context) *pgxpool.Pool {
	pool, err := pgxpool.New(ctx, os.Getenv(pgtest.EnvURL))
	if err != nil {
		log.Fatal(err)
	}
	return pool
}

func Example() {
	ctx := context.Background()
	pool := exampleDB(ctx)
	defer pool.Close()
	kek, err := local.Generate("example") // in production: provider.Open(ctx, url)
	if err != nil {
		log.Fatal(err)
	}

	if err := pgstore.Migrate(ctx, pool, "example_kb"); err != nil {
		log.Fatal(err)
	}
	defer pool.Exec(ctx, `DROP SCHEMA example_kb CASCADE`)
	s, err := pgstore.New(ctx, pool, pgstore.Config{Schema: "example_kb", KEK: kek, Actor: "example"})
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()

	if err := s.Put(ctx, "project-1", "stripe-key", []byte("sk_test_123")); err != nil {
		log.Fatal(err)
	}
	v, err := s.Get(ctx, "project-1", "stripe-key")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(v))

	// Rotate the KEK and rewrap: with the key hierarchy (the default) only
	// the intermediate key is rewrapped, one key-service call; data keys
	// and secrets are not rewritten.
	ver, err := s.RotateKEK(ctx)
	if err != nil {
		log.Fatal(err)
	}
	res, err := s.Rewrap(ctx, pgstore.RewrapOptions{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("rewrapped", res.IntermediateKeys, "intermediate key(s) and", res.Rewrapped, "data key(s) to version", ver.Version)
	// The old version is no longer needed.
	if err := s.RetireKEK(ctx, pgstore.KEKVersion{Provider: "local", KeyID: "example", Version: "1"}); err != nil {
		log.Fatal(err)
	}
	// Output:
	// sk_test_123
	// rewrapped 1 intermediate key(s) and 0 data key(s) to version 2
}

func ExampleStore_MigratePlaintext() {
	ctx := context.Background()
	pool := exampleDB(ctx)
	defer pool.Close()
	kek, _ := local.Generate("example")
	if err := pgstore.Migrate(ctx, pool, "example_mig"); err != nil {
		log.Fatal(err)
	}
	defer pool.Exec(ctx, `DROP SCHEMA example_mig CASCADE; DROP TABLE example_legacy`)
	s, err := pgstore.New(ctx, pool, pgstore.Config{Schema: "example_mig", KEK: kek})
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()
	_, err = pool.Exec(ctx, `CREATE TABLE example_legacy (id serial PRIMARY KEY, project text, name text, secret text);
		INSERT INTO example_legacy (project, name, secret) VALUES ('p1', 'db', 'pw1'), ('p2', 'db', 'pw2')`)
	if err != nil {
		log.Fatal(err)
	}

	res, err := s.MigratePlaintext(ctx, pgstore.PlaintextSource{
		Table: "example_legacy", KeyColumn: "id", ProjectColumn: "project", NameColumn: "name", ValueColumn: "secret",
	}, pgstore.MigrateOptions{ClearPlaintext: true})
	if err != nil {
		log.Fatal(err)
	}
	v, _ := s.Get(ctx, "p2", "db")
	fmt.Println(res.Migrated, res.Cleared, string(v))
	// Output: 2 2 pw2
}

func ExampleWithProject() {
	ctx := context.Background()
	pool := exampleDB(ctx)
	defer pool.Close()
	if err := pgstore.Migrate(ctx, pool, "example_rls"); err != nil {
		log.Fatal(err)
	}
	defer pool.Exec(ctx, `DROP SCHEMA example_rls CASCADE`)
	// For a role subject to row-level security, statements in fn see only
	// project p1's rows.
	err := pgstore.WithProject(ctx, pool, "p1", func(tx pgx.Tx) error {
		var n int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM example_rls.encrypted_secrets`).Scan(&n); err != nil {
			return err
		}
		fmt.Println(n, "secrets")
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	// Output: 0 secrets
}
