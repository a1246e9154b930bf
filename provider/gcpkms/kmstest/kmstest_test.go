package kmstest_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	kms "cloud.google.com/go/kms/apiv1"
	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/api/iterator"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	"github.com/profullstack/keybroker/provider/gcpkms/kmstest"
)

const (
	loc  = "projects/p/locations/l"
	ring = loc + "/keyRings/r"
	key  = ring + "/cryptoKeys/k"
)

func setup(t *testing.T) *kms.KeyManagementClient {
	t.Helper()
	srv, err := kmstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	ctx := context.Background()
	c, err := kms.NewKeyManagementClient(ctx, srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.CreateKeyRing(ctx, &kmspb.CreateKeyRingRequest{Parent: loc, KeyRingId: "r", KeyRing: &kmspb.KeyRing{}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateCryptoKey(ctx, &kmspb.CreateCryptoKeyRequest{Parent: ring, CryptoKeyId: "k", CryptoKey: &kmspb.CryptoKey{Purpose: kmspb.CryptoKey_ENCRYPT_DECRYPT}}); err != nil {
		t.Fatal(err)
	}
	return c
}

func wantCode(t *testing.T, what string, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: %v, want %v", what, err, code)
	}
}

func TestVersionsAndPrimary(t *testing.T) {
	c := setup(t)
	ctx := context.Background()
	v2, err := c.CreateCryptoKeyVersion(ctx, &kmspb.CreateCryptoKeyVersionRequest{Parent: key, CryptoKeyVersion: &kmspb.CryptoKeyVersion{}})
	if err != nil {
		t.Fatal(err)
	}
	if v2.Name != key+"/cryptoKeyVersions/2" || v2.State != kmspb.CryptoKeyVersion_ENABLED {
		t.Fatalf("new version = %v", v2)
	}
	// Creating a version does not make it primary; Encrypt on the key uses the primary.
	r1, err := c.Encrypt(ctx, &kmspb.EncryptRequest{Name: key, Plaintext: []byte("one")})
	if err != nil || r1.Name != key+"/cryptoKeyVersions/1" {
		t.Fatalf("Encrypt: %v, version %q", err, r1.GetName())
	}
	// Encrypt may name a version; Decrypt reports it is not the primary.
	r2, err := c.Encrypt(ctx, &kmspb.EncryptRequest{Name: v2.Name, Plaintext: []byte("two")})
	if err != nil || r2.Name != v2.Name {
		t.Fatalf("Encrypt with version 2: %v", err)
	}
	d, err := c.Decrypt(ctx, &kmspb.DecryptRequest{Name: key, Ciphertext: r2.Ciphertext})
	if err != nil || string(d.Plaintext) != "two" || d.UsedPrimary {
		t.Fatalf("Decrypt: %v, used primary %v", err, d.GetUsedPrimary())
	}
	if _, err := c.UpdateCryptoKeyPrimaryVersion(ctx, &kmspb.UpdateCryptoKeyPrimaryVersionRequest{Name: key, CryptoKeyVersionId: "2"}); err != nil {
		t.Fatal(err)
	}
	d, err = c.Decrypt(ctx, &kmspb.DecryptRequest{Name: key, Ciphertext: r2.Ciphertext})
	if err != nil || !d.UsedPrimary {
		t.Fatalf("Decrypt after primary switch: %v, used primary %v", err, d.GetUsedPrimary())
	}

	// Relabelling a ciphertext with another existing version fails.
	relabelled := append([]byte(nil), r1.Ciphertext...)
	binary.BigEndian.PutUint32(relabelled, 2)
	_, err = c.Decrypt(ctx, &kmspb.DecryptRequest{Name: key, Ciphertext: relabelled})
	wantCode(t, "Decrypt of a relabelled ciphertext", err, codes.InvalidArgument)

	// A disabled version cannot become primary or decrypt.
	if _, err := c.UpdateCryptoKeyVersion(ctx, &kmspb.UpdateCryptoKeyVersionRequest{
		CryptoKeyVersion: &kmspb.CryptoKeyVersion{Name: key + "/cryptoKeyVersions/1", State: kmspb.CryptoKeyVersion_DISABLED},
		UpdateMask:       &fieldmaskpb.FieldMask{Paths: []string{"state"}},
	}); err != nil {
		t.Fatal(err)
	}
	_, err = c.UpdateCryptoKeyPrimaryVersion(ctx, &kmspb.UpdateCryptoKeyPrimaryVersionRequest{Name: key, CryptoKeyVersionId: "1"})
	wantCode(t, "primary to a disabled version", err, codes.FailedPrecondition)
	_, err = c.Decrypt(ctx, &kmspb.DecryptRequest{Name: key, Ciphertext: r1.Ciphertext})
	wantCode(t, "Decrypt under a disabled version", err, codes.FailedPrecondition)
	_, err = c.UpdateCryptoKeyPrimaryVersion(ctx, &kmspb.UpdateCryptoKeyPrimaryVersionRequest{Name: key, CryptoKeyVersionId: "7"})
	wantCode(t, "primary to an unknown version", err, codes.NotFound)

	// Destroyed is final here: no state update, no second destroy.
	dv, err := c.DestroyCryptoKeyVersion(ctx, &kmspb.DestroyCryptoKeyVersionRequest{Name: key + "/cryptoKeyVersions/1"})
	if err != nil || dv.State != kmspb.CryptoKeyVersion_DESTROY_SCHEDULED || dv.DestroyTime == nil {
		t.Fatalf("Destroy: %v %v", err, dv)
	}
	_, err = c.DestroyCryptoKeyVersion(ctx, &kmspb.DestroyCryptoKeyVersionRequest{Name: key + "/cryptoKeyVersions/1"})
	wantCode(t, "second destroy", err, codes.FailedPrecondition)
	_, err = c.UpdateCryptoKeyVersion(ctx, &kmspb.UpdateCryptoKeyVersionRequest{
		CryptoKeyVersion: &kmspb.CryptoKeyVersion{Name: key + "/cryptoKeyVersions/1", State: kmspb.CryptoKeyVersion_ENABLED},
		UpdateMask:       &fieldmaskpb.FieldMask{Paths: []string{"state"}},
	})
	wantCode(t, "enable a destroyed version", err, codes.FailedPrecondition)
	got, err := c.GetCryptoKeyVersion(ctx, &kmspb.GetCryptoKeyVersionRequest{Name: key + "/cryptoKeyVersions/1"})
	if err != nil || got.State != kmspb.CryptoKeyVersion_DESTROY_SCHEDULED {
		t.Fatalf("GetCryptoKeyVersion: %v %v", err, got)
	}
}

func TestResourceErrors(t *testing.T) {
	c := setup(t)
	ctx := context.Background()
	_, err := c.CreateKeyRing(ctx, &kmspb.CreateKeyRingRequest{Parent: loc, KeyRingId: "r", KeyRing: &kmspb.KeyRing{}})
	wantCode(t, "duplicate key ring", err, codes.AlreadyExists)
	_, err = c.CreateCryptoKey(ctx, &kmspb.CreateCryptoKeyRequest{Parent: ring, CryptoKeyId: "k", CryptoKey: &kmspb.CryptoKey{Purpose: kmspb.CryptoKey_ENCRYPT_DECRYPT}})
	wantCode(t, "duplicate key", err, codes.AlreadyExists)
	_, err = c.CreateCryptoKey(ctx, &kmspb.CreateCryptoKeyRequest{Parent: loc + "/keyRings/none", CryptoKeyId: "k", CryptoKey: &kmspb.CryptoKey{Purpose: kmspb.CryptoKey_ENCRYPT_DECRYPT}})
	wantCode(t, "key in a missing ring", err, codes.NotFound)
	_, err = c.CreateCryptoKey(ctx, &kmspb.CreateCryptoKeyRequest{Parent: ring, CryptoKeyId: "hsm", CryptoKey: &kmspb.CryptoKey{
		Purpose:         kmspb.CryptoKey_ENCRYPT_DECRYPT,
		VersionTemplate: &kmspb.CryptoKeyVersionTemplate{ProtectionLevel: kmspb.ProtectionLevel_HSM},
	}})
	wantCode(t, "HSM key", err, codes.InvalidArgument)
	_, err = c.GetCryptoKey(ctx, &kmspb.GetCryptoKeyRequest{Name: ring + "/cryptoKeys/none"})
	wantCode(t, "unknown key", err, codes.NotFound)
	_, err = c.GetCryptoKey(ctx, &kmspb.GetCryptoKeyRequest{Name: "projects/p/keys/k"})
	wantCode(t, "malformed key name", err, codes.InvalidArgument)
	_, err = c.Decrypt(ctx, &kmspb.DecryptRequest{Name: key + "/cryptoKeyVersions/1", Ciphertext: []byte("x")})
	wantCode(t, "Decrypt naming a version", err, codes.InvalidArgument)
	it := c.ListKeyRings(ctx, &kmspb.ListKeyRingsRequest{Parent: loc})
	_, err = it.Next()
	wantCode(t, "ListKeyRings", err, codes.Unimplemented)
}

func TestListCryptoKeyVersionsPages(t *testing.T) {
	c := setup(t)
	ctx := context.Background()
	const n = 250 // more than two default pages
	for range n - 1 {
		if _, err := c.CreateCryptoKeyVersion(ctx, &kmspb.CreateCryptoKeyVersionRequest{Parent: key, CryptoKeyVersion: &kmspb.CryptoKeyVersion{}}); err != nil {
			t.Fatal(err)
		}
	}
	it := c.ListCryptoKeyVersions(ctx, &kmspb.ListCryptoKeyVersionsRequest{Parent: key})
	for i := 1; ; i++ {
		v, err := it.Next()
		if errors.Is(err, iterator.Done) {
			if i != n+1 {
				t.Fatalf("listed %d versions, want %d", i-1, n)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("%s/cryptoKeyVersions/%d", key, i); v.Name != want {
			t.Fatalf("version %d is %q, want %q", i, v.Name, want)
		}
	}
	resp, err := c.ListCryptoKeyVersions(ctx, &kmspb.ListCryptoKeyVersionsRequest{Parent: key, PageSize: 7}).Next()
	if err != nil || resp.Name != key+"/cryptoKeyVersions/1" {
		t.Fatalf("first of a 7-version page: %v %v", resp, err)
	}
	_, err = c.ListCryptoKeyVersions(ctx, &kmspb.ListCryptoKeyVersionsRequest{Parent: key, Filter: "state=ENABLED"}).Next()
	wantCode(t, "List with a filter", err, codes.InvalidArgument)
	_, err = c.ListCryptoKeyVersions(ctx, &kmspb.ListCryptoKeyVersionsRequest{Parent: key, PageToken: "x"}).Next()
	wantCode(t, "List with a bad page token", err, codes.InvalidArgument)
}

// NewKey makes the key ring once and a usable key each call; a bad id is an
// error, not a panic.
func TestNewKey(t *testing.T) {
	srv, err := kmstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	a, err := srv.NewKey("ring", "a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := srv.NewKey("ring", "b") // same ring again
	if err != nil {
		t.Fatal(err)
	}
	if want := "projects/kmstest/locations/global/keyRings/ring/cryptoKeys/a"; a != want || b == a {
		t.Fatalf("names %q, %q; want %q and another", a, b, want)
	}
	ctx := context.Background()
	c, err := kms.NewKeyManagementClient(ctx, srv.ClientOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Encrypt(ctx, &kmspb.EncryptRequest{Name: b, Plaintext: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.NewKey("ring", "a"); status.Code(errors.Unwrap(err)) != codes.AlreadyExists {
		t.Fatalf("second key a: %v", err)
	}
	if _, err := srv.NewKey("bad ring", "a"); status.Code(errors.Unwrap(err)) != codes.InvalidArgument {
		t.Fatalf("bad ring: %v", err)
	}
}
