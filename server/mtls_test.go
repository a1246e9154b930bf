package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// testPKI is a CA, a server certificate for 127.0.0.1 and client
// certificates, all made here with crypto/x509.
type testPKI struct {
	t      *testing.T
	dir    string
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
	serial int64
}

func newPKI(t *testing.T) *testPKI {
	t.Helper()
	p := &testPKI{t: t, dir: t.TempDir()}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	p.caCert, _ = x509.ParseCertificate(der)
	p.caKey = key
	p.serial = 1
	p.write("ca.crt", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	return p
}

func (p *testPKI) write(name string, data []byte) string {
	p.t.Helper()
	f := filepath.Join(p.dir, name)
	if err := os.WriteFile(f, data, 0o600); err != nil {
		p.t.Fatal(err)
	}
	return f
}

// leaf issues a certificate signed by the CA; server certificates get the
// loopback address. It returns the PEM certificate file, the key pair and
// the parsed certificate.
func (p *testPKI) leaf(cn string, server bool) (certFile, keyFile string, pair tls.Certificate, cert *x509.Certificate) {
	p.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		p.t.Fatal(err)
	}
	p.serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.serial), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		p.t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		p.t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	certFile, keyFile = p.write(cn+".crt", certPEM), p.write(cn+".key", keyPEM)
	if pair, err = tls.X509KeyPair(certPEM, keyPEM); err != nil {
		p.t.Fatal(err)
	}
	cert, _ = x509.ParseCertificate(der)
	return certFile, keyFile, pair, cert
}

// serveTLS serves h with TLS (and mTLS when clientCA) on a loopback port
// until the test ends, and returns its URL.
func serveTLS(t *testing.T, h http.Handler, opts Options) string {
	t.Helper()
	return "https://" + serveOn(t, h, opts)
}

