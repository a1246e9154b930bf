package hierarchy_test

import (
	"context"
	"log"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
)

// A KEKProvider whose keys are intermediate keys in pgstore's schema. In a
// program using pgstore this is what pgstore.New builds; standalone, wrap
// and unwrap data keys as with any provider.
func Example() {
	ctx := context.Background()
	var (
		pool *pgxpool.Pool        // migrated by pgstore.Migrate
		kek  provider.KEKProvider // the deployment's KEK
	)
	ik, err := hierarchy.New(hierarchy.Config{Pool: pool, KEK: kek})
	if err != nil {
		log.Fatal(err)
	}
	defer ik.Close()
	dek := make([]byte, 32)
	wk, err := ik.Wrap(ctx, dek, []byte("associated data")) // no key-service call once the IK is held
	if err != nil {
		log.Fatal(err)
	}
	if _, err := ik.Unwrap(ctx, wk, []byte("associated data")); err != nil {
		log.Fatal(err)
	}
	// After rotating the KEK at the key service: one call per IK.
	if _, err := ik.RewrapKEK(ctx); err != nil {
		log.Fatal(err)
	}
}
