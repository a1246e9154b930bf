package meshhook

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	_ "github.com/profullstack/keybroker/provider/local" // local:// for KEYBROKER_KEK
)

// StoreMarker prefixes the value StoreEncoder leaves in value_encrypted:
// StoreMarker + key, the value itself being in keybroker's own table.
const StoreMarker = "keybroker-store:"

func init() {
	RegisterEncoder("keybroker-store", func(ctx context.Context, env EncoderEnv) (Encoder, error) {
		kek, err := provider.Open(ctx, env.Getenv("KEYBROKER_KEK"))
		if err != nil {
			return nil, fmt.Errorf("meshhook: KEYBROKER_KEK: %w", err)
		}
		s, err := pgstore.New(ctx, env.Pool, pgstore.Config{Schema: env.Getenv("KEYBROKER_SCHEMA"), KEK: kek, Actor: "appwriter"})
		if err != nil {
			return nil, err
		}
		return StoreEncoder{s}, nil
	})
}

// StoreEncoder is MeshHook on keybroker's own table, as pgstore offers it
// today: the value goes to the Store (pgstore.Store.Put, its own
// transaction, committed before the application's row), and the
// application's column keeps StoreMarker + key. Its failure for a deleted
// project is pgstore.ErrProjectShredded.
type StoreEncoder struct{ Store *pgstore.Store }

// Encode implements Encoder.
func (e StoreEncoder) Encode(ctx context.Context, _ pgx.Tx, project, key string, plaintext []byte) ([]byte, error) {
	if err := e.Store.Put(ctx, project, key, plaintext); err != nil {
		return nil, err
	}
	return []byte(StoreMarker + key), nil
}
