package legacy

import (
	"errors"
	"fmt"
	"io"

	"github.com/profullstack/keybroker/envelope"
)

// Errors.
var (
	// ErrDecrypt means a value its decoder claimed did not decrypt: the tag
	// did not verify (altered value, wrong key) or the claimed value is
	// malformed past its header. It matches envelope.ErrDecrypt with
	// errors.Is, so readers treat legacy and sealed values alike. No
	// plaintext is returned with it.
	ErrDecrypt = fmt.Errorf("legacy: value did not decrypt: %w", envelope.ErrDecrypt)
	// ErrClosed is returned by a decoder after Close.
	ErrClosed = errors.New("legacy: decoder closed")
)

// Decoder turns one stored legacy value into its plaintext. Decode has
// exactly three outcomes:
//
//   - ok == true, err == nil: the value is in this decoder's format and
//     plaintext is its content (possibly empty).
//   - ok == false, err == nil: the value is not in this decoder's format
//     ("not mine"); a [Chain] tries the next decoder.
//   - err != nil (ok is false, plaintext nil): the value is in this
//     decoder's format but cannot be decoded ("mine but broken"), or the
//     decoder cannot work (ErrClosed). A Chain stops there and returns err:
//     a value that was claimed is never handed to a later decoder, so a
//     damaged ciphertext never reaches [Plaintext].
//
// Whether a value is "mine" must depend only on the stored bytes, never on
// the key, so the answer is the same for every key and says nothing about
// it. Decode must not retain stored or modify it; the plaintext it returns
// must not alias stored, so the caller may clear either. Errors must not
// contain key or value bytes. Implementations must be safe for concurrent
// use.
type Decoder interface {
	Decode(stored []byte) (plaintext []byte, ok bool, err error)
}

// Func adapts a Go function to a Decoder, as http.HandlerFunc does. The
// function must keep the Decoder contract; Chain treats an outcome with err
// set as the error whatever ok says, and clears and drops any plaintext
// returned with it.
type Func func(stored []byte) (plaintext []byte, ok bool, err error)

// Decode calls f(stored).
func (f Func) Decode(stored []byte) ([]byte, bool, error) { return f(stored) }

type plaintextDecoder struct{}

// Plaintext returns the decoder that claims every value: the stored bytes
// are the plaintext. It returns a copy, never stored itself. In a Chain it
// must come last, because nothing after it is ever tried.
func Plaintext() Decoder { return plaintextDecoder{} }

func (plaintextDecoder) Decode(stored []byte) ([]byte, bool, error) {
	return append([]byte{}, stored...), true, nil
}

// Chain is a Decoder that tries its decoders in order. Decode returns the
// outcome of the first decoder that claims the value (ok or an error); if
// none does it returns (nil, false, nil), so a chain can sit inside another.
// A caller that needs a plaintext for every value ends the chain with
// [Plaintext] or treats ok == false as an unknown format.
type Chain struct{ ds []Decoder }

// NewChain returns a Chain of ds, tried in order. It rejects an empty list,
// a nil decoder, and a Plaintext decoder anywhere but last (the decoders
// after it would never run).
func NewChain(ds ...Decoder) (*Chain, error) {
	if len(ds) == 0 {
		return nil, errors.New("legacy: NewChain: no decoders")
	}
	for i, d := range ds {
		if d == nil {
			return nil, fmt.Errorf("legacy: NewChain: decoder %d is nil", i)
		}
		if _, all := d.(plaintextDecoder); all && i != len(ds)-1 {
			return nil, fmt.Errorf("legacy: NewChain: Plaintext is decoder %d of %d; it claims every value, so it must be last", i, len(ds))
		}
	}
	return &Chain{ds: append([]Decoder(nil), ds...)}, nil
}

// Decode tries each decoder in order; see [Chain].
func (c *Chain) Decode(stored []byte) ([]byte, bool, error) {
	for _, d := range c.ds {
		pt, ok, err := d.Decode(stored)
		if err != nil {
			clear(pt)
			return nil, false, err
		}
		if ok {
			return pt, true, nil
		}
	}
	return nil, false, nil
}

// Close closes every decoder of the chain that is an io.Closer (dropping
// key material) and returns their errors joined.
func (c *Chain) Close() error {
	var errs []error
	for _, d := range c.ds {
		if cl, ok := d.(io.Closer); ok {
			errs = append(errs, cl.Close())
		}
	}
	return errors.Join(errs...)
}
