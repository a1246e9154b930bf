package pgstore_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

// The worked example of docs/STORAGE.md. The test checks that the document
// shows each of these, that pgstore reads the rows they make, and that the
// document's steps decrypt them.
const (
	docKeyring   = `{"id":"storage-example","primary":1,"keys":[{"version":1,"key":"QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8="}]}`
	docProject   = "project-1"
	docName      = "stripe-key"
	docValue     = "example secret value"
	docKeyID     = "10111213-1415-1617-1819-1a1b1c1d1e1f"
	docWrapped   = "01a0a1a2a3a4a5a6a7a8a9aaab570e84bc666e1aaaf1e6cb750531be797f86675478fa13ba7a457401755fe0674fdb774d08835573c3dc583eeb6f3ca8"
	docNonce     = "c0c1c2c3c4c5c6c7c8c9cacb"
	docBlob      = "4b42454e01010210101112131415161718191a1b1c1d1e1fc0c1c2c3c4c5c6c7c8c9cacb000000240144e1efccc186e3714a543d27d5104648ad7f24981914b4422285f2b21abed7db11bdef"
	docWrapAAD   = "000000106b657962726f6b65722f64656b2f76310000000970726f6a6563742d3100000010101112131415161718191a1b1c1d1e1f"
	docLocalAD   = "6b657962726f6b65722f6c6f63616c2f7631000f73746f726167652d6578616d706c6500000001000000106b657962726f6b65722f64656b2f76310000000970726f6a6563742d3100000010101112131415161718191a1b1c1d1e1f"
	docDEK       = "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
	docHeader    = "4b42454e01010210101112131415161718191a1b1c1d1e1fc0c1c2c3c4c5c6c7c8c9cacb00000024"
	docContext   = "000000136b657962726f6b65722f7365637265742f76310000000970726f6a6563742d310000000a7374726970652d6b6579"
	docPlaintext = "6578616d706c65207365637265742076616c7565"

	// The key hierarchy's example.
	docWrappedIK = "01b0b1b2b3b4b5b6b7b8b9babb6361e2e6a52f8dfe53874d93819b22a4ce79f65b3060a0e88bbf1a40f5cd8cefa77c01d2e5ae7279a4900459938f920e"
	docIKWrapped = "01d0d1d2d3d4d5d6d7d8d9dadbb5855f8090dcaf0b309790c15645cb057e4657e773b9dd4b1c74df71da9430799e4501cc77c53b16ad46b02b5918c99f"
	docIKAAD     = "0000000f6b657962726f6b65722f696b2f76310000000764656661756c740000000400000001"
	docIKLocalAD = "6b657962726f6b65722f6c6f63616c2f7631000f73746f726167652d6578616d706c65000000010000000f6b657962726f6b65722f696b2f76310000000764656661756c740000000400000001"
	docIK        = "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
	docIKDEKAD   = "000000136b657962726f6b65722f696b2d64656b2f76310000000764656661756c74000000040000000100000035000000106b657962726f6b65722f64656b2f76310000000970726f6a6563742d3100000010101112131415161718191a1b1c1d1e1f"
)

// sqlBlocks returns the document's ```sql blocks, in order.
func sqlBlocks(doc string) []string {
	var out []string
	for {
		_, rest, ok := strings.Cut(doc, "```sql\n")
		if !ok {
			return out
		}
		block, after, _ := strings.Cut(rest, "```")
		out, doc = append(out, block), after
	}
}

