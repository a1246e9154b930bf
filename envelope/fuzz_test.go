package envelope

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzParse: Parse never panics; what it accepts marshals back to the same
// bytes and agrees with ParseHeader; what it rejects is ErrDecrypt; and no
// input opens under the golden external key. Seeds: testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	k := goldenDataKey(f)
	f.Fuzz(func(t *testing.T, blob []byte) {
		m, err := Parse(blob)
		_, herr := ParseHeader(blob)
		if (err == nil) != (herr == nil) {
			t.Fatalf("Parse error %v but ParseHeader error %v", err, herr)
		}
		if err != nil {
			if !errors.Is(err, ErrDecrypt) {
				t.Fatalf("Parse error %v does not match ErrDecrypt", err)
			}
			return
		}
		out, err := m.MarshalBinary()
		if err != nil {
			t.Fatalf("MarshalBinary of a parsed envelope: %v", err)
		}
		if !bytes.Equal(out, blob) {
			t.Fatalf("MarshalBinary(Parse(b)) != b\n b = %x\nout = %x", blob, out)
		}
		if pt, err := OpenWithKey(k, blob, nil); err != ErrDecrypt || pt != nil {
			t.Fatalf("OpenWithKey of fuzz input: %d bytes, %v", len(pt), err)
		}
	})
}
