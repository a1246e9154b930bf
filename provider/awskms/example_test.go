package awskms_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log"

	"github.com/profullstack/keybroker/provider"
	_ "github.com/profullstack/keybroker/provider/awskms" // registers awskms://
)

// Open a KMS key by alias, wrap a data key bound to a tenant, and unwrap it.
// In production the URL is just "awskms://alias/meshhook?region=eu-west-1";
// here endpoint points at the test's local-kms server.
func Example() {
	ctx := context.Background()
	p, err := provider.Open(ctx, "awskms://alias/keybroker-example?region=eu-west-2&endpoint="+endpoint)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("key:", p.Ref().KeyID == seededARN) // the alias resolved to the key ARN

	dek := make([]byte, 32)
	rand.Read(dek)
	wk, err := p.Wrap(ctx, dek, []byte("tenant=42"))
	if err != nil {
		log.Fatal(err)
	}
	got, err := p.Unwrap(ctx, wk, []byte("tenant=42"))
	if err != nil {
		log.Fatal(err)
	}
	defer provider.Clear(got)
	fmt.Println("round trip:", bytes.Equal(got, dek))

	_, err = p.Unwrap(ctx, wk, []byte("tenant=43"))
	fmt.Println("other tenant refused:", errors.Is(err, provider.ErrInvalidCiphertext))
	// Output:
	// key: true
	// round trip: true
	// other tenant refused: true
}
