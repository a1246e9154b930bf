package pgstore_test

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"slices"
	"testing"

	lg "github.com/profullstack/keybroker/legacy"
	"github.com/profullstack/keybroker/pgstore"
)

// meshHookV1 encrypts pt as MeshHook does: "v1:<iv>:<tag>:<ct>",
// AES-256-GCM, no associated data.
func meshHookV1(t testing.TB, key, pt []byte) []byte {
	t.Helper()
	b, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		t.Fatal(err)
	}
	iv := make([]byte, 12)
	rand.Read(iv)
	sealed := a.Seal(nil, iv, pt, nil)
	ct, tag := sealed[:len(pt)], sealed[len(pt):]
	b64 := base64.StdEncoding.EncodeToString
	return []byte("v1:" + b64(iv) + ":" + b64(tag) + ":" + b64(ct))
}

// import-plaintext's decoders: plaintext and v1 values in one NOT NULL
// column, a plaintext that looks like v1, a v1 whose tag fails (left alone
// and named, never stored), the key read from the environment by URL.
func TestMigratePlaintextLegacyDecoder(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	key := make([]byte, 32)
	rand.Read(key)
	t.Setenv("TEST_MESHHOOK_KEY", hex.EncodeToString(key))
	if _, err := e.pool.Exec(ctx, `CREATE TABLE mh (id bigint PRIMARY KEY, project text NOT NULL, name text NOT NULL, value bytea NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	broken := meshHookV1(t, key, []byte("tampered"))
	broken[len(broken)-5] ^= 1 // "y" to "x" in a full base64 group: still canonical, the tag fails
	want := map[int]string{}
	for i := 1; i <= 40; i++ {
		pt := fmt.Sprintf("secret-%d", i)
		stored := []byte(pt)
		switch i % 4 {
		case 0:
			stored = meshHookV1(t, key, []byte(pt))
		case 1:
			pt = "v1:abc:def:" + pt // a look-alike: a plaintext
			stored = []byte(pt)
		}
		if i == 17 {
			stored, pt = broken, ""
		}
		if pt != "" {
			want[i] = pt
		}
		if _, err := e.pool.Exec(ctx, `INSERT INTO mh VALUES ($1, $2, $3, $4)`, i, fmt.Sprintf("p%d", i%3), fmt.Sprintf("n%d", i), stored); err != nil {
			t.Fatal(err)
		}
	}
	v1, err := lg.Open("meshhook-v1://env/TEST_MESHHOOK_KEY")
	if err != nil {
		t.Fatal(err)
	}
	dec, err := lg.NewChain(v1, lg.Plaintext())
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	src := pgstore.PlaintextSource{Table: "mh", KeyColumn: "id", ProjectColumn: "project", NameColumn: "name", ValueColumn: "value"}
	res, err := e.store.MigratePlaintext(ctx, src, pgstore.MigrateOptions{BatchSize: 6, Legacy: dec})
	if err != nil {
		t.Fatal(err)
	}
	if res.Migrated != 39 || res.Undecodable != 1 || res.Conflicts != 0 || res.LastKey != "40" {
		t.Fatalf("result %+v", res)
	}
	if w := []pgstore.MigrateConflict{{Key: "17", Project: "p2", Name: "n17"}}; !slices.Equal(res.UndecodableRows, w) {
		t.Fatalf("undecodable rows %+v, want %+v", res.UndecodableRows, w)
	}
	for i := 1; i <= 40; i++ {
		got, err := e.store.Get(ctx, fmt.Sprintf("p%d", i%3), fmt.Sprintf("n%d", i))
		if w, ok := want[i]; !ok {
			if err == nil {
				t.Fatalf("row %d: the broken v1 value was stored", i)
			}
		} else if err != nil || string(got) != w {
			t.Fatalf("row %d: %q, %v; want %q", i, got, err, w)
		}
	}
	// Every batch's event counts the rows it read, the broken one included.
	if n := count(t, e.pool, `SELECT coalesce(sum((detail->>'undecodable')::int), 0) FROM keybroker.key_events WHERE event = 'migrate.plaintext'`); n != 1 {
		t.Fatalf("events count %d undecodable rows, want 1", n)
	}
	// A rerun finds the stored secrets present and the broken row again.
	res, err = e.store.MigratePlaintext(ctx, src, pgstore.MigrateOptions{Legacy: dec})
	if err != nil || res.AlreadyPresent != 39 || res.Undecodable != 1 || res.Migrated != 0 {
		t.Fatalf("rerun: %+v, %v", res, err)
	}
	// A closed decoder fails the run instead of counting every row.
	dec.Close()
	if _, err := e.store.MigratePlaintext(ctx, src, pgstore.MigrateOptions{Legacy: dec}); err == nil {
		t.Fatal("closed decoder: no error")
	}
}
