package pgcolumn_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/profullstack/keybroker/provider/local"
)

// The worked example of docs/STORAGE.md, "Encrypted columns". The test
// checks that the document shows each of these, that pgcolumn opens the
// rows they make (and its fence accepts them), and that the document's
// steps decrypt them and a value pgcolumn seals now.
const (
	docKeyring = `{"id":"storage-example","primary":1,"keys":[{"version":1,"key":"QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8="}]}`
	docProject = "11111111-2222-3333-4444-555555555555"
	docKey     = "STRIPE_KEY"
	docValue   = "sk_live_example"
	docKeyID   = "20212223-2425-2627-2829-2a2b2c2d2e2f"
	docScope   = "column:public.secrets.value_encrypted"
	docWrapped = "01b0b1b2b3b4b5b6b7b8b9babb6361e2e6a52f8dfe53874d93819b22a4ce79f65b3060a0e88bbf1a40f5cd8ceff8c58b2366317c290deda0c136881af5"
	docBlob    = "4b42454e01010210202122232425262728292a2b2c2d2e2fd0d1d2d3d4d5d6d7d8d9dadb0000001f466f826f7d2f4cd3dd667b27aaa420a61b000f34747399e8b25e16a7e58b7f"
	docWrapAAD = "000000106b657962726f6b65722f64656b2f76310000002431313131313131312d323232322d333333332d343434342d35353535353535353535353500000010202122232425262728292a2b2c2d2e2f"
	docDEK     = "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
	docHeader  = "4b42454e01010210202122232425262728292a2b2c2d2e2fd0d1d2d3d4d5d6d7d8d9dadb0000001f"
	docContext = "000000136b657962726f6b65722f636f6c756d6e2f76310000000e7075626c69632e736563726574730000000f76616c75655f656e637279707465640000002431313131313131312d323232322d333333332d343434342d35353535353535353535353500000001310000000a5354524950455f4b4559"
	docPlain   = "736b5f6c6976655f6578616d706c65"
)

