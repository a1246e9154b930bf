package bench

import (
	"bytes"
	"context"
	"fmt"

	"github.com/profullstack/keybroker/envelope"
)

// CallCount is how many key-service calls one contender made to encrypt n
// secrets with one instance and decrypt them all with another (as a second
// process would, starting with an empty cache).
type CallCount struct {
	Contender string
	Secrets   int
	// EncCalls and DecCalls are KEK provider calls (keybroker) or API
	// calls (per secret); EncRequests and DecRequests are the HTTP
	// requests that reached the server, counted by a proxy (-1 if none).
	EncCalls, DecCalls       int64
	EncRequests, DecRequests int64
	// DataKeys is how many distinct wrapped DEKs the envelopes name (0 for
	// contenders whose output is not a keybroker envelope).
	DataKeys int
}

// CountCalls encrypts n secrets of size bytes with a fresh instance of c,
// then decrypts them with another fresh instance, checking each plaintext.
func CountCalls(ctx context.Context, c *Contender, n, size int) (CallCount, error) {
	cc := CallCount{Contender: c.Name, Secrets: n, EncRequests: -1, DecRequests: -1}
	reqs := func() int64 {
		if c.Requests == nil {
			return 0
		}
		return c.Requests()
	}
	pt := Payload(size)
	enc, err := c.Reset()
	if err != nil {
		return cc, err
	}
	defer enc.Close()
	r0 := reqs()
	cts := make([][]byte, n)
	for i := range cts {
		if cts[i], err = enc.Seal(ctx, pt); err != nil {
			return cc, fmt.Errorf("%s: seal: %w", c.Name, err)
		}
	}
	r1 := reqs()
	dec, err := c.Reset()
	if err != nil {
		return cc, err
	}
	defer dec.Close()
	for _, ct := range cts {
		got, err := dec.Open(ctx, ct)
		if err != nil {
			return cc, fmt.Errorf("%s: open: %w", c.Name, err)
		}
		if !bytes.Equal(got, pt) {
			return cc, fmt.Errorf("%s: opened other bytes than were sealed", c.Name)
		}
	}
	r2 := reqs()
	cc.EncCalls, cc.DecCalls = enc.Calls(), dec.Calls()
	if c.Requests != nil {
		cc.EncRequests, cc.DecRequests = r1-r0, r2-r1
	}
	deks := map[string]bool{}
	for _, ct := range cts {
		if h, err := envelope.ParseHeader(ct); err == nil && h.WrappedKey != nil {
			deks[string(h.WrappedKey.Ciphertext)] = true
		}
	}
	cc.DataKeys = len(deks)
	return cc, nil
}
