package vault

import (
	"bytes"
	"net/url"
	"strings"
	"testing"
)

func TestParseCiphertext(t *testing.T) {
	v, raw, err := parseCiphertext("vault:v12:AAECAw==")
	if err != nil || v != 12 || !bytes.Equal(raw, []byte{0, 1, 2, 3}) {
		t.Fatalf("parseCiphertext = %d, %x, %v", v, raw, err)
	}
	if got := formatCiphertext(v, raw); got != "vault:v12:AAECAw==" {
		t.Fatalf("formatCiphertext = %q", got)
	}
	for _, s := range []string{
		"", "vault:", "vault:v", "vault:v1", "vault:v1:", "vault:v0:AAAA", "vault:v01:AAAA",
		"vault:v-1:AAAA", "vault:v+1:AAAA", "vault:v2147483648:AAAA", "vault:v99999999999:AAAA",
		"Vault:v1:AAAA", "vault:V1:AAAA", "vault:v1:AAECAw", "vault:v1:AAECAx==", "vault:v1:AA\nECAw==",
		"vault:v1:" + strings.Repeat("A", 12000),
	} {
		if _, _, err := parseCiphertext(s); err == nil {
			t.Errorf("parseCiphertext(%q) succeeded", s)
		}
	}
}

func TestJSONBody(t *testing.T) {
	got := string(jsonBody("plaintext", []byte("/w=="), nil))
	if got != `{"plaintext":"/w=="}` {
		t.Fatalf("jsonBody without aad = %s", got)
	}
	got = string(jsonBody("ciphertext", []byte("vault:v1:eA=="), []byte("a")))
	if got != `{"ciphertext":"vault:v1:eA==","associated_data":"YQ=="}` {
		t.Fatalf("jsonBody with aad = %s", got)
	}
}

// FuzzParseURL: any URL yields a Config or a one-line error, never a
// panic, and an error never repeats a query value.
func FuzzParseURL(f *testing.F) {
	for _, s := range []string{
		"vault://transit/keys/k", "vault://a/b/keys/k?addr=http://x:1&timeout=1s",
		"vault://t/keys/k?auth=approle&role_id=r&secret_id_file=/nonexistent",
		"vault://t/keys/k?token=SECRETVALUE", "vault://u:p@t/keys/k",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := url.Parse(s)
		if err != nil {
			return
		}
		_, err = parseURL(u)
		if err == nil {
			return
		}
		msg := err.Error()
		if strings.ContainsAny(msg, "\r\n") {
			t.Fatalf("multi-line error %q", msg)
		}
		for k, vs := range u.Query() {
			for _, v := range vs {
				if len(v) >= 6 && k != "role_id_file" && k != "secret_id_file" && k != "token_file" && k != "jwt_file" && strings.Contains(msg, v) {
					t.Fatalf("error %q repeats the value of %q", msg, k)
				}
			}
		}
	})
}
