package pgstore_test

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"encoding/binary"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

// docs/STORAGE.md, intermediate_key_recovery: a recovery wrap under a
// local keyring opens by hand, with the standard library and the
// document's layout only, to the same IK the IK's own wrap holds; and the
// document names every table of migration 006.
func TestStorageDocumentRecovery(t *testing.T) {
	ctx := context.Background()
	raw, err := os.ReadFile(filepath.Join("..", "docs", "STORAGE.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"`intermediate_key_recovery`", "`tenant_chains`", "`project_keks`", "`data_keys_tenant_fence`", "KB006"} {
		if !strings.Contains(string(raw), s) {
			t.Errorf("docs/STORAGE.md does not mention %s", s)
		}
	}
	dir := t.TempDir()
	write := func(name, js string) *local.Provider {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(js), 0o600); err != nil {
			t.Fatal(err)
		}
		p, err := local.OpenFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	const kekKey, recKey = "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=", "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="
	kek := write("kek.json", `{"id":"kek","primary":1,"keys":[{"version":1,"key":"`+kekKey+`"}]}`)
	rec := write("rec.json", `{"id":"safe","primary":1,"keys":[{"version":1,"key":"`+recKey+`"}]}`)
	e := newEnv(t, pgstore.Config{KEK: kek})
	mustPut(t, e.store, "p", "s", "v")
	if _, err := e.store.AddRecovery(ctx, rec); err != nil {
		t.Fatal(err)
	}
	field := func(b, f []byte) []byte { return append(binary.BigEndian.AppendUint32(b, uint32(len(f))), f...) }
	openLocal := func(keyB64, id, version string, wrapped, aad []byte) []byte {
		t.Helper()
		key, _ := base64.StdEncoding.DecodeString(keyB64)
		n, err := strconv.ParseUint(version, 10, 32)
		if err != nil || len(wrapped) != 61 || wrapped[0] != 1 {
			t.Fatalf("version %q, wrapped %d bytes", version, len(wrapped))
		}
		ad := append([]byte("keybroker/local/v1\x00"), byte(len(id)))
		ad = append(ad, id...)
		ad = binary.BigEndian.AppendUint32(ad, uint32(n))
		ad = append(ad, aad...)
		b, _ := aes.NewCipher(key)
		g, _ := cipher.NewGCM(b)
		pt, err := g.Open(nil, wrapped[1:13], wrapped[13:], ad)
		if err != nil {
			t.Fatalf("open by hand: %v", err)
		}
		return pt
	}
	var (
		chain                   string
		version                 int32
		ikWrapped, recWrapped   []byte
		kekVersion, recProvider string
		recKeyID, recKeyVersion string
	)
	if err := e.pool.QueryRow(ctx, `SELECT i.key_id, i.version, i.wrapped_key, k.key_version, r.provider, r.recovery_key_id, r.key_version, r.wrapped_key
FROM keybroker.intermediate_keys i JOIN keybroker.kek k ON k.id = i.kek_id
JOIN keybroker.intermediate_key_recovery r ON r.key_id = i.key_id AND r.version = i.version`).Scan(&chain, &version, &ikWrapped, &kekVersion, &recProvider, &recKeyID, &recKeyVersion, &recWrapped); err != nil {
		t.Fatal(err)
	}
	ikAAD := field(field(field(nil, []byte("keybroker/ik/v1")), []byte(chain)), binary.BigEndian.AppendUint32(nil, uint32(version)))
	ik := openLocal(kekKey, "kek", kekVersion, ikWrapped, ikAAD)
	if recProvider != "local" || recKeyID != "safe" {
		t.Fatalf("recovery row names %s:%s", recProvider, recKeyID)
	}
	if got := openLocal(recKey, "safe", recKeyVersion, recWrapped, ikAAD); string(got) != string(ik) || len(ik) != 32 {
		t.Fatal("the recovery wrap holds another key than the IK")
	}
}
