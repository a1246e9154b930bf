package envelope

import (
	"encoding"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/profullstack/keybroker/provider"
)

// Wire constants of format version 1. docs/FORMAT.md specifies the layout.
const (
	// Version is the only format version this package reads and writes.
	Version = 1

	// NonceSize is the length of the AES-GCM nonce: 96 bits.
	NonceSize = 12
	// TagSize is the length of the AES-GCM authentication tag: 128 bits.
	TagSize = 16
	// DEKSize is the length of a data key: AES-256.
	DEKSize = 32

	// MaxPlaintextLen bounds the payload of one envelope (64 MiB). Larger
	// values are not secrets; they belong in object storage under a DEK.
	MaxPlaintextLen = 64 << 20
	// MaxAADLen bounds the caller's associated data (64 KiB).
	MaxAADLen = 64 << 10
	// MaxKeyIDLen bounds an external data-key id.
	MaxKeyIDLen = 64
)

// Algorithm identifies the AEAD that protects the payload.
type Algorithm uint8

// AES256GCM is AES-256 in GCM mode with a 96-bit random nonce and a 128-bit
// tag, as implemented by crypto/cipher.
const AES256GCM Algorithm = 1

func (a Algorithm) String() string {
	if a == AES256GCM {
		return "AES-256-GCM"
	}
	return fmt.Sprintf("Algorithm(%d)", uint8(a))
}

const (
	magic = "KBEN"

	refInline   = 1 // the header carries the provider-wrapped DEK
	refExternal = 2 // the header names a DEK the caller stores elsewhere

	fixedLen     = len(magic) + 3 // magic, version, algorithm, reference kind
	trailerLen   = NonceSize + 4  // nonce, ciphertext length
	minEnvelope  = fixedLen + 2 + trailerLen + TagSize
	maxCipherLen = MaxPlaintextLen + TagSize
)

// Header is the plaintext, authenticated part of an envelope: what a reader
// needs to find the DEK before opening it.
type Header struct {
	Version   uint8     // format version; always Version
	Algorithm Algorithm // always AES256GCM

	// Exactly one of WrappedKey and KeyID is set. WrappedKey is the DEK as
	// the KEK provider wrapped it (self-contained envelopes, made by
	// Envelope.Encrypt); KeyID names a DEK kept outside the envelope (made
	// by SealWithKeyID), at most MaxKeyIDLen bytes.
	WrappedKey *provider.WrappedKey
	KeyID      []byte

	Nonce []byte // NonceSize bytes
}

// Message is a parsed envelope: its header and the AES-GCM ciphertext with
// the tag appended. It is what Parse returns and MarshalBinary encodes.
type Message struct {
	Header
	Ciphertext []byte
}

var _ encoding.BinaryMarshaler = (*Message)(nil)

// formatError describes a malformed envelope. It matches ErrDecrypt, so a
// caller that only asks "did this decrypt?" needs one check, while the
// message tells an operator which field was wrong (never its contents).
type formatError struct{ msg string }

func (e *formatError) Error() string        { return "envelope: malformed envelope: " + e.msg }
func (e *formatError) Is(target error) bool { return target == ErrDecrypt }

func malformed(format string, args ...any) error {
	return &formatError{msg: fmt.Sprintf(format, args...)}
}

// view is a parsed envelope whose fields alias the blob. Parsing into a view
// does not allocate, which keeps Decrypt's hot path to one allocation.
type view struct {
	header []byte // everything before the ciphertext; authenticated
	ref    []byte // reference kind byte through the end of the reference
	kind   byte

	provider, keyID, version, wrapped []byte // refInline
	extID                             []byte // refExternal

	nonce []byte
	ct    []byte // ciphertext || tag
}

// reader consumes a blob front to back; the first failure sticks.
type reader struct {
	b   []byte
	off int
	err error
}

func (r *reader) take(n int, field string) []byte {
	if r.err != nil {
		return nil
	}
	if n > len(r.b)-r.off {
		r.err = malformed("truncated in %s", field)
		return nil
	}
	s := r.b[r.off : r.off+n : r.off+n]
	r.off += n
	return s
}

func (r *reader) u8(field string) int {
	s := r.take(1, field)
	if s == nil {
		return 0
	}
	return int(s[0])
}

func (r *reader) u16(field string) int {
	s := r.take(2, field)
	if s == nil {
		return 0
	}
	return int(binary.BigEndian.Uint16(s))
}

// field reads a length-prefixed field whose length must lie in [lo, hi].
func (r *reader) field(lenBytes, lo, hi int, name string) []byte {
	var n int
	if lenBytes == 1 {
		n = r.u8(name)
	} else {
		n = r.u16(name)
	}
	if r.err == nil && (n < lo || n > hi) {
		r.err = malformed("%s length %d out of range %d..%d", name, n, lo, hi)
	}
	return r.take(n, name)
}

