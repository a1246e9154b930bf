package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"log"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

// Deleting a tenant crypto-shreds it: its data keys and secrets go, and
// the id refuses writes until reopened.
func ExampleStore_ShredProject() {
	ctx := context.Background()
	pool := exampleDB(ctx)
	defer pool.Close()
	kek, err := local.Generate("example")
	if err != nil {
		log.Fatal(err)
	}
	if err := pgstore.Migrate(ctx, pool, "example_shred"); err != nil {
		log.Fatal(err)
	}
	defer pool.Exec(ctx, `DROP SCHEMA example_shred CASCADE`)
	s, err := pgstore.New(ctx, pool, pgstore.Config{Schema: "example_shred", KEK: kek, Actor: "example"})
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()
	for _, name := range []string{"stripe", "github"} {
		if err := s.Put(ctx, "tenant-7", name, []byte("value")); err != nil {
			log.Fatal(err)
		}
	}

	res, err := s.ShredProject(ctx, "tenant-7")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("destroyed %d data key(s) and %d secret(s)\n", res.DataKeys, res.Secrets)
	_, err = s.Get(ctx, "tenant-7", "stripe")
	fmt.Println(errors.Is(err, pgstore.ErrNotFound))
	err = s.Put(ctx, "tenant-7", "late-write", []byte("value"))
	fmt.Println(errors.Is(err, pgstore.ErrProjectShredded))
	// Output:
	// destroyed 1 data key(s) and 2 secret(s)
	// true
	// true
}
