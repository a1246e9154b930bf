package pgcolumn_test

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
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

// insert stores sealed as the value of row key of project.
func (e *env) insert(t testing.TB, project, key string, sealed []byte) error {
	t.Helper()
	_, err := e.pool.Exec(context.Background(), `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)`, project, key, sealed)
	return err
}

// A value opens only in the row, column and project it was sealed for,
// and any altered byte makes it fail with the one opaque ErrDecrypt.
func TestOpenBinding(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p, q := e.project(t), e.project(t)
	sealed, err := e.col.Seal(ctx, p, []string{"A"}, []byte("value-a"))
	if err != nil {
		t.Fatal(err)
	}
	if v, err := e.col.Open(ctx, p, []string{"A"}, sealed); err != nil || string(v) != "value-a" {
		t.Fatalf("Open = %q, %v", v, err)
	}
	other := pgcolumn.Context{Table: "public.secrets", Column: "other_column", Row: []string{"A"}}
	cases := map[string]func() ([]byte, error){
		"other row":     func() ([]byte, error) { return e.col.Open(ctx, p, []string{"B"}, sealed) },
		"other project": func() ([]byte, error) { return e.col.Open(ctx, q, []string{"A"}, sealed) },
		"other column":  func() ([]byte, error) { return pgcolumn.OpenContext(ctx, e.store, p, other, sealed) },
		"row split":     func() ([]byte, error) { return e.col.Open(ctx, p, []string{"A", ""}, sealed) },
		"truncated":     func() ([]byte, error) { return e.col.Open(ctx, p, []string{"A"}, sealed[:len(sealed)-1]) },
		"header only":   func() ([]byte, error) { return e.col.Open(ctx, p, []string{"A"}, sealed[:40]) },
		"magic only":    func() ([]byte, error) { return e.col.Open(ctx, p, []string{"A"}, sealed[:4]) },
		"trailing byte": func() ([]byte, error) { return e.col.Open(ctx, p, []string{"A"}, append(bytes.Clone(sealed), 0)) },
	}
	for i := 4; i < len(sealed); i++ {
		altered := bytes.Clone(sealed)
		altered[i] ^= 0x01
		cases["byte "+strconv.Itoa(i)] = func() ([]byte, error) { return e.col.Open(ctx, p, []string{"A"}, altered) }
	}
	for name, open := range cases {
		if v, err := open(); err != envelope.ErrDecrypt {
			t.Errorf("%s: Open = %q, %v; want the bare envelope.ErrDecrypt", name, v, err)
		}
	}
	// An unsealed value is not ErrDecrypt: it is a legacy value, which
	// this reader (no legacy decoder) refuses.
	if _, err := e.col.Open(ctx, p, []string{"A"}, []byte("plain")); !errors.Is(err, pgcolumn.ErrLegacyRefused) {
		t.Fatalf("Open of plaintext: %v, want ErrLegacyRefused", err)
	}
	// Its data key destroyed, the value is ErrDecrypt too (from a fresh
	// Store: this one caches the unwrapped key).
	if _, err := e.pool.Exec(ctx, `DELETE FROM keybroker.data_keys`); err != nil {
		t.Fatal(err)
	}
	fresh := newStoreOn(t, e)
	col, err := pgcolumn.New(ctx, fresh, secretsColumn, pgcolumn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := col.Open(ctx, p, []string{"A"}, sealed); err != envelope.ErrDecrypt {
		t.Fatalf("Open with the data key destroyed: %v, want ErrDecrypt", err)
	}
}

func TestArgumentsRefused(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p := e.project(t)
	for name, key := range map[string][]string{
		"no key":       nil,
		"not UTF-8":    {"\xff"},
		"too many":     make([]string, pgcolumn.MaxRowFields+1),
		"too long key": {strings.Repeat("k", pgcolumn.MaxRowLen+1)},
	} {
		if _, err := e.col.Seal(ctx, p, key, []byte("v")); !errors.Is(err, pgcolumn.ErrInvalidArgument) {
			t.Errorf("Seal with %s: %v, want ErrInvalidArgument", name, err)
		}
		if _, err := e.col.Open(ctx, p, key, []byte("KBEN")); !errors.Is(err, pgcolumn.ErrInvalidArgument) {
			t.Errorf("Open with %s: %v, want ErrInvalidArgument", name, err)
		}
	}
	for _, project := range []string{"", "a\x00b", strings.Repeat("p", pgstore.MaxProjectLen+1)} {
		if _, err := e.col.Seal(ctx, project, []string{"k"}, []byte("v")); !errors.Is(err, pgcolumn.ErrInvalidArgument) {
			t.Errorf("Seal for project %q: %v, want ErrInvalidArgument", project, err)
		}
	}
}
