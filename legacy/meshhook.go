package legacy

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sync/atomic"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/profullstack/keybroker/envelope"
)

// MeshHook v1 format constants. A value is the ASCII text
//
//	v1:<iv>:<tag>:<ct>
//
// with each field in standard, padded base64: a 12-byte IV (16 characters),
// a 16-byte GCM tag (24 characters) and the ciphertext (as long as the
// plaintext, possibly empty).
const (
	MeshHookKeySize = 32 // AES-256
	MeshHookIVSize  = 12
	MeshHookTagSize = 16
	// MaxMeshHookPlaintextLen bounds the plaintext of a v1 value: that of an
	// envelope, so every value that decodes can be sealed again.
	MaxMeshHookPlaintextLen = envelope.MaxPlaintextLen
	// MaxMeshHookKeyLen bounds the key text ParseMeshHookKey reads.
	MaxMeshHookKeyLen = 1024
	// MinMeshHookPassphraseLen is the shortest passphrase accepted, in
	// characters as JavaScript counts them (UTF-16 code units).
	MinMeshHookPassphraseLen = 32
)

var (
	v1Prefix   = []byte("v1:")
	ivB64Len   = base64.StdEncoding.EncodedLen(MeshHookIVSize)  // 16
	tagB64Len  = base64.StdEncoding.EncodedLen(MeshHookTagSize) // 24
	v1Header   = len(v1Prefix) + ivB64Len + 1 + tagB64Len + 1   // through the third ':'
	maxCTB64   = base64.StdEncoding.EncodedLen(MaxMeshHookPlaintextLen)
	strictB64  = base64.StdEncoding.Strict()
	envNameRE  = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)
	errKeyForm = errors.New("legacy: MeshHook key is not 64 hex characters, standard base64 of 32 bytes, or a passphrase of at least 32 characters")
)

// MeshHookV1Decoder decodes MeshHook "v1:" values (AES-256-GCM, no
// associated data). Make one with [MeshHookV1]; it is safe for concurrent
// use. A value is claimed when its header is well formed; see the package
// documentation, section "Look-alike plaintexts".
type MeshHookV1Decoder struct {
	// aead is nil after Close; Decode loads it once.
	aead atomic.Pointer[gcm]
}

type gcm struct{ cipher.AEAD }

// MeshHookV1 returns a decoder for v1 values under key, which must be
// MeshHookKeySize bytes (see [ParseMeshHookKey]). It takes ownership of key:
// the bytes are expanded into the AES key schedule and cleared before
// MeshHookV1 returns, on success and on error.
func MeshHookV1(key []byte) (*MeshHookV1Decoder, error) {
	defer clear(key)
	if len(key) != MeshHookKeySize {
		return nil, fmt.Errorf("legacy: MeshHook key is %d bytes, want %d", len(key), MeshHookKeySize)
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("legacy: %w", err)
	}
	a, err := cipher.NewGCM(b) // 12-byte nonce, 16-byte tag: MeshHook's parameters
	if err != nil {
		return nil, fmt.Errorf("legacy: %w", err)
	}
	d := &MeshHookV1Decoder{}
	d.aead.Store(&gcm{a})
	return d, nil
}

// MeshHookV1FromEnv reads the key from the environment variable name (as
// MeshHook reads SECRETS_ENCRYPTION_KEY), parses it with ParseMeshHookKey
// and returns MeshHookV1 of it. Errors name the variable, never its value.
// The process environment still holds the key text afterwards; unset the
// variable if nothing else needs it.
func MeshHookV1FromEnv(name string) (*MeshHookV1Decoder, error) {
	if !envNameRE.MatchString(name) {
		return nil, errors.New("legacy: malformed environment variable name")
	}
	s, ok := os.LookupEnv(name)
	if !ok {
		return nil, fmt.Errorf("legacy: environment variable %s is not set", name)
	}
	key, err := ParseMeshHookKey(s)
	if err != nil {
		return nil, fmt.Errorf("legacy: environment variable %s: %w", name, err)
	}
	return MeshHookV1(key)
}

// Close drops the key: Decode returns ErrClosed afterwards. Decodes already
// running finish. The raw key bytes were cleared by MeshHookV1; the expanded
// schedule inside crypto/aes cannot be cleared and is left to the garbage
// collector. Close is idempotent and returns nil.
func (d *MeshHookV1Decoder) Close() error {
	d.aead.Store(nil)
	return nil
}