func TestStorageDocument(t *testing.T) {
	ctx := context.Background()
	raw, err := os.ReadFile(filepath.Join("..", "docs", "STORAGE.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, doc, ok := strings.Cut(string(raw), "## Encrypted columns (pgcolumn)")
	if !ok {
		t.Fatal(`docs/STORAGE.md has no "## Encrypted columns (pgcolumn)" section`)
	}
	for _, s := range []string{docProject, docKey, docValue, docKeyID, docScope, docWrapped, docBlob, docWrapAAD, docDEK, docHeader, docContext, docPlain,
		"u32(119)", "00000077"} {
		if !strings.Contains(doc, s) {
			t.Errorf("docs/STORAGE.md's column section does not show %s", s)
		}
	}
	if hex.EncodeToString([]byte(docValue)) != docPlain {
		t.Fatal("docPlain is not docValue")
	}
	if len(docContext)/2 != 119 {
		t.Fatalf("the context is %d bytes, the document says 119", len(docContext)/2)
	}
	_, query, ok := strings.Cut(doc, "```sql\n")
	query, _, _ = strings.Cut(query, "```")
	if !ok || !strings.Contains(query, "SELECT") {
		t.Fatal("the column section has no SQL block")
	}

	path := filepath.Join(t.TempDir(), "keyring.json")
	if err := os.WriteFile(path, []byte(docKeyring), 0o600); err != nil {
		t.Fatal(err)
	}
	kek, err := local.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	e := newEnvKEK(t, kek)
	unhex := func(s string) []byte {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if _, err := e.pool.Exec(ctx, `INSERT INTO projects (id, owner, name) VALUES ($1, gen_random_uuid(), 'doc')`, docProject); err != nil {
		t.Fatal(err)
	}
	if _, err := e.pool.Exec(ctx, `WITH k AS (INSERT INTO keybroker.kek (provider, key_id, key_version) VALUES ('local', 'storage-example', '1') RETURNING id)
INSERT INTO keybroker.data_keys (id, project_id, kek_id, wrapped_dek, messages, state, scope) SELECT $1, $2, id, $3, 1, 'spent', $4 FROM k`,
		docKeyID, docProject, unhex(docWrapped), docScope); err != nil {
		t.Fatal(err)
	}
	// The fence accepts the example, and pgcolumn opens it.
	if err := e.insert(t, docProject, docKey, unhex(docBlob)); err != nil {
		t.Fatalf("the fence refuses the example: %v", err)
	}
	if got, err := e.col.Open(ctx, docProject, []string{docKey}, unhex(docBlob)); err != nil || string(got) != docValue {
		t.Fatalf("pgcolumn opens the example as %q, %v", got, err)
	}
	steps := openByHand(t, e, query, docProject, docKey)
	for what, c := range map[string][2]string{
		"wrap-aad": {steps.wrapAAD, docWrapAAD}, "DEK": {steps.dek, docDEK}, "header": {steps.header, docHeader},
		"context": {steps.context, docContext}, "plaintext": {steps.plaintext, docPlain},
	} {
		if c[0] != c[1] {
			t.Errorf("%s: %s, the document shows %s", what, c[0], c[1])
		}
	}
	// And the steps open what pgcolumn seals now, under a key it made.
	fresh, err := e.col.Seal(ctx, docProject, []string{"FRESH"}, []byte("fresh value"))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.insert(t, docProject, "FRESH", fresh); err != nil {
		t.Fatal(err)
	}
	if got := openByHand(t, e, query, docProject, "FRESH"); got.plaintext != hex.EncodeToString([]byte("fresh value")) {
		t.Fatalf("by hand: %s", got.plaintext)
	}
}

type columnSteps struct{ wrapAAD, dek, header, context, plaintext string }

// openByHand follows docs/STORAGE.md, "Decrypting a column value", with
// the standard library and the document's SQL only.
func openByHand(t *testing.T, e *env, query, project, key string) columnSteps {
	t.Helper()
	var (
		blob, wrapped        []byte
		prov, keyID, version string
	)
	if err := e.pool.QueryRow(context.Background(), query, project, key).Scan(&blob, &wrapped, &prov, &keyID, &version); err != nil {
		t.Fatal(err)
	}
	field := func(b []byte, f []byte) []byte { return append(binary.BigEndian.AppendUint32(b, uint32(len(f))), f...) }
	open := func(k, nonce, ct, ad []byte) []byte {
		t.Helper()
		block, err := aes.NewCipher(k)
		if err != nil {
			t.Fatal(err)
		}
		g, err := cipher.NewGCM(block)
		if err != nil {
			t.Fatal(err)
		}
		pt, err := g.Open(nil, nonce, ct, ad)
		if err != nil {
			t.Fatalf("open: %v", err)
		}
		return pt
	}
	if prov != "local" || keyID != "storage-example" || version != "1" || len(wrapped) != 61 {
		t.Fatalf("kek row %s %s %s, wrapped %d bytes", prov, keyID, version, len(wrapped))
	}
	kekKey, _ := base64.StdEncoding.DecodeString("QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=")
	const headerLen = 40
	if len(blob) < headerLen+16 || string(blob[:8]) != "KBEN\x01\x01\x02\x10" || int(binary.BigEndian.Uint32(blob[36:40])) != len(blob)-headerLen {
		t.Fatalf("header % x", blob[:min(len(blob), headerLen)])
	}
	id := blob[8:24]
	wrapAAD := field(field(field(nil, []byte("keybroker/dek/v1")), []byte(project)), id)
	ad := append([]byte("keybroker/local/v1\x00"), byte(len(keyID)))
	ad = append(ad, keyID...)
	ad = binary.BigEndian.AppendUint32(ad, 1)
	ad = append(ad, wrapAAD...)
	dek := open(kekKey, wrapped[1:13], wrapped[13:], ad)
	var c []byte
	for _, f := range []string{"keybroker/column/v1", "public.secrets", "value_encrypted", project, "1", key} {
		c = field(c, []byte(f))
	}
	header := blob[:headerLen]
	pt := open(dek, blob[24:36], blob[headerLen:], field(bytes.Clone(header), c))
	return columnSteps{hex.EncodeToString(wrapAAD), hex.EncodeToString(dek), hex.EncodeToString(header), hex.EncodeToString(c), hex.EncodeToString(pt)}
}
