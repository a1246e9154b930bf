package bench

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/internal/vaultserver"
	"github.com/profullstack/keybroker/provider/awskms"
	"github.com/profullstack/keybroker/provider/vault"
)

// KMSRegion is the region local-kms is started in.
const KMSRegion = "eu-west-2"

// Names of the key-service contenders.
const (
	NameKBVault   = "keybroker + Vault Transit"
	NameVault     = "Vault Transit per secret"
	NameKBKMS     = "keybroker + AWS KMS (local-kms)"
	NameKMS       = "AWS KMS per secret (local-kms)"
	transitMount  = "transit"
	transitKey    = "bench"
	kmsContextKey = "secret"
)

// KeyServices are a dev-mode Vault with a transit key and a local-kms with
// a symmetric key, started for the benchmarks.
type KeyServices struct {
	vault   *vaultserver.Server
	kms     *Process
	keyARN  string
	proxies []*CountingProxy
}

// StartKeyServices starts both servers and creates their keys. The AWS SDK
// is pointed at dummy credentials through the environment.
func StartKeyServices(ctx context.Context) (_ *KeyServices, err error) {
	ks := &KeyServices{}
	defer func() {
		if err != nil {
			ks.Close()
		}
	}()
	if ks.vault, err = vaultserver.Start(ctx, vaultserver.Options{}); err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	vc := ks.vault.Root
	if err := vc.Sys().MountWithContext(ctx, transitMount, &api.MountInput{Type: "transit"}); err != nil {
		return nil, fmt.Errorf("bench: mount transit: %w", err)
	}
	if _, err := vc.Logical().WriteWithContext(ctx, transitMount+"/keys/"+transitKey, map[string]any{"type": "aes256-gcm96"}); err != nil {
		return nil, fmt.Errorf("bench: create transit key: %w", err)
	}

	dir, err := os.MkdirTemp("", "kbbench-aws-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir) // the config files named below need not exist
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID":           "AKIDKEYBROKERBENCH",
		"AWS_SECRET_ACCESS_KEY":       "keybroker-bench-secret",
		"AWS_CONFIG_FILE":             filepath.Join(dir, "config"),
		"AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "credentials"),
		"AWS_EC2_METADATA_DISABLED":   "true",
	} {
		os.Setenv(k, v)
	}
	for _, k := range []string{"AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"} {
		os.Unsetenv(k)
	}
	if ks.kms, err = StartLocalKMS(); err != nil {
		return nil, err
	}
	kc, err := kmsClient(ctx, ks.kms.Addr)
	if err != nil {
		return nil, err
	}
	// local-kms listens before it serves: retry the first request briefly.
	var out *kms.CreateKeyOutput
	for i := 0; ; i++ {
		if out, err = kc.CreateKey(ctx, &kms.CreateKeyInput{Description: aws.String("keybroker bench")}); err == nil {
			break
		}
		if i == 50 {
			return nil, fmt.Errorf("bench: local-kms CreateKey: %w", err)
		}
		if err := sleepCtx(ctx, 100); err != nil {
			return nil, err
		}
	}
	ks.keyARN = aws.ToString(out.KeyMetadata.Arn)
	return ks, nil
}

// Close stops the proxies and servers.
func (ks *KeyServices) Close() {
	for _, p := range ks.proxies {
		p.Close()
	}
	ks.vault.Stop()
	ks.kms.Stop()
}

func (ks *KeyServices) vaultClient(addr string) (*api.Client, error) {
	cfg := api.DefaultConfig()
	cfg.Address = addr
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	c.SetToken(ks.vault.Token)
	return c, nil
}

func kmsClient(ctx context.Context, endpoint string) (*kms.Client, error) {
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion(KMSRegion))
	if err != nil {
		return nil, err
	}
	return kms.NewFromConfig(cfg, func(o *kms.Options) { o.BaseEndpoint = aws.String(endpoint) }), nil
}

