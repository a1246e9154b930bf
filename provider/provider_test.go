package provider_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/local"
)

func mustGenerate(t *testing.T, id string) *local.Provider {
	t.Helper()
	p, err := local.Generate(id)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestOpenErrorsNeverEchoTheURL(t *testing.T) {
	const secret = "s3cr3t-token-value"
	for _, c := range []struct{ url, want string }{
		{"", "empty provider URL"},
		{"   ", "empty provider URL"},
		{"no-scheme-" + secret, "want scheme://location"},
		{"://" + secret, "want scheme://location"},
		{"Bad_Scheme://" + secret, "invalid scheme"},
		{"nosuch://host/" + secret + "?token=" + secret, `unknown scheme "nosuch"`},
		{"local://%zz" + secret, "malformed local URL"},
	} {
		_, err := provider.Open(context.Background(), c.url)
		if err == nil {
			t.Errorf("Open(%q) succeeded", c.url)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, c.want) {
			t.Errorf("Open(%q) = %q, want it to mention %q", c.url, msg, c.want)
		}
		if strings.Contains(msg, secret) || strings.ContainsAny(msg, "\n\r") {
			t.Errorf("Open(%q) error echoes the URL or spans lines: %q", c.url, msg)
		}
	}
	_, err := provider.Open(context.Background(), "nosuch://x")
	if !errors.Is(err, provider.ErrUnknownScheme) {
		t.Errorf("unknown scheme: got %v, want ErrUnknownScheme", err)
	}
	if !strings.Contains(err.Error(), "local") {
		t.Errorf("unknown scheme error should list the registered schemes: %q", err)
	}
}

func TestRegisterRejectsMisuse(t *testing.T) {
	open := func(context.Context, *url.URL) (provider.KEKProvider, error) { return nil, nil }
	for name, f := range map[string]func(){
		"duplicate": func() { provider.Register("local", open) },
		"malformed": func() { provider.Register("Not A Scheme", open) },
		"nil":       func() { provider.Register("fresh-scheme", nil) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Register %s: no panic", name)
				}
			}()
			f()
		}()
	}
	if got := provider.Schemes(); len(got) == 0 || got[0] != "local" {
		t.Errorf("Schemes() = %v, want [local]", got)
	}
}

func TestRedact(t *testing.T) {
	u, err := url.Parse("vault://user:pw@transit/keys/k?token=abc&addr=http://x")
	if err != nil {
		t.Fatal(err)
	}
	got := provider.Redact(u)
	for _, leak := range []string{"pw", "abc", "user:"} {
		if strings.Contains(got, leak) {
			t.Errorf("Redact = %q still contains %q", got, leak)
		}
	}
	if !strings.HasPrefix(got, "vault://") || !strings.Contains(got, "/keys/k") || !strings.Contains(got, "token=REDACTED") {
		t.Errorf("Redact = %q, want scheme, path and redacted query kept", got)
	}
}

func TestErrorKindsAndCause(t *testing.T) {
	native := fmt.Errorf("sdk said no\n  request id: 7")
	err := error(&provider.Error{Provider: "vault", Op: "unwrap", Kind: provider.ErrAccessDenied, Err: native})
	if !errors.Is(err, provider.ErrAccessDenied) || errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("errors.Is by kind is wrong for %v", err)
	}
	if !errors.Is(err, native) {
		t.Fatal("native cause is not reachable")
	}
	var pe *provider.Error
	if !errors.As(fmt.Errorf("wrapped: %w", err), &pe) || pe.Op != "unwrap" {
		t.Fatal("errors.As does not reach *provider.Error")
	}
	if got, want := err.Error(), "provider: vault: unwrap: access denied: sdk said no request id: 7"; got != want {
		t.Fatalf("Error() = %q, want %q (one line)", got, want)
	}
	if provider.IsRetryable(err) {
		t.Fatal("access denied reported retryable")
	}
	if !provider.IsRetryable(&provider.Error{Kind: provider.ErrUnavailable}) {
		t.Fatal("unavailable not reported retryable")
	}
	if provider.IsRetryable(context.Canceled) {
		t.Fatal("context.Canceled reported retryable")
	}
}

func TestWrappedKeyValidate(t *testing.T) {
	ok := provider.WrappedKey{Provider: "local", KeyID: "k", Version: "1", Ciphertext: []byte{1}}
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid key rejected: %v", err)
	}
	for name, mut := range map[string]func(*provider.WrappedKey){
		"no provider":      func(w *provider.WrappedKey) { w.Provider = "" },
		"long provider":    func(w *provider.WrappedKey) { w.Provider = strings.Repeat("p", provider.MaxProviderLen+1) },
		"no key id":        func(w *provider.WrappedKey) { w.KeyID = "" },
		"long key id":      func(w *provider.WrappedKey) { w.KeyID = strings.Repeat("k", provider.MaxKeyIDLen+1) },
		"long version":     func(w *provider.WrappedKey) { w.Version = strings.Repeat("9", provider.MaxVersionLen+1) },
		"empty ciphertext": func(w *provider.WrappedKey) { w.Ciphertext = nil },
		"oversized cipher": func(w *provider.WrappedKey) { w.Ciphertext = make([]byte, provider.MaxCiphertextLen+1) },
	} {
		w := ok.Clone()
		mut(w)
		if err := w.Validate(); err == nil {
			t.Errorf("%s: Validate accepted it", name)
		}
	}
	var nilKey *provider.WrappedKey
	if nilKey.Validate() == nil {
		t.Error("nil wrapped key accepted")
	}
	c := ok.Clone()
	c.Ciphertext[0] = 9
	if ok.Ciphertext[0] != 1 {
		t.Error("Clone shares the ciphertext")
	}
}