// A token bound to a client certificate is accepted only on a connection
// whose verified leaf is that certificate; every other way of presenting
// it gets exactly the 401 of a bad token. An unbound token works with any
// certificate the CA signed.
func TestTokenBoundToClientCert(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, nil)
	pki := newPKI(t)
	srvCrt, srvKey, _, _ := pki.leaf("server", true)
	aliceFile, _, alice, aliceCert := pki.leaf("alice", false)
	_, _, bob, _ := pki.leaf("bob", false)
	caFile := filepath.Join(pki.dir, "ca.crt")
	roots := x509.NewCertPool()
	roots.AddCert(pki.caCert)

	alicePEM, err := os.ReadFile(aliceFile)
	if err != nil {
		t.Fatal(err)
	}
	fp, err := ClientCertFingerprint(alicePEM)
	if err != nil {
		t.Fatal(err)
	}
	if want := sha256.Sum256(aliceCert.Raw); !bytes.Equal(fp, want[:]) {
		t.Fatalf("fingerprint %x, want SHA-256 of the DER %x", fp, want)
	}
	bound, boundInfo, err := e.tokens.Create(ctx, TokenSpec{Name: "alice-svc", Ops: []Op{OpRead, OpWrite}, TTL: time.Hour, ClientCertSHA256: fp})
	if err != nil {
		t.Fatal(err)
	}
	if want := hex.EncodeToString(fp)[:ClientCertPrefixLen]; boundInfo.ClientCertPrefix != want {
		t.Fatalf("Create: prefix %q, want %q", boundInfo.ClientCertPrefix, want)
	}
	unbound := e.token(nil, OpRead, OpWrite)

	mtls := serveTLS(t, e.srv, Options{CertFile: srvCrt, KeyFile: srvKey, ClientCAFile: caFile})
	tlsOnly := serveTLS(t, e.srv, Options{CertFile: srvCrt, KeyFile: srvKey})
	do := func(url string, cert *tls.Certificate, method, path, token, body string) (int, string, error) {
		t.Helper()
		cfg := &tls.Config{RootCAs: roots}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{*cert}
		}
		// A client per call: no connection (and no certificate) is reused
		// across cases.
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}}
		req, err := http.NewRequest(method, url+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := c.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		raw, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(raw), err
	}
	want := func(what string, code int, body string, err error, status int) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if code != status {
			t.Fatalf("%s: %d %s, want %d", what, code, body, status)
		}
	}

	// The 401 every bad token gets, for comparison.
	badCode, badBody, err := do(mtls, &alice, "GET", "/v1/projects/p/secrets/s", "kbt_"+strings.Repeat("A", 64), "")
	want("bad token", badCode, badBody, err, http.StatusUnauthorized)

	code, body, err := do(mtls, &alice, "PUT", "/v1/projects/p/secrets/s", bound, `{"value":"dmFsdWU="}`)
	want("bound token, its certificate: put", code, body, err, http.StatusNoContent)
	code, body, err = do(mtls, &alice, "GET", "/v1/projects/p/secrets/s", bound, "")
	want("bound token, its certificate: get", code, body, err, http.StatusOK)
	if !strings.Contains(body, `"dmFsdWU="`) {
		t.Fatalf("get: %s", body)
	}

	refused := []struct {
		what string
		url  string
		cert *tls.Certificate
	}{
		{"bound token, another certificate the CA signed", mtls, &bob},
		{"bound token, TLS without a client CA (certificate not asked for)", tlsOnly, &alice},
		{"bound token, TLS without a certificate", tlsOnly, nil},
		{"bound token, plain HTTP", e.http.URL, nil},
	}
	var logged int
	if err := e.tokens.pool.QueryRow(ctx, `SELECT count(*) FROM keybroker.access_log`).Scan(&logged); err != nil {
		t.Fatal(err)
	}
	for _, c := range refused {
		var (
			code int
			body string
			err  error
		)
		if strings.HasPrefix(c.url, "http://") {
			var raw []byte
			code, raw = e.do("GET", "/v1/projects/p/secrets/s", bound, nil)
			body = string(raw)
		} else {
			code, body, err = do(c.url, c.cert, "GET", "/v1/projects/p/secrets/s", bound, "")
		}
		want(c.what, code, body, err, http.StatusUnauthorized)
		if body != badBody {
			t.Fatalf("%s: body %q, want the bad token's %q", c.what, body, badBody)
		}
	}
	// 401s are not logged (anyone could fill the table): the refusals
	// above added no row.
	var after int
	if err := e.tokens.pool.QueryRow(ctx, `SELECT count(*) FROM keybroker.access_log`).Scan(&after); err != nil {
		t.Fatal(err)
	}
	if after != logged {
		t.Fatalf("access_log grew from %d to %d rows on 401s", logged, after)
	}

	for name, cert := range map[string]*tls.Certificate{"alice": &alice, "bob": &bob} {
		code, body, err := do(mtls, cert, "GET", "/v1/projects/p/secrets/s", unbound, "")
		want("unbound token, "+name+"'s certificate", code, body, err, http.StatusOK)
	}
	code, body, err = do(tlsOnly, nil, "GET", "/v1/projects/p/secrets/s", unbound, "")
	want("unbound token, TLS without mTLS", code, body, err, http.StatusOK)

	// With a client CA, no certificate: the handshake is refused, before
	// any token is looked at.
	if _, _, err := do(mtls, nil, "GET", "/v1/projects/p/secrets/s", unbound, ""); err == nil {
		t.Fatal("mTLS without a client certificate: served")
	} else if !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("mTLS without a client certificate: %v, want a TLS certificate error", err)
	}

	// The audit rows of the bound token's accepted requests name it.
	var n int
	if err := e.tokens.pool.QueryRow(ctx, `SELECT count(*) FROM keybroker.access_log l
JOIN keybroker.service_tokens t ON t.id = l.token_id
WHERE t.client_cert_sha256 = $1 AND l.outcome = 'ok'`, fp).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Fatalf("%d ok access_log rows for the bound token, want 2 (put, get)", n)
	}

	list, err := e.tokens.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	prefixes := map[string]string{}
	for _, i := range list {
		prefixes[i.ID] = i.ClientCertPrefix
	}
	if prefixes[boundInfo.ID] != boundInfo.ClientCertPrefix || len(prefixes) != 2 {
		t.Fatalf("List: %v, want %s bound to %s and one unbound", prefixes, boundInfo.ID, boundInfo.ClientCertPrefix)
	}
}

