package kmstest_test

import (
	"context"
	"fmt"
	"log"

	kms "cloud.google.com/go/kms/apiv1"
	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/profullstack/keybroker/provider/gcpkms/kmstest"
)

// The real client library talks to the fake server; an interceptor injects
// a fault into one RPC.
func Example() {
	ctx := context.Background()
	srv, err := kmstest.Start()
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	client, err := kms.NewKeyManagementClient(ctx, srv.ClientOptions()...)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	if _, err := client.CreateKeyRing(ctx, &kmspb.CreateKeyRingRequest{Parent: "projects/p/locations/l", KeyRingId: "r", KeyRing: &kmspb.KeyRing{}}); err != nil {
		log.Fatal(err)
	}
	key, err := client.CreateCryptoKey(ctx, &kmspb.CreateCryptoKeyRequest{
		Parent:      "projects/p/locations/l/keyRings/r",
		CryptoKeyId: "k",
		CryptoKey:   &kmspb.CryptoKey{Purpose: kmspb.CryptoKey_ENCRYPT_DECRYPT},
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("primary:", key.Primary.Name)

	srv.SetInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if info.FullMethod == "/google.cloud.kms.v1.KeyManagementService/Encrypt" {
			return nil, status.Error(codes.PermissionDenied, "injected")
		}
		return h(ctx, req)
	})
	_, err = client.Encrypt(ctx, &kmspb.EncryptRequest{Name: key.Name, Plaintext: []byte("hello")})
	fmt.Println("encrypt:", status.Code(err))
	// Output:
	// primary: projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1
	// encrypt: PermissionDenied
}
