package gcpkms_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log"

	kms "cloud.google.com/go/kms/apiv1"
	"cloud.google.com/go/kms/apiv1/kmspb"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/gcpkms"
	"github.com/profullstack/keybroker/provider/gcpkms/kmstest"
)

// In production a Provider comes from a URL and Application Default
// Credentials.
func Example_url() {
	ctx := context.Background()
	p, err := provider.Open(ctx, "gcpkms://projects/my-project/locations/europe-west1/keyRings/meshhook/cryptoKeys/kek")
	if err != nil {
		log.Fatal(err)
	}
	wk, err := p.Wrap(ctx, make([]byte, 32), []byte("project=42"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(wk.Version)
}

// Against the in-process fake Cloud KMS, with the real client library:
// wrap, rotate, and rewrap only what the primary version did not wrap.
func ExampleOpen() {
	ctx := context.Background()
	srv, err := kmstest.Start()
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()

	// Set up a key ring and key, as an operator would with gcloud.
	admin, err := kms.NewKeyManagementClient(ctx, srv.ClientOptions()...)
	if err != nil {
		log.Fatal(err)
	}
	defer admin.Close()
	const ring = "projects/demo/locations/us-east1/keyRings/meshhook"
	if _, err := admin.CreateKeyRing(ctx, &kmspb.CreateKeyRingRequest{Parent: "projects/demo/locations/us-east1", KeyRingId: "meshhook", KeyRing: &kmspb.KeyRing{}}); err != nil {
		log.Fatal(err)
	}
	if _, err := admin.CreateCryptoKey(ctx, &kmspb.CreateCryptoKeyRequest{Parent: ring, CryptoKeyId: "kek", CryptoKey: &kmspb.CryptoKey{Purpose: kmspb.CryptoKey_ENCRYPT_DECRYPT}}); err != nil {
		log.Fatal(err)
	}

	p, err := gcpkms.Open(ctx, ring+"/cryptoKeys/kek", srv.ClientOptions()...)
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()

	dek := make([]byte, 32)
	if _, err := rand.Read(dek); err != nil {
		log.Fatal(err)
	}
	aad := []byte("project=42")
	wk, err := p.Wrap(ctx, dek, aad)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("wrapped under version", wk.Version)

	same, err := p.Rewrap(ctx, wk, aad)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("rewrap before rotation keeps version", same.Version)

	v2, err := p.Rotate(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("rotated to version", v2)

	nwk, err := p.Rewrap(ctx, wk, aad)
	if err != nil {
		log.Fatal(err)
	}
	got, err := p.Unwrap(ctx, nwk, aad)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("rewrapped under version", nwk.Version, "same DEK:", bytes.Equal(got, dek))
	// Output:
	// wrapped under version 1
	// rewrap before rotation keeps version 1
	// rotated to version 2
	// rewrapped under version 2 same DEK: true
}
