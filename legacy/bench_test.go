package legacy_test

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"testing"
)

// BenchmarkDecode1KiB compares Decode of a Node-made 1 KiB v1 value with
// crypto/cipher's Open of the same fields already decoded (RawOpen) and
// with a plain split-and-base64 done per call (RawWithBase64), which shows
// where Decode's time goes.
func BenchmarkDecode1KiB(b *testing.B) {
	k := randBytes(b, 32)
	keyText := hex.EncodeToString(k)
	stored := []byte(nodeSeal(b, keyText, randBytes(b, 1024)).Values[0].Stored)
	d := newDecoder(b, keyText)
	blk, err := aes.NewCipher(k)
	if err != nil {
		b.Fatal(err)
	}
	a, err := cipher.NewGCM(blk)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("Decode", func(b *testing.B) {
		b.SetBytes(1024)
		b.ReportAllocs()
		for b.Loop() {
			if _, ok, err := d.Decode(stored); !ok || err != nil {
				b.Fatal(ok, err)
			}
		}
	})
	b.Run("RawWithBase64", func(b *testing.B) {
		b.SetBytes(1024)
		b.ReportAllocs()
		for b.Loop() {
			iv, tag, ct := v1Fields(b, string(stored))
			if _, err := a.Open(ct[:0], iv, append(ct, tag...), nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("RawOpen", func(b *testing.B) {
		iv, tag, ct := v1Fields(b, string(stored))
		sealed := append(ct, tag...)
		dst := make([]byte, 0, len(sealed))
		b.SetBytes(1024)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := a.Open(dst, iv, sealed, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
}