// Contenders returns keybroker over Vault Transit, Vault Transit per
// secret, keybroker over AWS KMS and AWS KMS per secret. With viaProxy each
// talks to its server through its own CountingProxy, and Requests reports
// what reached the server.
func (ks *KeyServices) Contenders(ctx context.Context, viaProxy bool) (out []*Contender, err error) {
	defer func() {
		if err != nil {
			for _, c := range out {
				c.Close()
			}
		}
	}()
	addr := func(target string) (string, func() int64, error) {
		if !viaProxy {
			return target, nil, nil
		}
		p, err := NewCountingProxy(target)
		if err != nil {
			return "", nil, err
		}
		ks.proxies = append(ks.proxies, p)
		return p.Addr, p.Requests, nil
	}

	a, reqs, err := addr(ks.vault.Addr)
	if err != nil {
		return out, err
	}
	vp, err := vault.New(ctx, vault.Config{Address: a, Mount: transitMount, Key: transitKey, Token: ks.vault.Token})
	if err != nil {
		return out, err
	}
	c, err := Keybroker(NameKBVault, NewCountingProvider(vp))
	if err != nil {
		vp.Close()
		return out, err
	}
	c.Requests, c.Close = reqs, chain(c.Close, func() { vp.Close() })
	out = append(out, c)

	if a, reqs, err = addr(ks.vault.Addr); err != nil {
		return out, err
	}
	vc, err := ks.vaultClient(a)
	if err != nil {
		return out, err
	}
	c = VaultPerSecret(vc)
	c.Requests = reqs
	out = append(out, c)

	if a, reqs, err = addr(ks.kms.Addr); err != nil {
		return out, err
	}
	kp, err := awskms.Open(ctx, "awskms:///"+ks.keyARN+"?region="+KMSRegion+"&endpoint="+a)
	if err != nil {
		return out, err
	}
	if c, err = Keybroker(NameKBKMS, NewCountingProvider(kp)); err != nil {
		return out, err
	}
	c.Requests = reqs
	out = append(out, c)

	if a, reqs, err = addr(ks.kms.Addr); err != nil {
		return out, err
	}
	kc, err := kmsClient(ctx, a)
	if err != nil {
		return out, err
	}
	c = KMSPerSecret(kc, ks.keyARN)
	c.Requests = reqs
	out = append(out, c)
	return out, nil
}

func chain(fs ...func()) func() {
	return func() {
		for _, f := range fs {
			f()
		}
	}
}

// VaultPerSecret encrypts every secret with one transit/encrypt request and
// decrypts it with one transit/decrypt request, binding AAD as associated
// data.
func VaultPerSecret(c *api.Client) *Contender {
	var n atomic.Int64
	aad := base64.StdEncoding.EncodeToString(AAD)
	return &Contender{
		Name: NameVault,
		Seal: func(ctx context.Context, pt []byte) ([]byte, error) {
			n.Add(1)
			s, err := c.Logical().WriteWithContext(ctx, transitMount+"/encrypt/"+transitKey, map[string]any{
				"plaintext": base64.StdEncoding.EncodeToString(pt), "associated_data": aad})
			if err != nil {
				return nil, err
			}
			ct, ok := s.Data["ciphertext"].(string)
			if !ok {
				return nil, errors.New("bench: transit/encrypt returned no ciphertext")
			}
			return []byte(ct), nil
		},
		Open: func(ctx context.Context, ct []byte) ([]byte, error) {
			n.Add(1)
			s, err := c.Logical().WriteWithContext(ctx, transitMount+"/decrypt/"+transitKey, map[string]any{
				"ciphertext": string(ct), "associated_data": aad})
			if err != nil {
				return nil, err
			}
			pt, ok := s.Data["plaintext"].(string)
			if !ok {
				return nil, errors.New("bench: transit/decrypt returned no plaintext")
			}
			return base64.StdEncoding.DecodeString(pt)
		},
		Calls: n.Load,
		Reset: func() (*Contender, error) { return VaultPerSecret(c), nil },
		Close: noClose,
	}
}

// KMSPerSecret encrypts every secret with one KMS Encrypt request (at most
// 4096 bytes of plaintext) and decrypts it with one Decrypt, binding AAD
// as encryption context.
func KMSPerSecret(c *kms.Client, keyARN string) *Contender {
	var n atomic.Int64
	ec := map[string]string{kmsContextKey: string(AAD)}
	return &Contender{
		Name: NameKMS,
		Seal: func(ctx context.Context, pt []byte) ([]byte, error) {
			n.Add(1)
			out, err := c.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(keyARN), Plaintext: pt, EncryptionContext: ec})
			if err != nil {
				return nil, err
			}
			return out.CiphertextBlob, nil
		},
		Open: func(ctx context.Context, ct []byte) ([]byte, error) {
			n.Add(1)
			out, err := c.Decrypt(ctx, &kms.DecryptInput{KeyId: aws.String(keyARN), CiphertextBlob: ct, EncryptionContext: ec})
			if err != nil {
				return nil, err
			}
			return out.Plaintext, nil
		},
		Calls: n.Load,
		Reset: func() (*Contender, error) { return KMSPerSecret(c, keyARN), nil },
		Close: noClose,
	}
}