func parseView(blob []byte, v *view) error {
	// Checked first so a huge blob is rejected before anything else.
	if len(blob) < minEnvelope {
		return malformed("length %d below minimum %d", len(blob), minEnvelope)
	}
	r := reader{b: blob}
	if string(r.take(len(magic), "magic")) != magic {
		return malformed("bad magic")
	}
	if ver := r.u8("version"); ver != Version {
		return malformed("unknown version %d", ver)
	}
	if alg := r.u8("algorithm"); Algorithm(alg) != AES256GCM {
		return malformed("unknown algorithm %d", alg)
	}
	refStart := r.off
	v.kind = byte(r.u8("key reference kind"))
	switch v.kind {
	case refInline:
		v.provider = r.field(1, 1, provider.MaxProviderLen, "provider name")
		v.keyID = r.field(2, 1, provider.MaxKeyIDLen, "key id")
		v.version = r.field(2, 0, provider.MaxVersionLen, "key version")
		v.wrapped = r.field(2, 1, provider.MaxCiphertextLen, "wrapped key")
	case refExternal:
		v.extID = r.field(1, 1, MaxKeyIDLen, "external key id")
	default:
		return malformed("unknown key reference kind %d", v.kind)
	}
	v.ref = blob[refStart:r.off:r.off]
	v.nonce = r.take(NonceSize, "nonce")
	ctLen := 0
	if s := r.take(4, "ciphertext length"); s != nil {
		n := binary.BigEndian.Uint32(s)
		if n < TagSize || n > maxCipherLen {
			return malformed("ciphertext length %d out of range %d..%d", n, TagSize, maxCipherLen)
		}
		ctLen = int(n)
	}
	v.header = blob[:r.off:r.off]
	v.ct = r.take(ctLen, "ciphertext")
	if r.err != nil {
		return r.err
	}
	if r.off != len(blob) {
		return malformed("%d trailing bytes", len(blob)-r.off)
	}
	return nil
}

// Parse decodes an envelope without decrypting it. Parsing is strict: an
// unknown version, algorithm or key reference kind, a length outside its
// bound, a truncated field or trailing bytes is an error that matches
// ErrDecrypt and names the field. Marshalling the result gives back blob
// byte for byte. The Message does not alias blob.
func Parse(blob []byte) (*Message, error) {
	var v view
	if err := parseView(blob, &v); err != nil {
		return nil, err
	}
	m := &Message{Header: v.toHeader(), Ciphertext: append([]byte(nil), v.ct...)}
	return m, nil
}

// ParseHeader decodes and validates a whole envelope like Parse, and returns
// only its header: a store uses it to find which DEK to load before calling
// OpenWithKey. The Header does not alias blob.
func ParseHeader(blob []byte) (Header, error) {
	var v view
	if err := parseView(blob, &v); err != nil {
		return Header{}, err
	}
	return v.toHeader(), nil
}

func (v *view) toHeader() Header {
	h := Header{Version: Version, Algorithm: AES256GCM, Nonce: append([]byte(nil), v.nonce...)}
	if v.kind == refInline {
		h.WrappedKey = &provider.WrappedKey{
			Provider:   string(v.provider),
			KeyID:      string(v.keyID),
			Version:    string(v.version),
			Ciphertext: append([]byte(nil), v.wrapped...),
		}
	} else {
		h.KeyID = append([]byte(nil), v.extID...)
	}
	return h
}

// MarshalBinary encodes m. It fails, naming the field, if a field is out of
// its bound or both or neither of WrappedKey and KeyID are set.
func (m *Message) MarshalBinary() ([]byte, error) {
	if m.Version != Version {
		return nil, fmt.Errorf("envelope: marshal: unknown version %d", m.Version)
	}
	if m.Algorithm != AES256GCM {
		return nil, fmt.Errorf("envelope: marshal: unknown algorithm %d", m.Algorithm)
	}
	if len(m.Nonce) != NonceSize {
		return nil, fmt.Errorf("envelope: marshal: nonce length %d, want %d", len(m.Nonce), NonceSize)
	}
	if n := len(m.Ciphertext); n < TagSize || n > maxCipherLen {
		return nil, fmt.Errorf("envelope: marshal: ciphertext length %d out of range %d..%d", n, TagSize, maxCipherLen)
	}
	var ref []byte
	var err error
	switch {
	case m.WrappedKey != nil && m.KeyID == nil:
		ref, err = inlineRef(m.WrappedKey)
	case m.WrappedKey == nil && m.KeyID != nil:
		ref, err = appendExternalRef(nil, m.KeyID)
	default:
		err = errors.New("envelope: marshal: exactly one of WrappedKey and KeyID must be set")
	}
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, headerLen(ref)+len(m.Ciphertext))
	out = appendHeader(out, ref, m.Nonce, len(m.Ciphertext))
	return append(out, m.Ciphertext...), nil
}

// inlineRef encodes the reference to an inline wrapped DEK.
func inlineRef(wk *provider.WrappedKey) ([]byte, error) {
	if err := wk.Validate(); err != nil {
		return nil, fmt.Errorf("envelope: %w", err)
	}
	b := make([]byte, 0, 1+1+2+2+2+len(wk.Provider)+len(wk.KeyID)+len(wk.Version)+len(wk.Ciphertext))
	b = append(b, refInline, byte(len(wk.Provider)))
	b = append(b, wk.Provider...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(wk.KeyID)))
	b = append(b, wk.KeyID...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(wk.Version)))
	b = append(b, wk.Version...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(wk.Ciphertext)))
	return append(b, wk.Ciphertext...), nil
}

// appendExternalRef appends the reference to an external DEK id.
func appendExternalRef(dst, id []byte) ([]byte, error) {
	if len(id) == 0 || len(id) > MaxKeyIDLen {
		return nil, fmt.Errorf("envelope: external key id length %d out of range 1..%d", len(id), MaxKeyIDLen)
	}
	dst = append(dst, refExternal, byte(len(id)))
	return append(dst, id...), nil
}

func headerLen(ref []byte) int { return fixedLen - 1 + len(ref) + trailerLen }

// appendHeader appends the header for a ciphertext of ctLen bytes.
func appendHeader(dst, ref, nonce []byte, ctLen int) []byte {
	dst = append(dst, magic...)
	dst = append(dst, Version, byte(AES256GCM))
	dst = append(dst, ref...)
	dst = append(dst, nonce...)
	return binary.BigEndian.AppendUint32(dst, uint32(ctLen))
}
