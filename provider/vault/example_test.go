package vault_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log"

	"github.com/profullstack/keybroker/provider"
	_ "github.com/profullstack/keybroker/provider/vault" // registers vault://
)

// Open a Transit key by URL (address and token from VAULT_ADDR and
// VAULT_TOKEN), wrap a DEK bound to a tenant, and unwrap it.
func Example() {
	ctx := context.Background()
	kek, err := provider.Open(ctx, "vault://transit/keys/example")
	if err != nil {
		log.Fatal(err)
	}
	defer kek.(io.Closer).Close() // stops token renewal

	dek := make([]byte, 32)
	rand.Read(dek)
	wk, err := kek.Wrap(ctx, dek, []byte("tenant=42"))
	if err != nil {
		log.Fatal(err)
	}
	got, err := kek.Unwrap(ctx, wk, []byte("tenant=42"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(wk.Provider, wk.KeyID, "version", wk.Version, bytes.Equal(got, dek))

	// Another tenant's aad does not unwrap it.
	_, err = kek.Unwrap(ctx, wk, []byte("tenant=43"))
	fmt.Println(errors.Is(err, provider.ErrInvalidCiphertext))
	// Output:
	// vault transit/keys/example version 1 true
	// true
}