func TestKeyringRoutesByRef(t *testing.T) {
	ctx := context.Background()
	oldKEK, newKEK, stranger := mustGenerate(t, "old"), mustGenerate(t, "new"), mustGenerate(t, "stranger")
	dek := bytes.Repeat([]byte{7}, 32)
	aad := []byte("project=1")

	wkOld, err := oldKEK.Wrap(ctx, dek, aad)
	if err != nil {
		t.Fatal(err)
	}
	kr, err := provider.NewKeyring(newKEK, oldKEK)
	if err != nil {
		t.Fatal(err)
	}
	if kr.Ref() != newKEK.Ref() || kr.Primary() != provider.KEKProvider(newKEK) || len(kr.Providers()) != 2 {
		t.Fatal("keyring does not report its primary and providers")
	}

	// Wrap goes to the primary.
	wkNew, err := kr.Wrap(ctx, dek, aad)
	if err != nil || wkNew.Ref() != newKEK.Ref() {
		t.Fatalf("Wrap via keyring: %v, ref %v", err, wkNew.Ref())
	}
	// Unwrap is routed to whichever provider the key names.
	for _, wk := range []*provider.WrappedKey{wkOld, wkNew} {
		got, err := kr.Unwrap(ctx, wk, aad)
		if err != nil || !bytes.Equal(got, dek) {
			t.Fatalf("Unwrap of %v via keyring: %v", wk.Ref(), err)
		}
	}
	// A key no provider serves.
	wkStranger, _ := stranger.Wrap(ctx, dek, aad)
	if _, err := kr.Unwrap(ctx, wkStranger, aad); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("unknown key: got %v, want ErrKeyNotFound", err)
	}
	if _, err := kr.Unwrap(ctx, nil, aad); !errors.Is(err, provider.ErrInvalidCiphertext) {
		t.Fatalf("nil key: got %v, want ErrInvalidCiphertext", err)
	}

	// NeedsRewrap and Rewrap move a key from the decrypt-only provider to the primary.
	if !kr.NeedsRewrap(wkOld, "1") || kr.NeedsRewrap(wkNew, "1") || !kr.NeedsRewrap(wkNew, "2") || kr.NeedsRewrap(wkNew, "") {
		t.Fatal("NeedsRewrap is wrong")
	}
	moved, err := kr.Rewrap(ctx, wkOld, aad)
	if err != nil || moved.Ref() != newKEK.Ref() {
		t.Fatalf("Rewrap across providers: %v", err)
	}
	if got, err := newKEK.Unwrap(ctx, moved, aad); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("rewrapped key does not unwrap under the primary alone: %v", err)
	}
	if _, err := kr.Rewrap(ctx, wkOld, []byte("other")); !errors.Is(err, provider.ErrInvalidCiphertext) {
		t.Fatalf("Rewrap with the wrong aad: got %v", err)
	}

	// Same-provider rewrap after rotation uses the key service's own Rewrap.
	v2, err := newKEK.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	again, err := kr.Rewrap(ctx, moved, aad)
	if err != nil || again.Version != v2 {
		t.Fatalf("Rewrap after rotation: %v, version %q want %q", err, again.Version, v2)
	}
}

func TestNewKeyringRejectsAmbiguity(t *testing.T) {
	a := mustGenerate(t, "same")
	b := mustGenerate(t, "same")
	if _, err := provider.NewKeyring(a, b); err == nil || !strings.Contains(err.Error(), "two providers") {
		t.Fatalf("duplicate refs: got %v", err)
	}
	if _, err := provider.NewKeyring(nil); err == nil {
		t.Fatal("nil primary accepted")
	}
	if _, err := provider.NewKeyring(a, nil); err == nil {
		t.Fatal("nil decrypt-only provider accepted")
	}
}

func TestCheckDEK(t *testing.T) {
	for _, n := range []int{0, provider.MinDEKLen - 1, provider.MaxDEKLen + 1} {
		if err := provider.CheckDEK("x", make([]byte, n)); err == nil {
			t.Errorf("CheckDEK accepted %d bytes", n)
		}
	}
	for _, n := range []int{provider.MinDEKLen, 32, provider.MaxDEKLen} {
		if err := provider.CheckDEK("x", make([]byte, n)); err != nil {
			t.Errorf("CheckDEK rejected %d bytes: %v", n, err)
		}
	}
}

func TestParamName(t *testing.T) {
	for name, want := range map[string]string{
		"region":                     `"region"`,
		"max_attempts":               `"max_attempts"`,
		"hvs.CAESIJ4xq":              "(name not shown)",
		"AKIAIOSFODNN7EXAMPLE":       "(name not shown)",
		"wJalrXUtnFEMI/K7MDENG":      "(name not shown)",
		"averyveryverylongtokenlike": "(name not shown)",
		"":                           "(name not shown)",
	} {
		if got := provider.ParamName(name); got != want {
			t.Errorf("ParamName(%q) = %s, want %s", name, got, want)
		}
	}
}
