package local_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// Generate a keyring, wrap a DEK under it and unwrap it again.
func ExampleGenerate() {
	ctx := context.Background()
	kek, err := local.Generate("meshhook")
	if err != nil {
		log.Fatal(err)
	}
	dek := make([]byte, 32)
	rand.Read(dek)
	aad := []byte("project=42")

	wk, err := kek.Wrap(ctx, dek, aad)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(wk.Provider, wk.KeyID, wk.Version, len(wk.Ciphertext))

	got, err := kek.Unwrap(ctx, wk, aad)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("same DEK:", bytes.Equal(got, dek))
	provider.Clear(got)

	_, err = kek.Unwrap(ctx, wk, []byte("project=43"))
	fmt.Println(err)
	// Output:
	// local meshhook 1 61
	// same DEK: true
	// provider: local: unwrap: invalid ciphertext
}

// Rotate to a new primary version; keys wrapped under the old one still
// unwrap until it is retired.
func ExampleProvider_Rotate() {
	ctx := context.Background()
	kek, err := local.Generate("meshhook")
	if err != nil {
		log.Fatal(err)
	}
	dek := make([]byte, 32)
	old, err := kek.Wrap(ctx, dek, nil)
	if err != nil {
		log.Fatal(err)
	}
	v, err := kek.Rotate(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("primary:", v)

	rewrapped, err := kek.Rewrap(ctx, old, nil)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("rewrapped to:", rewrapped.Version)

	if err := kek.Retire(ctx, "1"); err != nil {
		log.Fatal(err)
	}
	_, err = kek.Unwrap(ctx, old, nil)
	fmt.Println(err)
	// Output:
	// primary: 2
	// rewrapped to: 2
	// provider: local: unwrap: key not found: keyring meshhook version 1 is retired
}

// Open a keyring file, and the same keyring from an environment variable,
// through the provider registry.
func Example_open() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "keybroker-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	kek, err := local.Generate("meshhook")
	if err != nil {
		log.Fatal(err)
	}
	path := filepath.Join(dir, "keyring.json")
	if err := kek.Save(path); err != nil {
		log.Fatal(err)
	}

	fromFile, err := provider.Open(ctx, "local://"+path)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(fromFile.Ref())

	doc, err := os.ReadFile(path)
	if err != nil {
		log.Fatal(err)
	}
	os.Setenv("EXAMPLE_KEYRING", string(doc))
	defer os.Unsetenv("EXAMPLE_KEYRING")
	fromEnv, err := provider.Open(ctx, "local://env/EXAMPLE_KEYRING")
	if err != nil {
		log.Fatal(err)
	}
	wk, err := fromFile.Wrap(ctx, make([]byte, 32), nil)
	if err != nil {
		log.Fatal(err)
	}
	_, err = fromEnv.Unwrap(ctx, wk, nil)
	fmt.Println("env keyring unwraps file keyring's key:", err == nil)

	_, err = provider.Open(ctx, "local://env/EXAMPLE_UNSET")
	fmt.Println(err)
	// Output:
	// local:meshhook
	// env keyring unwraps file keyring's key: true
	// provider: local: open: key not found: environment variable EXAMPLE_UNSET is not set
}
