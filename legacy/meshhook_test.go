package legacy_test

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/internal/testbin"
	"github.com/profullstack/keybroker/legacy"
)

// nodeOutput is what testdata/meshhook-v1.mjs prints (and the golden file holds).
type nodeOutput struct {
	Key    string `json:"key"` // golden file only
	KeyHex string `json:"key_hex"`
	Values []struct {
		Plaintext []byte `json:"plaintext"` // base64 in JSON
		Stored    string `json:"stored"`
	} `json:"values"`
}

// nodeSeal runs the Node reference encoder with SECRETS_ENCRYPTION_KEY=keyText
// and returns fresh v1 values of pts.
func nodeSeal(t testing.TB, keyText string, pts ...[]byte) nodeOutput {
	t.Helper()
	node, err := testbin.Find("node")
	if err != nil {
		t.Fatal(err)
	}
	req, err := json.Marshal(map[string][][]byte{"plaintexts": pts})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, filepath.Join("testdata", "meshhook-v1.mjs"))
	cmd.Env = []string{"SECRETS_ENCRYPTION_KEY=" + keyText, "PATH=" + os.Getenv("PATH")}
	cmd.Stdin = bytes.NewReader(req)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node meshhook-v1.mjs: %v\n%s", err, stderr.Bytes())
	}
	var res nodeOutput
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("node output: %v", err)
	}
	if len(res.Values) != len(pts) {
		t.Fatalf("node sealed %d values, want %d", len(res.Values), len(pts))
	}
	return res
}

