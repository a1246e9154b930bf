package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// writeCert makes a self-signed certificate for 127.0.0.1 (a CA too, so
// it can sign itself as a client) and returns the cert and key files.
func writeCert(t *testing.T, dir, name string) (certFile, keyFile string, cert *x509.Certificate, pair tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ = x509.ParseCertificate(der)
	pair, err = tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, cert, pair
}

func TestListenRefusesPlaintextOutsideLoopback(t *testing.T) {
	for _, addr := range []string{":0", "0.0.0.0:0", "[::]:0"} {
		if _, err := Listen(Options{Addr: addr}); !errors.Is(err, ErrPlaintext) {
			t.Errorf("%s: %v, want ErrPlaintext", addr, err)
		}
	}
	ln, err := Listen(Options{Addr: ":0", AllowPlaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	if _, err := Listen(Options{Addr: "127.0.0.1:0", CertFile: "x"}); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("cert without key: %v", err)
	}
	if _, err := Listen(Options{Addr: "127.0.0.1:0", ClientCAFile: "x"}); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("client CA without TLS: %v", err)
	}
}

// TLS from files, and mTLS: a client without a certificate the CA signed
// is refused during the handshake.
func TestServeTLSAndMTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, srvCert, _ := writeCert(t, dir, "server")
	caFile, _, _, clientPair := writeCert(t, dir, "client")
	roots := x509.NewCertPool()
	roots.AddCert(srvCert)
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok")) })
	serve := func(opts Options) string { return serveTLS(t, h, opts) }
	get := func(url string, certs []tls.Certificate) error {
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: certs}}}
		resp, err := c.Get(url + "/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return errors.New(resp.Status)
		}
		return nil
	}
	plain := serve(Options{CertFile: certFile, KeyFile: keyFile})
	if err := get(plain, nil); err != nil {
		t.Fatalf("TLS: %v", err)
	}
	if resp, err := http.Get("http" + plain[len("https"):] + "/"); err == nil && resp.StatusCode == 200 {
		t.Fatal("plain HTTP served on the TLS port")
	}
	mtls := serve(Options{CertFile: certFile, KeyFile: keyFile, ClientCAFile: caFile})
	if err := get(mtls, nil); err == nil {
		t.Fatal("mTLS: a client without a certificate was served")
	}
	if err := get(mtls, []tls.Certificate{clientPair}); err != nil {
		t.Fatalf("mTLS with a client certificate: %v", err)
	}
}