// Decode implements [Decoder]. A value without a well-formed v1 header is
// not claimed (ok == false). A value with one is claimed: it decodes to its
// plaintext, or fails with an error matching ErrDecrypt (ciphertext field
// not canonical base64, too long, or a tag that does not verify). After
// Close every call returns ErrClosed.
func (d *MeshHookV1Decoder) Decode(stored []byte) ([]byte, bool, error) {
	a := d.aead.Load()
	if a == nil {
		return nil, false, ErrClosed
	}
	var iv [MeshHookIVSize]byte
	var tag [MeshHookTagSize + 2]byte // DecodedLen(24) = 18
	if !parseV1Header(stored, iv[:], tag[:]) {
		return nil, false, nil
	}
	ctB64 := stored[v1Header:]
	if len(ctB64) > maxCTB64 {
		return nil, false, fmt.Errorf("%w: ciphertext field is %d bytes, limit %d", ErrDecrypt, len(ctB64), maxCTB64)
	}
	// One buffer: ciphertext, then tag, opened in place.
	buf := make([]byte, base64.StdEncoding.DecodedLen(len(ctB64))+MeshHookTagSize)
	n, ok := decodeCanonical(buf, ctB64)
	if !ok {
		return nil, false, fmt.Errorf("%w: ciphertext field is not canonical standard base64", ErrDecrypt)
	}
	sealed := append(buf[:n], tag[:MeshHookTagSize]...)
	pt, err := a.Open(sealed[:0], iv[:], sealed, nil)
	if err != nil {
		return nil, false, ErrDecrypt // crypto/cipher has zeroed the output
	}
	return pt, true, nil
}

// parseV1Header reports whether stored starts with "v1:<iv>:<tag>:" where
// iv and tag are canonical standard base64 of exactly 12 and 16 bytes, and
// decodes them into iv and tag. It depends only on the stored bytes.
func parseV1Header(stored, iv, tag []byte) bool {
	if len(stored) < v1Header || !bytes.HasPrefix(stored, v1Prefix) {
		return false
	}
	ivEnd := len(v1Prefix) + ivB64Len
	tagEnd := ivEnd + 1 + tagB64Len
	if stored[ivEnd] != ':' || stored[tagEnd] != ':' {
		return false
	}
	if n, ok := decodeCanonical(iv, stored[len(v1Prefix):ivEnd]); !ok || n != MeshHookIVSize {
		return false
	}
	n, ok := decodeCanonical(tag, stored[ivEnd+1:tagEnd])
	return ok && n == MeshHookTagSize
}

// decodeCanonical decodes strict, padded standard base64 into dst (at least
// DecodedLen(len(src)) bytes). It accepts only the one encoding of its
// result: encoding/base64 skips CR and LF even in strict mode, which the
// length check rejects.
func decodeCanonical(dst, src []byte) (int, bool) {
	n, err := strictB64.Decode(dst, src)
	if err != nil || base64.StdEncoding.EncodedLen(n) != len(src) {
		return 0, false
	}
	return n, true
}

// ParseMeshHookKey parses the text of SECRETS_ENCRYPTION_KEY into the
// 32-byte AES key, trying the forms in this order:
//
//  1. exactly 64 hex digits (either case): the key in hex;
//  2. exactly 44 characters of canonical, padded standard base64 that
//     decode to 32 bytes: the key in base64;
//  3. any other text of at least 32 characters (UTF-16 code units, as
//     JavaScript's length counts them): a passphrase; the key is the SHA-256
//     of its UTF-8 bytes.
//
// Anything else is an error. The forms are checked in that order, so a
// 64-hex-digit passphrase is read as hex and a 44-character base64 one as
// base64. Unpadded (43 characters) or URL-alphabet base64 is not form 2 and
// so is a passphrase. Text with leading or trailing white space, invalid
// UTF-8 or more than MaxMeshHookKeyLen bytes is rejected rather than
// trimmed or guessed at. A key read the wrong way is never silent: every
// v1 value then fails with ErrDecrypt. Errors never contain the text. The
// caller owns the returned bytes ([MeshHookV1] clears them).
func ParseMeshHookKey(s string) ([]byte, error) {
	switch {
	case s == "":
		return nil, errors.New("legacy: empty MeshHook key")
	case len(s) > MaxMeshHookKeyLen:
		return nil, fmt.Errorf("legacy: MeshHook key is %d bytes, limit %d", len(s), MaxMeshHookKeyLen)
	case !utf8.ValidString(s):
		return nil, errors.New("legacy: MeshHook key is not valid UTF-8")
	}
	first, _ := utf8.DecodeRuneInString(s)
	last, _ := utf8.DecodeLastRuneInString(s)
	if unicode.IsSpace(first) || unicode.IsSpace(last) {
		return nil, errors.New("legacy: MeshHook key has leading or trailing white space")
	}
	src := []byte(s) // a copy this function can clear
	defer clear(src)
	if len(src) == hex.EncodedLen(MeshHookKeySize) {
		key := make([]byte, MeshHookKeySize)
		if _, err := hex.Decode(key, src); err == nil {
			return key, nil
		}
		clear(key)
	}
	if len(src) == base64.StdEncoding.EncodedLen(MeshHookKeySize) {
		buf := make([]byte, base64.StdEncoding.DecodedLen(len(src)))
		if n, ok := decodeCanonical(buf, src); ok && n == MeshHookKeySize {
			return buf[:n], nil
		}
		clear(buf)
	}
	if jsLen(s) >= MinMeshHookPassphraseLen {
		sum := sha256.Sum256(src)
		key := append([]byte(nil), sum[:]...)
		clear(sum[:])
		return key, nil
	}
	return nil, errKeyForm
}

// jsLen is the length of s in UTF-16 code units, JavaScript's String.length.
func jsLen(s string) int {
	n := 0
	for _, r := range s {
		n += utf16.RuneLen(r)
	}
	return n
}