func newDecoder(t testing.TB, keyText string) *legacy.MeshHookV1Decoder {
	t.Helper()
	key, err := legacy.ParseMeshHookKey(keyText)
	if err != nil {
		t.Fatal(err)
	}
	d, err := legacy.MeshHookV1(key)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func randBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// Key texts in each accepted form, the passphrases also non-ASCII.
func keyForms(t testing.TB) map[string]string {
	raw := randBytes(t, 32)
	return map[string]string{
		"hex":              hex.EncodeToString(raw),
		"HEX":              strings.ToUpper(hex.EncodeToString(raw)),
		"base64":           base64.StdEncoding.EncodeToString(raw),
		"passphrase":       "correct horse battery staple, 32+ chars",
		"unicode-pass":     strings.Repeat("pä", 16), // 32 JS characters, 48 UTF-8 bytes
		"unpadded-base64":  base64.RawStdEncoding.EncodeToString(raw),
		"url-base64":       base64.URLEncoding.EncodeToString(bytes.Repeat([]byte{0xfb}, 32)),
		"63-hex-and-a-'g'": hex.EncodeToString(raw)[:63] + "g",
	}
}

// TestNodeVectors: values sealed just now by node:crypto, under a key in each
// form, decode to their plaintexts, and ParseMeshHookKey derives the same key
// as the Node script.
func TestNodeVectors(t *testing.T) {
	pts := [][]byte{{}, []byte("x"), []byte("sk_live_51H8example"), []byte("v1:looks:like:one"),
		[]byte("päßwörd ✓"), randBytes(t, 1024), randBytes(t, 70000)}
	for name, keyText := range keyForms(t) {
		t.Run(name, func(t *testing.T) {
			res := nodeSeal(t, keyText, pts...)
			key, err := legacy.ParseMeshHookKey(keyText)
			if err != nil {
				t.Fatal(err)
			}
			if got := hex.EncodeToString(key); got != res.KeyHex {
				t.Fatalf("ParseMeshHookKey derived %s, node %s", got, res.KeyHex)
			}
			d := newDecoder(t, keyText)
			chain, err := legacy.NewChain(d, legacy.Plaintext())
			if err != nil {
				t.Fatal(err)
			}
			for i, v := range res.Values {
				for _, dec := range []legacy.Decoder{d, chain} {
					pt, ok, err := dec.Decode([]byte(v.Stored))
					if err != nil || !ok || !bytes.Equal(pt, pts[i]) {
						t.Fatalf("value %d (%d bytes): got %d bytes, ok=%v, err=%v", i, len(pts[i]), len(pt), ok, err)
					}
				}
			}
		})
	}
}

// TestGolden pins the format: values Node made once, committed.
func TestGolden(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "meshhook-v1.golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	var g nodeOutput
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	if len(g.Values) < 5 {
		t.Fatalf("golden file has %d values", len(g.Values))
	}
	d := newDecoder(t, g.Key)
	for i, v := range g.Values {
		pt, ok, err := d.Decode([]byte(v.Stored))
		if err != nil || !ok || !bytes.Equal(pt, v.Plaintext) {
			t.Errorf("golden value %d: got %q, ok=%v, err=%v; want %q", i, pt, ok, err, v.Plaintext)
		}
	}
}

// v1Fields splits a well-formed value into its decoded fields.
func v1Fields(t testing.TB, stored string) (iv, tag, ct []byte) {
	t.Helper()
	f := strings.Split(stored, ":")
	if len(f) != 4 || f[0] != "v1" {
		t.Fatalf("not a v1 value: %d fields", len(f))
	}
	var err error
	dec := func(s string) []byte {
		var b []byte
		if err == nil {
			b, err = base64.StdEncoding.DecodeString(s)
		}
		return b
	}
	iv, tag, ct = dec(f[1]), dec(f[2]), dec(f[3])
	if err != nil {
		t.Fatal(err)
	}
	return iv, tag, ct
}

func v1Join(iv, tag, ct []byte) string {
	e := base64.StdEncoding.EncodeToString
	return "v1:" + e(iv) + ":" + e(tag) + ":" + e(ct)
}

// wantClaimedError: d and a chain ending in Plaintext both refuse stored with
// an error matching ErrDecrypt and envelope.ErrDecrypt, and return no plaintext.
func wantClaimedError(t *testing.T, d legacy.Decoder, stored, what string) {
	t.Helper()
	chain, err := legacy.NewChain(d, legacy.Plaintext())
	if err != nil {
		t.Fatal(err)
	}
	for _, dec := range []legacy.Decoder{d, chain} {
		pt, ok, err := dec.Decode([]byte(stored))
		if !errors.Is(err, legacy.ErrDecrypt) || !errors.Is(err, envelope.ErrDecrypt) || ok || pt != nil {
			t.Fatalf("%s: got %d bytes, ok=%v, err=%v; want ErrDecrypt and nothing", what, len(pt), ok, err)
		}
		if strings.Contains(err.Error(), stored) {
			t.Fatalf("%s: error echoes the value", what)
		}
	}
}

// TestTampered: a well-formed value altered anywhere, or opened under another
// key, is an error, never plaintext, also in a chain that ends in Plaintext.
func TestTampered(t *testing.T) {
	keyText := hex.EncodeToString(randBytes(t, 32))
	pt := []byte("a secret of some length")
	res := nodeSeal(t, keyText, pt)
	stored := res.Values[0].Stored
	d := newDecoder(t, keyText)
	if got, ok, err := d.Decode([]byte(stored)); err != nil || !ok || !bytes.Equal(got, pt) {
		t.Fatalf("untampered value: %q %v %v", got, ok, err)
	}
	iv, tag, ct := v1Fields(t, stored)
	for _, field := range []struct {
		name string
		b    []byte
	}{{"iv", iv}, {"tag", tag}, {"ct", ct}} {
		for i := range field.b {
			field.b[i] ^= 0x01
			wantClaimedError(t, d, v1Join(iv, tag, ct), field.name+" byte flipped")
			field.b[i] ^= 0x01
		}
	}
	wantClaimedError(t, d, v1Join(iv, tag, ct[:len(ct)-1]), "ciphertext truncated by a byte")
	wantClaimedError(t, d, v1Join(iv, tag, append(ct, 0)), "ciphertext extended by a byte")
	wantClaimedError(t, d, v1Join(iv, tag, nil), "ciphertext removed")
	wantClaimedError(t, d, stored[:len(stored)-1], "ciphertext base64 truncated")
	wantClaimedError(t, d, stored+"\n", "ciphertext base64 with a trailing newline")
	wantClaimedError(t, d, stored+":", "a fifth field")
	wantClaimedError(t, d, v1Join(iv, tag, nil)+"!!!!", "ciphertext not base64")

	other := newDecoder(t, hex.EncodeToString(randBytes(t, 32)))
	wantClaimedError(t, other, stored, "wrong key")
	wantClaimedError(t, newDecoder(t, "a passphrase that is not the key, 32+"), stored, "passphrase instead of the hex key")
}

// TestLookAlikes: plaintexts that start like a v1 value but have no
// well-formed v1 header are not claimed, and a chain returns them as they are.
func TestLookAlikes(t *testing.T) {
	iv := base64.StdEncoding.EncodeToString(make([]byte, 12))  // 16 chars
	tag := base64.StdEncoding.EncodeToString(make([]byte, 16)) // 24 chars
	for _, s := range []string{
		"", "v1", "v1:", "v1:abc", "v1:abc:def:ghi", "v1:" + iv, "v1:" + iv + ":" + tag,
		"V1:" + iv + ":" + tag + ":", " v1:" + iv + ":" + tag + ":", "v2:" + iv + ":" + tag + ":",
		"v1:" + iv[:15] + ":" + tag + ":",                            // IV 15 characters
		"v1:" + iv + "AAAA:" + tag + ":",                             // IV of 15 bytes
		"v1:" + iv[:14] + "==:" + tag + ":",                          // IV of 10 bytes, padded
		"v1:" + iv[:8] + "\n" + iv[8:15] + ":" + tag + ":",           // newline inside the IV
		"v1:" + iv + ":" + strings.TrimRight(tag, "=") + ":",         // tag unpadded
		"v1:" + iv + ":" + tag[:20] + ":",                            // tag of 15 bytes
		"v1:" + iv + ":" + tag[:21] + "B==:",                         // tag with padding bits set
		"v1:" + strings.Repeat("_", 16) + ":" + tag + ":",            // URL alphabet
		"v1:" + iv + ":" + tag + "-",                                 // no third colon
		"v1:" + iv + ":" + strings.Replace(tag, "A", "-", 1) + ":ct", // tag not base64
		"v1:api-token:with:colons", "v1:" + strings.Repeat("A", 100),
	} {
		d := newDecoder(t, hex.EncodeToString(randBytes(t, 32)))
		if pt, ok, err := d.Decode([]byte(s)); ok || err != nil || pt != nil {
			t.Errorf("%q: claimed (%q, ok=%v, err=%v)", s, pt, ok, err)
		}
		chain, err := legacy.NewChain(d, legacy.Plaintext())
		if err != nil {
			t.Fatal(err)
		}
		in := []byte(s)
		pt, ok, err := chain.Decode(in)
		if err != nil || !ok || !bytes.Equal(pt, in) {
			t.Errorf("%q through the chain: %q, ok=%v, err=%v", s, pt, ok, err)
		}
		if len(in) > 0 && len(pt) > 0 && &pt[0] == &in[0] {
			t.Errorf("%q: Plaintext returned the stored slice itself", s)
		}
	}
}

// TestTooLong: a value with a v1 header and a ciphertext field over the bound
// is refused before it is decoded.
func TestTooLong(t *testing.T) {
	d := newDecoder(t, hex.EncodeToString(randBytes(t, 32)))
	head := v1Join(make([]byte, 12), make([]byte, 16), nil)
	limit := base64.StdEncoding.EncodedLen(legacy.MaxMeshHookPlaintextLen)
	v := make([]byte, len(head)+limit+4)
	copy(v, head)
	for i := len(head); i < len(v); i++ {
		v[i] = 'A'
	}
	_, ok, err := d.Decode(v)
	if ok || !errors.Is(err, legacy.ErrDecrypt) || !strings.Contains(err.Error(), "limit") {
		t.Fatalf("over-long value: ok=%v, err=%v", ok, err)
	}
}

// TestParseMeshHookKey: exactly the three forms, in their order of precedence;
// everything else is an error that does not contain the key text.
func TestParseMeshHookKey(t *testing.T) {
	raw := randBytes(t, 32)
	sum := func(s string) []byte { h := sha256.Sum256([]byte(s)); return h[:] }
	hexKey := hex.EncodeToString(raw)
	b64 := base64.StdEncoding.EncodeToString(raw)
	// The 43rd character carries 4 key bits and 2 padding bits; set one of those.
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	nonCanon := b64[:42] + string(alphabet[strings.IndexByte(alphabet, b64[42])|1]) + "="
	for _, c := range []struct {
		name, in string
		want     []byte
	}{
		{"hex", hexKey, raw},
		{"upper hex", strings.ToUpper(hexKey), raw},
		{"base64", b64, raw},
		{"64 characters, not all hex", hexKey[:63] + "x", sum(hexKey[:63] + "x")},
		{"unpadded base64 is a passphrase", b64[:43], sum(b64[:43])},
		{"base64 with padding bits set is a passphrase", nonCanon, sum(nonCanon)},
		{"32 characters", strings.Repeat("p", 32), sum(strings.Repeat("p", 32))},
		{"32 non-ASCII characters", strings.Repeat("é", 32), sum(strings.Repeat("é", 32))},
		{"32 UTF-16 units from 16 astral runes", strings.Repeat("🔑", 16), sum(strings.Repeat("🔑", 16))},
		{"inner spaces", "a passphrase with inner spaces ok", sum("a passphrase with inner spaces ok")},
	} {
		got, err := legacy.ParseMeshHookKey(c.in)
		if err != nil || !bytes.Equal(got, c.want) {
			t.Errorf("%s: got %x, %v", c.name, got, err)
		}
	}
	if nonCanon == b64 {
		t.Fatal("test bug: non-canonical base64 equals the canonical one")
	}
	for _, c := range []struct{ name, in string }{
		{"empty", ""},
		{"31 characters", strings.Repeat("p", 31)},
		{"16 two-byte characters (32 bytes)", strings.Repeat("é", 16)},
		{"trailing newline", hexKey + "\n"},
		{"leading space", " " + hexKey},
		{"trailing space on a passphrase", strings.Repeat("p", 40) + " "},
		{"non-breaking space", strings.Repeat("p", 40) + "\u00a0"},
		{"invalid UTF-8", strings.Repeat("p", 40) + "\xff"},
		{"too long", strings.Repeat("p", legacy.MaxMeshHookKeyLen+1)},
	} {
		got, err := legacy.ParseMeshHookKey(c.in)
		if err == nil || got != nil {
			t.Errorf("%s: accepted (%x)", c.name, got)
			continue
		}
		if !strings.HasPrefix(err.Error(), "legacy: ") || strings.Contains(err.Error(), "\n") ||
			(c.in != "" && strings.Contains(err.Error(), strings.TrimSpace(c.in))) {
			t.Errorf("%s: error %q", c.name, err)
		}
	}
}

// TestMeshHookV1Key: MeshHookV1 rejects a wrong-sized key and clears the key
// it was given in both cases; Close makes Decode fail with ErrClosed.
func TestMeshHookV1Key(t *testing.T) {
	for _, n := range []int{0, 16, 31, 33, 64} {
		k := bytes.Repeat([]byte{7}, n)
		if d, err := legacy.MeshHookV1(k); err == nil || d != nil || !strings.HasPrefix(err.Error(), "legacy: ") {
			t.Errorf("%d-byte key: %v", n, err)
		}
		if n > 0 && !bytes.Equal(k, make([]byte, n)) {
			t.Errorf("%d-byte key not cleared", n)
		}
	}
	k := randBytes(t, 32)
	keyText := hex.EncodeToString(k)
	stored := nodeSeal(t, keyText, []byte("pt")).Values[0].Stored
	d, err := legacy.MeshHookV1(k)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k, make([]byte, 32)) {
		t.Error("key not cleared")
	}
	if pt, ok, err := d.Decode([]byte(stored)); err != nil || !ok || string(pt) != "pt" {
		t.Fatalf("before Close: %q %v %v", pt, ok, err)
	}
	chain, err := legacy.NewChain(d, legacy.Plaintext())
	if err != nil {
		t.Fatal(err)
	}
	if err := chain.Close(); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{stored, "plain"} {
		if pt, ok, err := chain.Decode([]byte(v)); !errors.Is(err, legacy.ErrClosed) || ok || pt != nil {
			t.Errorf("after Close, %d-byte value: %q %v %v", len(v), pt, ok, err)
		}
	}
}