func TestStorageDocument(t *testing.T) {
	ctx := context.Background()
	raw, err := os.ReadFile(filepath.Join("..", "docs", "STORAGE.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	for _, s := range []string{docKeyring, docProject, docName, docValue, docKeyID, docWrapped, docNonce, docBlob,
		docWrapAAD, docLocalAD, docDEK, docHeader, docContext, docPlaintext} {
		if !strings.Contains(doc, s) {
			t.Errorf("docs/STORAGE.md does not show %s", s)
		}
	}
	if hex.EncodeToString([]byte(docValue)) != docPlaintext {
		t.Fatal("docPlaintext is not docValue")
	}
	blocks := sqlBlocks(doc)
	if len(blocks) < 2 || !strings.Contains(blocks[0], "SELECT") || !strings.Contains(blocks[1], "intermediate_keys") {
		t.Fatalf("docs/STORAGE.md has %d SQL blocks, want the secret's and the intermediate key's first", len(blocks))
	}
	query := blocks[0]

	path := filepath.Join(t.TempDir(), "keyring.json")
	if err := os.WriteFile(path, []byte(docKeyring), 0o600); err != nil {
		t.Fatal(err)
	}
	kek, err := local.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// Data keys wrapped directly under the KEK: DirectKEK, so that the
	// fresh secret below is too.
	e := newEnv(t, pgstore.Config{KEK: kek, DirectKEK: true})
	unhex := func(s string) []byte {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if _, err := e.pool.Exec(ctx, `WITH k AS (INSERT INTO keybroker.kek (provider, key_id, key_version) VALUES ('local', 'storage-example', '1') RETURNING id),
d AS (INSERT INTO keybroker.data_keys (id, project_id, kek_id, wrapped_dek, messages, state) SELECT $1, $2, id, $3, 1, 'spent' FROM k RETURNING id)
INSERT INTO keybroker.encrypted_secrets (project_id, name, encrypted_data, nonce, data_key_id) SELECT $2, $4, $5, $6, id FROM d`,
		docKeyID, docProject, unhex(docWrapped), docName, unhex(docBlob), unhex(docNonce)); err != nil {
		t.Fatal(err)
	}
	// The example is what pgstore writes: pgstore reads it.
	if got, err := e.store.Get(ctx, docProject, docName); err != nil || string(got) != docValue {
		t.Fatalf("pgstore reads the example as %q, %v", got, err)
	}
	// The document's steps decrypt it, through the values it shows.
	steps := decryptByHand(t, e.pool, query, "", docKeyring, docProject, docName)
	for what, c := range map[string][2]string{
		"wrap-aad": {steps.wrapAAD, docWrapAAD}, "gcm ad": {steps.localAD, docLocalAD}, "DEK": {steps.dek, docDEK},
		"header": {steps.header, docHeader}, "context": {steps.context, docContext}, "plaintext": {steps.plaintext, docPlaintext},
	} {
		if c[0] != c[1] {
			t.Errorf("%s: %s, the document shows %s", what, c[0], c[1])
		}
	}
	// And they decrypt what pgstore writes now, under a data key it made.
	value := make([]byte, 100)
	rand.Read(value)
	if err := e.store.Put(ctx, "project-2", "fresh", value); err != nil {
		t.Fatal(err)
	}
	if got := decryptByHand(t, e.pool, query, "", docKeyring, "project-2", "fresh"); got.plaintext != hex.EncodeToString(value) {
		t.Fatalf("by hand: %s, want %x", got.plaintext, value)
	}
}

// The key hierarchy's worked example of docs/STORAGE.md: the same secret
// row, its data key wrapped under an intermediate key. pgstore reads it,
// the document's steps decrypt it, and a secret pgstore writes now (under
// the hierarchy, its default).
func TestStorageDocumentHierarchy(t *testing.T) {
	ctx := context.Background()
	raw, err := os.ReadFile(filepath.Join("..", "docs", "STORAGE.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	for _, s := range []string{docWrappedIK, docIKWrapped, docIKAAD, docIKLocalAD, docIK, docIKDEKAD, docDEK} {
		if !strings.Contains(doc, s) {
			t.Errorf("docs/STORAGE.md does not show %s", s)
		}
	}
	blocks := sqlBlocks(doc)
	if len(blocks) < 2 {
		t.Fatalf("docs/STORAGE.md has %d SQL blocks", len(blocks))
	}
	path := filepath.Join(t.TempDir(), "keyring.json")
	if err := os.WriteFile(path, []byte(docKeyring), 0o600); err != nil {
		t.Fatal(err)
	}
	kek, err := local.OpenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, pgstore.Config{KEK: kek})
	unhex := func(s string) []byte {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if _, err := e.pool.Exec(ctx, `WITH k AS (INSERT INTO keybroker.kek (provider, key_id, key_version) VALUES ('local', 'storage-example', '1') RETURNING id),
i AS (INSERT INTO keybroker.intermediate_keys (key_id, version, kek_id, wrapped_key) SELECT 'default', 1, id, $7 FROM k),
ki AS (INSERT INTO keybroker.kek (provider, key_id, key_version) VALUES ('intermediate', 'default', '1') RETURNING id),
d AS (INSERT INTO keybroker.data_keys (id, project_id, kek_id, wrapped_dek, messages, state) SELECT $1, $2, id, $3, 1, 'spent' FROM ki RETURNING id)
INSERT INTO keybroker.encrypted_secrets (project_id, name, encrypted_data, nonce, data_key_id) SELECT $2, $4, $5, $6, id FROM d`,
		docKeyID, docProject, unhex(docIKWrapped), docName, unhex(docBlob), unhex(docNonce), unhex(docWrappedIK)); err != nil {
		t.Fatal(err)
	}
	if got, err := e.store.Get(ctx, docProject, docName); err != nil || string(got) != docValue {
		t.Fatalf("pgstore reads the example as %q, %v", got, err)
	}
	steps := decryptByHand(t, e.pool, blocks[0], blocks[1], docKeyring, docProject, docName)
	for what, c := range map[string][2]string{
		"ik-aad": {steps.ikAAD, docIKAAD}, "ik gcm ad": {steps.localAD, docIKLocalAD}, "IK": {steps.ik, docIK},
		"dek gcm ad": {steps.ikDEKAD, docIKDEKAD}, "DEK": {steps.dek, docDEK}, "plaintext": {steps.plaintext, docPlaintext},
	} {
		if c[0] != c[1] {
			t.Errorf("%s: %s, the document shows %s", what, c[0], c[1])
		}
	}
	value := make([]byte, 100)
	rand.Read(value)
	if err := e.store.Put(ctx, "project-2", "fresh", value); err != nil {
		t.Fatal(err)
	}
	got := decryptByHand(t, e.pool, blocks[0], blocks[1], docKeyring, "project-2", "fresh")
	if got.plaintext != hex.EncodeToString(value) || got.ik == "" {
		t.Fatalf("by hand: %s (IK %q), want %x under an intermediate key", got.plaintext, got.ik, value)
	}
}

// handSteps are the intermediate values of decryptByHand, in hex.
type handSteps struct {
	wrapAAD, localAD, dek, header, context, plaintext string
	ikAAD, ik, ikDEKAD                                string // under the key hierarchy
}

// decryptByHand follows docs/STORAGE.md, "Decrypting a secret", with the
// standard library and the document's SQL only: no pgstore, envelope or
// provider code.
func decryptByHand(t *testing.T, pool *pgxpool.Pool, query, ikQuery, keyring, project, name string) handSteps {
	t.Helper()
	var (
		blob, nonce, id, wrapped []byte
		prov, keyID, version     string
	)
	// Step 1.
	if err := pool.QueryRow(context.Background(), query, project, name).Scan(&blob, &nonce, &id, &wrapped, &prov, &keyID, &version); err != nil {
		t.Fatal(err)
	}
	field := func(b []byte, f []byte) []byte { return append(binary.BigEndian.AppendUint32(b, uint32(len(f))), f...) }
	open := func(key, nonce, ct, ad []byte) []byte {
		t.Helper()
		block, err := aes.NewCipher(key)
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
	var hs handSteps
	// Step 2, provider intermediate: the IK first ("Key hierarchy"), with
	// its own kek row, under ik-aad.
	var ikWrapped []byte
	chain, ikVersion := keyID, version
	if prov == "intermediate" {
		if ikQuery == "" {
			t.Fatal("data key under an intermediate key, and no query for it")
		}
		if err := pool.QueryRow(context.Background(), ikQuery, keyID, version).Scan(&ikWrapped, &prov, &keyID, &version); err != nil {
			t.Fatal(err)
		}
	}
	// Step 2, provider local: the version's key from the keyring file.
	var kr struct {
		ID   string `json:"id"`
		Keys []struct {
			Version uint32 `json:"version"`
			Key     string `json:"key"`
		} `json:"keys"`
	}
	if err := json.Unmarshal([]byte(keyring), &kr); err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseUint(version, 10, 32)
	if prov != "local" || keyID != kr.ID || err != nil || len(id) != 16 {
		t.Fatalf("kek row %s %s %s, id %x", prov, keyID, version, id)
	}
	var kekKey []byte
	for _, k := range kr.Keys {
		if uint64(k.Version) == n {
			kekKey, _ = base64.StdEncoding.DecodeString(k.Key)
		}
	}
	wrapAAD := field(field(field(nil, []byte("keybroker/dek/v1")), []byte(project)), id)
	localAAD, toOpen := wrapAAD, wrapped
	if ikWrapped != nil {
		iv, err := strconv.ParseUint(ikVersion, 10, 32)
		if err != nil {
			t.Fatal(err)
		}
		localAAD = field(field(field(nil, []byte("keybroker/ik/v1")), []byte(chain)), binary.BigEndian.AppendUint32(nil, uint32(iv)))
		toOpen = ikWrapped
		hs.ikAAD = hex.EncodeToString(localAAD)
	}
	ad := append([]byte("keybroker/local/v1\x00"), byte(len(keyID)))
	ad = append(ad, keyID...)
	ad = binary.BigEndian.AppendUint32(ad, uint32(n))
	ad = append(ad, localAAD...)
	if len(toOpen) != 61 || toOpen[0] != 0x01 {
		t.Fatalf("wrapped key of %d bytes starting %x", len(toOpen), toOpen[:1])
	}
	dek := open(kekKey, toOpen[1:13], toOpen[13:], ad)
	if ikWrapped != nil {
		ik := dek
		iv, _ := strconv.ParseUint(ikVersion, 10, 32)
		ikAD := field(field(field(nil, []byte("keybroker/ik-dek/v1")), []byte(chain)), binary.BigEndian.AppendUint32(nil, uint32(iv)))
		ikAD = field(ikAD, wrapAAD)
		if len(wrapped) != 61 || wrapped[0] != 0x01 {
			t.Fatalf("wrapped_dek of %d bytes starting %x", len(wrapped), wrapped[:1])
		}
		dek = open(ik, wrapped[1:13], wrapped[13:], ikAD)
		hs.ik, hs.ikDEKAD = hex.EncodeToString(ik), hex.EncodeToString(ikAD)
	}
	// Step 3: the envelope header.
	const headerLen = 40
	if len(blob) < headerLen || string(blob[:8]) != "KBEN\x01\x01\x02\x10" || !bytes.Equal(blob[8:24], id) || !bytes.Equal(blob[24:36], nonce) ||
		int(binary.BigEndian.Uint32(blob[36:40])) != len(blob)-headerLen {
		t.Fatalf("envelope header % x", blob[:min(len(blob), headerLen)])
	}
	header := blob[:headerLen]
	// Step 4.
	secretCtx := field(field(field(nil, []byte("keybroker/secret/v1")), []byte(project)), []byte(name))
	gcmAAD := field(append([]byte(nil), header...), secretCtx)
	pt := open(dek, blob[24:36], blob[headerLen:], gcmAAD)
	hs.wrapAAD, hs.localAD, hs.dek, hs.header = hex.EncodeToString(wrapAAD), hex.EncodeToString(ad), hex.EncodeToString(dek), hex.EncodeToString(header)
	hs.context, hs.plaintext = hex.EncodeToString(secretCtx), hex.EncodeToString(pt)
	return hs
}
