package pgcolumn_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgcolumn"
)

func TestSealOpenRoundTrip(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p := e.project(t)
	for _, v := range [][]byte{{}, []byte("hunter2"), bytes.Repeat([]byte{0xff}, pgcolumn.MaxValueLen)} {
		sealed, err := e.col.Seal(ctx, p, []string{"API_KEY"}, v)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.pool.Exec(ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, 'API_KEY', $2)
ON CONFLICT (project_id, key) DO UPDATE SET value_encrypted = EXCLUDED.value_encrypted`, p, sealed); err != nil {
			t.Fatal(err)
		}
		var stored []byte
		if err := e.pool.QueryRow(ctx, `SELECT value_encrypted FROM secrets WHERE project_id = $1 AND key = 'API_KEY'`, p).Scan(&stored); err != nil {
			t.Fatal(err)
		}
		got, err := e.col.Open(ctx, p, []string{"API_KEY"}, stored)
		if err != nil || !bytes.Equal(got, v) {
			t.Fatalf("Open = %d bytes, %v; want %d bytes", len(got), err, len(v))
		}
	}
	if _, err := e.col.Seal(ctx, p, []string{"k"}, make([]byte, pgcolumn.MaxValueLen+1)); !errors.Is(err, pgcolumn.ErrInvalidArgument) {
		t.Fatalf("Seal of MaxValueLen+1 bytes: %v, want ErrInvalidArgument", err)
	}
	if _, err := e.col.Open(ctx, p, []string{"k"}, append([]byte("KBEN"), make([]byte, pgcolumn.MaxSealedLen)...)); !errors.Is(err, envelope.ErrDecrypt) {
		t.Fatalf("Open of an oversized value: %v, want ErrDecrypt", err)
	}
}