func TestClientCertFingerprintRefuses(t *testing.T) {
	pki := newPKI(t)
	certFile, keyFile, _, _ := pki.leaf("c", false)
	certPEM, _ := os.ReadFile(certFile)
	keyPEM, _ := os.ReadFile(keyFile)
	caPEM, _ := os.ReadFile(filepath.Join(pki.dir, "ca.crt"))
	for name, data := range map[string][]byte{
		"empty":       nil,
		"not PEM":     []byte("hello"),
		"a key":       keyPEM,
		"a chain":     append(append([]byte{}, certPEM...), caPEM...),
		"bad DER":     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("not DER")}),
		"cert + junk": append(append([]byte{}, certPEM...), keyPEM...),
	} {
		if _, err := ClientCertFingerprint(data); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: %v, want ErrInvalidArgument", name, err)
		} else if strings.Contains(err.Error(), "\n") || !strings.HasPrefix(err.Error(), "server: ") {
			t.Errorf("%s: error %q: want one line starting with the package name", name, err)
		}
	}
	e := newEnv(t, nil)
	_, _, err := e.tokens.Create(context.Background(), TokenSpec{Name: "x", Ops: []Op{OpRead}, TTL: time.Hour, ClientCertSHA256: make([]byte, 20)})
	if !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("20-byte fingerprint: %v, want ErrInvalidArgument", err)
	}
}

// BenchmarkAuthenticateBinding measures authenticate (rows cached, so no
// database) for each way a token and a connection's certificate can meet:
// a bound token refused for want of its certificate should cost what a
// wrong secret costs on the same connection.
func BenchmarkAuthenticateBinding(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b, func(c *Config) { c.TokenRecheck = time.Hour; c.Rate = 1e12; c.Burst = 1 << 30 })
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	mk := func(cn string) *x509.Certificate {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			b.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return c
	}
	alice, bob := mk("alice"), mk("bob")
	fp := sha256.Sum256(alice.Raw)
	bound, _, err := e.tokens.Create(ctx, TokenSpec{Name: "b", Ops: []Op{OpRead}, TTL: time.Hour, ClientCertSHA256: fp[:]})
	if err != nil {
		b.Fatal(err)
	}
	unbound := e.token(nil, OpRead)
	wrong := unbound[:len(unbound)-2] + map[bool]string{true: "AA", false: "AB"}[unbound[len(unbound)-2:] != "AA"]
	conn := func(c *x509.Certificate) *tls.ConnectionState {
		if c == nil {
			return nil
		}
		return &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{c}}}
	}
	cases := []struct {
		name string
		tok  string
		cert *x509.Certificate
		want authResult
	}{
		{"wrong-secret/alice", wrong, alice, authBad},
		{"bound/bob", bound, bob, authBad},
		{"wrong-secret/none", wrong, nil, authBad},
		{"bound/none", bound, nil, authBad},
		{"bound/alice", bound, alice, authOK},
		{"unbound/alice", unbound, alice, authOK},
	}
	for _, c := range cases {
		r, _ := http.NewRequest("GET", "/", nil)
		r.Header.Set("Authorization", "Bearer "+c.tok)
		r.TLS = conn(c.cert)
		if _, res := e.srv.auth.authenticate(ctx, r); res != c.want { // also fills the cache
			b.Fatalf("%s: %v, want %v", c.name, res, c.want)
		}
		b.Run(c.name, func(b *testing.B) {
			// CPU time of this thread only (the machine is shared: wall
			// time counts other processes' turns on the cores).
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			start := threadCPU(b)
			for b.Loop() {
				e.srv.auth.authenticate(ctx, r)
			}
			b.ReportMetric(float64(threadCPU(b)-start)/float64(b.N), "cpu-ns/op")
		})
	}
}

// threadCPU is the CPU time the calling OS thread has used.
func threadCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(1 /* RUSAGE_THREAD */, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
