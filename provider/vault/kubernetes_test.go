package vault_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/provider"
	"github.com/profullstack/keybroker/provider/vault"
)

// tokenReviewer is the part of a Kubernetes API server that Vault's
// Kubernetes auth method calls: TokenReview. Like the real one, it
// authenticates a service account JWT by its signature under the
// cluster's key and its expiry, and answers with the account it names.
type tokenReviewer struct{ key *ecdsa.PrivateKey }

func (tr *tokenReviewer) mint(t *testing.T, key *ecdsa.PrivateKey, ns, sa string) string {
	t.Helper()
	enc := base64.RawURLEncoding
	claims, _ := json.Marshal(map[string]any{
		"iss": "https://kubernetes.default.svc.cluster.local", "aud": []string{"vault"},
		"iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix(),
		"sub":           "system:serviceaccount:" + ns + ":" + sa,
		"kubernetes.io": map[string]any{"namespace": ns, "serviceaccount": map[string]any{"name": sa, "uid": "uid-" + sa}},
	})
	signing := enc.EncodeToString([]byte(`{"alg":"ES256","typ":"JWT"}`)) + "." + enc.EncodeToString(claims)
	h := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, h[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + enc.EncodeToString(sig)
}

// verify returns the claims of a JWT signed by the cluster key and unexpired.
func (tr *tokenReviewer) verify(jwt string) (map[string]any, bool) {
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return nil, false
	}
	enc := base64.RawURLEncoding
	sig, err := enc.DecodeString(parts[2])
	if err != nil || len(sig) != 64 {
		return nil, false
	}
	h := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if !ecdsa.Verify(&tr.key.PublicKey, h[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
		return nil, false
	}
	body, err := enc.DecodeString(parts[1])
	var claims map[string]any
	if err != nil || json.Unmarshal(body, &claims) != nil {
		return nil, false
	}
	if exp, _ := claims["exp"].(float64); int64(exp) < time.Now().Unix() {
		return nil, false
	}
	return claims, true
}

func (tr *tokenReviewer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/apis/authentication.k8s.io/v1/tokenreviews" {
		http.NotFound(w, r)
		return
	}
	var req struct {
		Spec struct {
			Token string `json:"token"`
		} `json:"spec"`
	}
	if _, ok := tr.verify(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")); !ok {
		w.WriteHeader(http.StatusUnauthorized)
		json.NewEncoder(w).Encode(map[string]any{"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Unauthorized", "code": 401})
		return
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	status := map[string]any{"authenticated": false}
	if claims, ok := tr.verify(req.Spec.Token); ok {
		k := claims["kubernetes.io"].(map[string]any)
		sa := k["serviceaccount"].(map[string]any)
		status = map[string]any{
			"authenticated": true,
			"audiences":     claims["aud"],
			"user": map[string]any{
				"username": "system:serviceaccount:" + k["namespace"].(string) + ":" + sa["name"].(string),
				"uid":      sa["uid"],
			},
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "status": status})
}

// TestKubernetes logs in with Vault's real Kubernetes auth method, which
// asks the TokenReview endpoint above about the pod's JWT.
func TestKubernetes(t *testing.T) {
	clusterKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tr := &tokenReviewer{key: clusterKey}
	ts := httptest.NewServer(tr)
	defer ts.Close()

	mount := "k8s-" + randHex(4)
	if err := srv.Root.Sys().EnableAuthWithOptions(mount, &api.EnableAuthOptions{Type: "kubernetes"}); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Root.Logical().Write("auth/"+mount+"/config", map[string]any{"kubernetes_host": ts.URL, "disable_local_ca_jwt": true}); err != nil {
		t.Fatal(err)
	}
	key := newTransitKey(t, srv, "transit", nil)
	if _, err := srv.Root.Logical().Write("auth/"+mount+"/role/app", map[string]any{
		"bound_service_account_names": "app", "bound_service_account_namespaces": "kb",
		"audience": "vault", "token_policies": writePolicy(t, key), "token_ttl": "1h",
	}); err != nil {
		t.Fatal(err)
	}
	jwtFile := filepath.Join(t.TempDir(), "token")
	setJWT := func(jwt string) {
		if err := os.WriteFile(jwtFile, []byte(jwt), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	t.Setenv("VAULT_TOKEN", "")
	u := "vault://transit/keys/" + key + "?auth=kubernetes&role=app&auth_mount=" + mount + "&jwt_file=" + jwtFile

	setJWT(tr.mint(t, clusterKey, "kb", "app"))
	p, err := provider.Open(ctx, u)
	if err != nil {
		t.Fatalf("Open with a valid service account token: %v", err)
	}
	defer p.(io.Closer).Close()
	roundTrip(t, p)

	for name, jwt := range map[string]string{
		"token not signed by the cluster": tr.mint(t, otherKey, "kb", "app"),
		"service account not bound":       tr.mint(t, clusterKey, "kb", "intruder"),
	} {
		setJWT(jwt)
		_, err := provider.Open(ctx, u)
		if !errors.Is(err, provider.ErrAccessDenied) || strings.Contains(err.Error(), jwt) {
			t.Errorf("%s: Open: %v", name, err)
		}
		t.Logf("%s: %v", name, err)
	}

	// The file is read at every login: a rotated token is picked up.
	auth := vault.KubernetesAuth("app", jwtFile, mount)
	c, err := api.NewClient(&api.Config{Address: srv.Addr})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := auth.Login(ctx, c); err == nil {
		t.Fatal("login with the intruder's token succeeded")
	}
	setJWT(tr.mint(t, clusterKey, "kb", "app"))
	if s, err := auth.Login(ctx, c); err != nil || s.Auth == nil {
		t.Fatalf("login after the token file was rotated: %v", err)
	}
}
