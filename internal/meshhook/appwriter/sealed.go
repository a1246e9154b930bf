package main

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/internal/meshhook"
	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	_ "github.com/profullstack/keybroker/provider/local" // local:// keyring files
)

// "sealed" is the application after adopting keybroker: values sealed by
// pgcolumn for secrets.value_encrypted (installed beforehand), under the
// KEK that KEYBROKER_KEK names (a provider URL, e.g. local:///path).
func init() {
	meshhook.RegisterEncoder("sealed", func(ctx context.Context, env meshhook.EncoderEnv) (meshhook.Encoder, error) {
		kek, err := provider.Open(ctx, env.Getenv("KEYBROKER_KEK"))
		if err != nil {
			return nil, fmt.Errorf("KEYBROKER_KEK: %w", err)
		}
		store, err := pgstore.New(ctx, env.Pool, pgstore.Config{KEK: kek, Actor: "appwriter"})
		if err != nil {
			return nil, err
		}
		col, err := pgcolumn.New(ctx, store, pgcolumn.Column{Table: env.Schema + ".secrets", Project: "project_id", Key: []string{"key"}, Value: "value_encrypted"}, pgcolumn.Options{})
		if err != nil {
			return nil, err
		}
		return sealedEncoder{col}, nil
	})
}

type sealedEncoder struct{ col *pgcolumn.Encrypted }

func (s sealedEncoder) Encode(ctx context.Context, _ pgx.Tx, project, key string, plaintext []byte) ([]byte, error) {
	return s.col.Seal(ctx, project, []string{key}, plaintext)
}
