package envelope_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"time"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// Self-contained envelopes: the blob carries its wrapped DEK, so the KEK
// provider is all Decrypt needs.
func Example() {
	ctx := context.Background()
	kek, err := local.Generate("example")
	if err != nil {
		log.Fatal(err)
	}
	env, err := envelope.New(kek, envelope.WithWrapAAD([]byte("tenant-7")))
	if err != nil {
		log.Fatal(err)
	}
	defer env.Close()

	aad := []byte("project-1/STRIPE_KEY") // binds the blob to its record
	blob, err := env.Encrypt(ctx, []byte("sk_live_123"), aad)
	if err != nil {
		log.Fatal(err)
	}
	pt, err := env.Decrypt(ctx, blob, aad)
	fmt.Printf("%s %v\n", pt, err)

	_, err = env.Decrypt(ctx, blob, []byte("project-2/STRIPE_KEY"))
	fmt.Println(err)
	// Output:
	// sk_live_123 <nil>
	// envelope: message authentication failed
}

// External DEKs: a store keeps the wrapped DEK in its own table under an id
// and the envelope names that id.
func ExampleSealWithKeyID() {
	ctx := context.Background()
	kek, err := local.Generate("example")
	if err != nil {
		log.Fatal(err)
	}
	wrapAAD := []byte("tenant-7")
	dek, wrapped, err := envelope.NewDataKey(ctx, kek, wrapAAD)
	if err != nil {
		log.Fatal(err)
	}
	defer dek.Destroy()
	table := map[string]*provider.WrappedKey{"dek-1": wrapped} // the store's data_keys

	blob, err := envelope.SealWithKeyID(dek, []byte("dek-1"), []byte("s3cret"), []byte("project-1/DB_URL"))
	if err != nil {
		log.Fatal(err)
	}

	// Later, perhaps in another process: find the DEK, unwrap, open.
	h, err := envelope.ParseHeader(blob)
	if err != nil {
		log.Fatal(err)
	}
	k, err := envelope.UnwrapDataKey(ctx, kek, table[string(h.KeyID)], wrapAAD)
	if err != nil {
		log.Fatal(err)
	}
	defer k.Destroy()
	pt, err := envelope.OpenWithKey(k, blob, []byte("project-1/DB_URL"))
	fmt.Printf("key %s: %s %v\n", h.KeyID, pt, err)
	// Output:
	// key dek-1: s3cret <nil>
}

// A KeyCache keeps unwrapped DEKs for a store, loading each once.
func ExampleKeyCache() {
	ctx := context.Background()
	kek, err := local.Generate("example")
	if err != nil {
		log.Fatal(err)
	}
	_, wrapped, err := envelope.NewDataKey(ctx, kek, nil)
	if err != nil {
		log.Fatal(err)
	}
	cache := envelope.NewKeyCache(1000, 5*time.Minute)
	defer cache.Close()
	load := func(ctx context.Context) (*envelope.DataKey, error) {
		return envelope.UnwrapDataKey(ctx, kek, wrapped, nil)
	}
	for range 3 {
		k, release, err := cache.Get(ctx, "dek-1", load)
		if err != nil {
			log.Fatal(err)
		}
		_ = k // seal or open with k
		release()
	}
	s := cache.Stats()
	fmt.Printf("hits %d, misses %d, entries %d\n", s.Hits, s.Misses, s.Entries)
	// Output:
	// hits 2, misses 1, entries 1
}

func ExampleParseHeader() {
	kek, err := local.Generate("example")
	if err != nil {
		log.Fatal(err)
	}
	env, err := envelope.New(kek)
	if err != nil {
		log.Fatal(err)
	}
	defer env.Close()
	blob, err := env.Encrypt(context.Background(), []byte("hello"), nil)
	if err != nil {
		log.Fatal(err)
	}
	h, err := envelope.ParseHeader(blob)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(h.Version, h.Algorithm, h.WrappedKey.Ref(), h.WrappedKey.Version, len(h.Nonce))

	_, err = envelope.ParseHeader(blob[:len(blob)-1])
	fmt.Println(err)
	// Output:
	// 1 AES-256-GCM local:example 1 12
	// envelope: malformed envelope: truncated in ciphertext
}

func ExampleNewNonce() {
	n, err := envelope.NewNonce()
	fmt.Println(len(n), err)
	// Output:
	// 12 <nil>
}

// Parse and MarshalBinary are inverse: an envelope has one encoding.
func ExampleParse() {
	kek, err := local.Generate("example")
	if err != nil {
		log.Fatal(err)
	}
	dek, _, err := envelope.NewDataKey(context.Background(), kek, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer dek.Destroy()
	blob, err := envelope.SealWithKeyID(dek, []byte("dek-1"), []byte("hello"), nil)
	if err != nil {
		log.Fatal(err)
	}
	m, err := envelope.Parse(blob)
	if err != nil {
		log.Fatal(err)
	}
	out, err := m.MarshalBinary()
	fmt.Println(string(m.KeyID), len(m.Ciphertext), bytes.Equal(out, blob), err)
	// Output:
	// dek-1 21 true <nil>
}