// TestRawOpenAgrees: the decoder's result is crypto/cipher's, field by field
// (guards against a decoder that agrees with itself but not with GCM).
func TestRawOpenAgrees(t *testing.T) {
	k := randBytes(t, 32)
	pt := randBytes(t, 1024)
	stored := nodeSeal(t, hex.EncodeToString(k), pt).Values[0].Stored
	iv, tag, ct := v1Fields(t, stored)
	b, _ := aes.NewCipher(k)
	a, _ := cipher.NewGCM(b)
	raw, err := a.Open(nil, iv, append(ct, tag...), nil)
	if err != nil || !bytes.Equal(raw, pt) {
		t.Fatalf("crypto/cipher Open of the Node value: %v", err)
	}
	got, ok, err := newDecoder(t, hex.EncodeToString(k)).Decode([]byte(stored))
	if err != nil || !ok || !bytes.Equal(got, raw) {
		t.Fatalf("Decode: ok=%v, err=%v", ok, err)
	}
}

// TestConcurrentDecodeClose: decodes racing each other and Close either
// return the plaintext or ErrClosed, nothing else (run with -race).
func TestConcurrentDecodeClose(t *testing.T) {
	keyText := hex.EncodeToString(randBytes(t, 32))
	stored := []byte(nodeSeal(t, keyText, []byte("concurrent")).Values[0].Stored)
	d := newDecoder(t, keyText)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			for range 2000 {
				pt, ok, err := d.Decode(stored)
				if errors.Is(err, legacy.ErrClosed) {
					return
				}
				if err != nil || !ok || string(pt) != "concurrent" {
					errs <- fmt.Errorf("Decode: %q %v %v", pt, ok, err)
					return
				}
			}
		})
	}
	d.Close()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if _, _, err := d.Decode(stored); !errors.Is(err, legacy.ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}
