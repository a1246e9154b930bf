package envelope

import (
	"context"
	"testing"

	"github.com/profullstack/keybroker/provider/local"
)

func TestEnvelopeStats(t *testing.T) {
	ctx := context.Background()
	kek, err := local.Generate("stats")
	if err != nil {
		t.Fatal(err)
	}
	e, err := New(kek, WithMaxMessages(2))
	if err != nil {
		t.Fatal(err)
	}
	if s := e.Stats(); s.ActiveMessages != 0 || s.MaxMessages != 2 {
		t.Fatalf("fresh Stats = %+v, want 0 of 2 messages", s)
	}
	var blobs [][]byte
	for range 3 {
		b, err := e.Encrypt(ctx, []byte("m"), nil)
		if err != nil {
			t.Fatal(err)
		}
		blobs = append(blobs, b)
	}
	// Two messages spent the first DEK; the third is the second DEK's first.
	if s := e.Stats(); s.ActiveMessages != 1 {
		t.Fatalf("after 3 messages with budget 2: ActiveMessages = %d, want 1", s.ActiveMessages)
	}
	for _, b := range append(blobs, blobs[0]) {
		if _, err := e.Decrypt(ctx, b, nil); err != nil {
			t.Fatal(err)
		}
	}
	if c := e.Stats().Cache; c.Misses != 2 || c.Hits != 2 || c.Entries != 2 {
		t.Fatalf("cache stats = %+v, want 2 misses, 2 hits, 2 entries", c)
	}
	e.Close()
	if s := e.Stats(); s.ActiveMessages != 0 || s.Cache.Entries != 0 {
		t.Fatalf("Stats after Close = %+v, want no active messages, no entries", s)
	}
}
