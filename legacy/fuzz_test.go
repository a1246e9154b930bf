package legacy_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/profullstack/keybroker/legacy"
)

// FuzzDecode: no input panics; each outcome keeps the Decoder contract;
// nothing claimed yields more plaintext than its ciphertext could hold; a
// chain ending in Plaintext returns unclaimed input unchanged. Seeds: the
// golden values and their look-alikes, under the golden key.
func FuzzDecode(f *testing.F) {
	b, err := os.ReadFile(filepath.Join("testdata", "meshhook-v1.golden.json"))
	if err != nil {
		f.Fatal(err)
	}
	var g nodeOutput
	if err := json.Unmarshal(b, &g); err != nil {
		f.Fatal(err)
	}
	for _, v := range g.Values {
		f.Add([]byte(v.Stored))
		f.Add([]byte(v.Stored[:len(v.Stored)/2]))
	}
	f.Add([]byte("v1:"))
	f.Add([]byte("plain secret"))
	d := newDecoder(f, g.Key)
	chain, err := legacy.NewChain(d, legacy.Plaintext())
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, stored []byte) {
		orig := bytes.Clone(stored)
		pt, ok, err := d.Decode(stored)
		switch {
		case err != nil:
			if ok || pt != nil || !errors.Is(err, legacy.ErrDecrypt) {
				t.Fatalf("error outcome: %d bytes, ok=%v, err=%v", len(pt), ok, err)
			}
		case ok:
			if len(pt) > len(stored) {
				t.Fatalf("%d bytes of plaintext from a %d-byte value", len(pt), len(stored))
			}
		case pt != nil:
			t.Fatalf("not-mine outcome with %d bytes of plaintext", len(pt))
		}
		cpt, cok, cerr := chain.Decode(stored)
		if (cerr == nil) != (err == nil) || (err != nil && cerr.Error() != err.Error()) ||
			(err == nil && (!cok || !bytes.Equal(cpt, orDefault(pt, ok, stored)))) {
			t.Fatalf("chain disagrees with its decoder: ok=%v err=%v, decoder ok=%v err=%v", cok, cerr, ok, err)
		}
		if !bytes.Equal(stored, orig) {
			t.Fatal("Decode modified its input")
		}
	})
}

// orDefault is what the chain must return when the decoder did not fail:
// the decoder's plaintext if it claimed the value, else the value itself.
func orDefault(pt []byte, ok bool, stored []byte) []byte {
	if ok {
		return pt
	}
	return stored
}
