package e2e

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	kms "cloud.google.com/go/kms/apiv1"
	"cloud.google.com/go/kms/apiv1/kmspb"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/awskms"
	"github.com/profullstack/keybroker/provider/gcpkms"
	"github.com/profullstack/keybroker/provider/gcpkms/kmstest"
	"github.com/profullstack/keybroker/provider/local"
	"github.com/profullstack/keybroker/provider/vault"
)

// env is the servers the scenarios share: one PostgreSQL (each scenario in its own schema),
// one Vault, one local-kms and one in-process Cloud KMS server. Scenarios that stop or pause
// a server start their own.
type env struct {
	pg    *pgServer
	vault *vaultServer
	kms   *kmsServer
	gcp   *kms.KeyManagementClient
	seq   atomic.Int64
}

const gcpRing = "projects/keybroker-e2e/locations/us-east1/keyRings/e2e"

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{pg: startPostgres(t), vault: startVault(t), kms: startLocalKMS(t)}
	srv, err := kmstest.Start()
	if err != nil {
		t.Fatalf("e2e: start Cloud KMS test server: %v", err)
	}
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if e.gcp, err = kms.NewKeyManagementClient(ctx, srv.ClientOptions()...); err != nil {
		t.Fatalf("e2e: Cloud KMS client: %v", err)
	}
	t.Cleanup(func() { e.gcp.Close() })
	parent, id, _ := strings.Cut(gcpRing, "/keyRings/")
	if _, err := e.gcp.CreateKeyRing(ctx, &kmspb.CreateKeyRingRequest{Parent: parent, KeyRingId: id, KeyRing: &kmspb.KeyRing{}}); err != nil {
		t.Fatalf("e2e: create key ring: %v", err)
	}
	return e
}

// name returns a name unique in the env, for keys and schemas.
func (e *env) name(prefix string) string {
	return fmt.Sprintf("%s_%d", prefix, e.seq.Add(1))
}

// backend makes fresh KEKs in one key service.
type backend struct {
	name   string
	newKEK func(t *testing.T) provider.KEKProvider
}

// backends are the four key services every scenario runs on.
func (e *env) backends() []backend {
	return []backend{
		{"local", func(t *testing.T) provider.KEKProvider { return newLocalKEK(t, e.name("local")) }},
		{"vault", func(t *testing.T) provider.KEKProvider { return newVaultKEK(t, e.vault, e.name("vault")) }},
		{"awskms", func(t *testing.T) provider.KEKProvider { return newAWSKEK(t, e.kms) }},
		{"gcpkms", func(t *testing.T) provider.KEKProvider { return e.newGCPKEK(t) }},
	}
}

func newLocalKEK(t *testing.T, id string) provider.KEKProvider {
	t.Helper()
	p, err := local.Generate(id)
	if err != nil {
		t.Fatalf("e2e: local KEK: %v", err)
	}
	return p
}

// newVaultKEK creates a transit key and opens a provider on it.
func newVaultKEK(t *testing.T, v *vaultServer, key string) *vault.Provider {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := v.client(t, v.Token).Logical().WriteWithContext(ctx, "transit/keys/"+key, map[string]any{"type": "aes256-gcm96"}); err != nil {
		t.Fatalf("e2e: create transit key: %v", err)
	}
	p, err := vault.New(ctx, vault.Config{Address: v.Addr, Mount: "transit", Key: key, Token: v.Token, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("e2e: vault provider: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// newAWSKEK creates a key in local-kms and opens a provider on it by its ARN.
func newAWSKEK(t *testing.T, k *kmsServer) provider.KEKProvider {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var created struct{ KeyMetadata struct{ Arn string } }
	kmsCall(ctx, t, k, "CreateKey", map[string]any{"Description": "keybroker e2e " + t.Name()}, &created)
	q := url.Values{"region": {k.Region}, "endpoint": {k.Endpoint}}
	p, err := awskms.Open(ctx, "awskms:///"+created.KeyMetadata.Arn+"?"+q.Encode())
	if err != nil {
		t.Fatalf("e2e: awskms provider: %v", err)
	}
	return p
}

// newGCPKEK creates a CryptoKey on the in-process server.
func (e *env) newGCPKEK(t *testing.T) provider.KEKProvider {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	k, err := e.gcp.CreateCryptoKey(ctx, &kmspb.CreateCryptoKeyRequest{
		Parent: gcpRing, CryptoKeyId: e.name("key"),
		CryptoKey: &kmspb.CryptoKey{Purpose: kmspb.CryptoKey_ENCRYPT_DECRYPT},
	})
	if err != nil {
		t.Fatalf("e2e: create CryptoKey: %v", err)
	}
	p, err := gcpkms.New(e.gcp, k.Name)
	if err != nil {
		t.Fatalf("e2e: gcpkms provider: %v", err)
	}
	return p
}
