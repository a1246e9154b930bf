package envelope

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/profullstack/keybroker/provider"
)

var update = flag.Bool("update", false, "rewrite testdata/golden-*.kbe and the FuzzParse seed corpus")

const (
	goldenPlaintext = "keybroker golden envelope v1\n"
	goldenAAD       = "project-1/secret-a"
	goldenWrapAAD   = "golden-tenant"
	goldenKeyID     = "golden-dek-1"
)

// goldenDataKey is the external DEK of testdata/golden-external.kbe: the
// bytes 0x20..0x3f.
func goldenDataKey(t testing.TB) *DataKey {
	t.Helper()
	dek := make([]byte, DEKSize)
	for i := range dek {
		dek[i] = byte(0x20 + i)
	}
	cfg, err := newConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	k, err := newDataKey(dek, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func goldenEnvelope(t testing.TB) *Envelope {
	return newTestEnvelope(t, goldenKEK(t), WithWrapAAD([]byte(goldenWrapAAD)))
}

// readGolden returns testdata/name, writing it first with make under -update.
func readGolden(t *testing.T, name string, make func() []byte) []byte {
	t.Helper()
	p := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(p, make(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run go test -run Golden -update to create it)", err)
	}
	return b
}

func goldenBlobs(t *testing.T) (inline, external []byte) {
	inline = readGolden(t, "golden-inline.kbe", func() []byte {
		return mustEncrypt(t, goldenEnvelope(t), []byte(goldenPlaintext), []byte(goldenAAD))
	})
	external = readGolden(t, "golden-external.kbe", func() []byte {
		b, err := SealWithKeyID(goldenDataKey(t), []byte(goldenKeyID), []byte(goldenPlaintext), []byte(goldenAAD))
		if err != nil {
			t.Fatal(err)
		}
		return b
	})
	return inline, external
}

// TestGolden decrypts envelopes checked in to testdata, made by an earlier
// build from fixed keys: the format and the key schedule must not drift.
func TestGolden(t *testing.T) {
	inline, external := goldenBlobs(t)
	ctx := context.Background()

	got, err := goldenEnvelope(t).Decrypt(ctx, inline, []byte(goldenAAD))
	if err != nil || string(got) != goldenPlaintext {
		t.Fatalf("golden inline: %q, %v", got, err)
	}
	h, err := ParseHeader(inline)
	if err != nil {
		t.Fatal(err)
	}
	if wk := h.WrappedKey; wk == nil || wk.Provider != "local" || wk.KeyID != "golden" || wk.Version != "1" || h.KeyID != nil {
		t.Fatalf("golden inline header: %+v", h)
	}

	got, err = OpenWithKey(goldenDataKey(t), external, []byte(goldenAAD))
	if err != nil || string(got) != goldenPlaintext {
		t.Fatalf("golden external: %q, %v", got, err)
	}
	h, err = ParseHeader(external)
	if err != nil || string(h.KeyID) != goldenKeyID || h.WrappedKey != nil {
		t.Fatalf("golden external header: %+v, %v", h, err)
	}
	// The external layout is fixed apart from nonce and ciphertext.
	want := append([]byte("KBEN\x01\x01\x02\x0c"), goldenKeyID...)
	if !bytes.HasPrefix(external, want) || len(external) != len(want)+NonceSize+4+len(goldenPlaintext)+TagSize {
		t.Fatalf("golden external layout: % x", external[:len(want)])
	}

	for _, blob := range [][]byte{inline, external} {
		m, err := Parse(blob)
		if err != nil {
			t.Fatal(err)
		}
		out, err := m.MarshalBinary()
		if err != nil || !bytes.Equal(out, blob) {
			t.Fatalf("Parse then MarshalBinary changed the golden envelope (%v)", err)
		}
	}

	if *update {
		writeFuzzSeeds(t, inline, external)
	}
}

// writeFuzzSeeds writes FuzzParse's seed corpus: both golden envelopes and
// edge cases of each length field.
func writeFuzzSeeds(t *testing.T, inline, external []byte) {
	dir := filepath.Join("testdata", "fuzz", "FuzzParse")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	seeds := map[string][]byte{
		"golden-inline":     inline,
		"golden-external":   external,
		"truncated-inline":  inline[:len(inline)-1],
		"trailing-external": append(append([]byte(nil), external...), 0),
		"empty":             {},
		"magic-only":        []byte("KBEN"),
		"version-2":         append([]byte("KBEN\x02"), external[5:]...),
		"unknown-kind":      append([]byte("KBEN\x01\x01\x03"), external[7:]...),
		"max-external-id":   append(append([]byte("KBEN\x01\x01\x02\x40"), bytes.Repeat([]byte{'k'}, 64)...), external[len(external)-NonceSize-4-len(goldenPlaintext)-TagSize:]...),
	}
	for name, b := range seeds {
		data := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestTamper: any change to an envelope (every single-bit flip, every
// truncation, an extra byte), or opening it with other aad, fails with
// exactly ErrDecrypt and no plaintext.
func TestTamper(t *testing.T) {
	inline, external := goldenBlobs(t)
	ctx := context.Background()
	e := goldenEnvelope(t)
	k := goldenDataKey(t)
	aad := []byte(goldenAAD)
	opens := []struct {
		name string
		blob []byte
		open func(blob, aad []byte) ([]byte, error)
	}{
		{"inline", inline, func(b, a []byte) ([]byte, error) { return e.Decrypt(ctx, b, a) }},
		{"external", external, func(b, a []byte) ([]byte, error) { return OpenWithKey(k, b, a) }},
	}
	for _, o := range opens {
		t.Run(o.name, func(t *testing.T) {
			check := func(what string, blob, aad []byte) {
				t.Helper()
				if pt, err := o.open(blob, aad); err != ErrDecrypt || pt != nil {
					t.Fatalf("%s: got %d bytes, %v; want ErrDecrypt", what, len(pt), err)
				}
			}
			if _, err := o.open(o.blob, aad); err != nil {
				t.Fatalf("untampered: %v", err)
			}
			b := append([]byte(nil), o.blob...)
			for i := range len(b) * 8 {
				b[i/8] ^= 1 << (i % 8)
				check(fmt.Sprintf("bit %d flipped", i), b, aad)
				b[i/8] ^= 1 << (i % 8)
			}
			for n := range len(b) {
				check(fmt.Sprintf("truncated to %d bytes", n), b[:n], aad)
			}
			check("extra byte", append(b[:len(b):len(b)], 0), aad)
			check("no aad", b, nil)
			check("other secret's aad", b, []byte("project-1/secret-b"))
			check("other tenant's aad", b, []byte("project-2/secret-a"))
			check("aad with extra byte", b, append([]byte(goldenAAD), 0))
			check("aad over MaxAADLen", b, make([]byte, MaxAADLen+1))
			if _, err := o.open(o.blob, aad); err != nil {
				t.Fatalf("untampered after the flips: %v", err)
			}
		})
	}
}

// TestParseErrors: Parse names the malformed field, and its error matches
// ErrDecrypt.
func TestParseErrors(t *testing.T) {
	_, external := goldenBlobs(t)
	for _, c := range []struct {
		blob []byte
		want string
	}{
		{nil, "envelope: malformed envelope: length 0 below minimum 41"},
		{append([]byte("KBEX"), external[4:]...), "envelope: malformed envelope: bad magic"},
		{append([]byte("KBEN\x02"), external[5:]...), "envelope: malformed envelope: unknown version 2"},
		{append([]byte("KBEN\x01\x02"), external[6:]...), "envelope: malformed envelope: unknown algorithm 2"},
		{append([]byte("KBEN\x01\x01\x07"), external[7:]...), "envelope: malformed envelope: unknown key reference kind 7"},
		{append([]byte("KBEN\x01\x01\x02\x41"), external[8:]...), "envelope: malformed envelope: external key id length 65 out of range 1..64"},
		{append([]byte("KBEN\x01\x01\x02\x00"), external[8:]...), "envelope: malformed envelope: external key id length 0 out of range 1..64"},
		{append(append([]byte(nil), external...), 1, 2), "envelope: malformed envelope: 2 trailing bytes"},
		{external[:len(external)-1], "envelope: malformed envelope: truncated in ciphertext"},
	} {
		_, err := Parse(c.blob)
		if err == nil || err.Error() != c.want || !errors.Is(err, ErrDecrypt) {
			t.Errorf("Parse: %v; want %q matching ErrDecrypt", err, c.want)
		}
		if _, err := ParseHeader(c.blob); err == nil || err.Error() != c.want {
			t.Errorf("ParseHeader: %v; want %q", err, c.want)
		}
	}
	m, err := Parse(external)
	if err != nil {
		t.Fatal(err)
	}
	bad := *m
	bad.KeyID = make([]byte, MaxKeyIDLen+1)
	if _, err := bad.MarshalBinary(); err == nil {
		t.Fatal("MarshalBinary accepted an over-long key id")
	}
	bad = *m
	bad.WrappedKey = &provider.WrappedKey{Provider: "local", KeyID: "x", Version: "1", Ciphertext: []byte{1}}
	if _, err := bad.MarshalBinary(); err == nil {
		t.Fatal("MarshalBinary accepted both a key id and a wrapped key")
	}
	bad = *m
	bad.Nonce = bad.Nonce[:NonceSize-1]
	if _, err := bad.MarshalBinary(); err == nil {
		t.Fatal("MarshalBinary accepted a short nonce")
	}
}

// TestFormatDocument: docs/FORMAT.md shows both golden envelopes in full,
// and the keys, payload and associated data they were made with.
func TestFormatDocument(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "docs", "FORMAT.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	inline, external := goldenBlobs(t)
	payload := strings.TrimSuffix(goldenPlaintext, "\n")
	for _, s := range []string{hex.EncodeToString(inline), hex.EncodeToString(external), goldenKeyring,
		"`" + goldenWrapAAD + "`", "`" + goldenAAD + "`", "`" + goldenKeyID + "`", "`" + payload + "`", "0x20..0x3f"} {
		if !strings.Contains(doc, s) {
			t.Errorf("docs/FORMAT.md does not show %s", s)
		}
	}
	if len(goldenPlaintext) != 29 || !strings.HasSuffix(goldenPlaintext, "\n") {
		t.Error("FORMAT.md describes the golden payload as 29 bytes ending in a newline")
	}
}
