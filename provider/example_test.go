package provider_test

import (
	"context"
	"fmt"
	"log"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

// A deployment moving from one KEK to another wraps with the new one and
// keeps the old one for unwrapping until every data key is rewrapped.
func ExampleKeyring() {
	ctx := context.Background()
	oldKEK, err := local.Generate("old")
	if err != nil {
		log.Fatal(err)
	}
	newKEK, err := local.Generate("new")
	if err != nil {
		log.Fatal(err)
	}
	dek := make([]byte, 32)
	wk, err := oldKEK.Wrap(ctx, dek, []byte("project=42"))
	if err != nil {
		log.Fatal(err)
	}

	kr, err := provider.NewKeyring(newKEK, oldKEK)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("needs rewrap:", kr.NeedsRewrap(wk, ""))
	moved, err := kr.Rewrap(ctx, wk, []byte("project=42"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("now wrapped by:", moved.Ref())
	// Output:
	// needs rewrap: true
	// now wrapped by: local:new
}

func ExampleOpen() {
	_, err := provider.Open(context.Background(), "nosuch://key?token=secret")
	fmt.Println(err)
	// Output:
	// provider: unknown scheme "nosuch" (registered: local)
}
