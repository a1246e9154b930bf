package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

// Defaults for Options fields left zero.
const (
	DefaultReadHeaderTimeout = 5 * time.Second
	DefaultReadTimeout       = 30 * time.Second
	DefaultWriteTimeout      = 60 * time.Second
	DefaultIdleTimeout       = 120 * time.Second
	DefaultShutdownTimeout   = 30 * time.Second
	DefaultMaxHeaderBytes    = 16 << 10
)

// Options configures Listen and Serve.
type Options struct {
	// Addr is the TCP address to listen on ("127.0.0.1:8200", ":8443").
	Addr string
	// CertFile and KeyFile: PEM certificate chain and key for TLS (1.2 or
	// later). Without them the server speaks plain HTTP, which Listen
	// allows only on a loopback address unless AllowPlaintext is set (for
	// a TLS-terminating proxy in front).
	CertFile, KeyFile string
	// ClientCAFile, when set (with TLS), requires every client to present
	// a certificate that chains to one of its PEM certificates (mTLS), on
	// top of its token.
	ClientCAFile string
	// AllowPlaintext permits plain HTTP on a non-loopback address.
	AllowPlaintext bool
	// Timeouts and bounds of the http.Server (the defaults when zero):
	// a client must send its headers within ReadHeaderTimeout and its
	// whole request within ReadTimeout (so slow clients cannot hold
	// connections), an idle keep-alive connection is closed after
	// IdleTimeout, and on shutdown in-flight requests get ShutdownTimeout
	// to finish.
	ReadHeaderTimeout, ReadTimeout, WriteTimeout, IdleTimeout, ShutdownTimeout time.Duration
	MaxHeaderBytes                                                             int
	// OnShutdown, when set, is called once when ctx is done, before the
	// server stops accepting (to log it).
	OnShutdown func()
}

// Listen opens opts.Addr, refusing plain HTTP outside loopback (ErrPlaintext)
// unless opts.AllowPlaintext.
func Listen(opts Options) (net.Listener, error) {
	if (opts.CertFile == "") != (opts.KeyFile == "") {
		return nil, fmt.Errorf("%w: TLS needs both a certificate and a key file", ErrInvalidArgument)
	}
	if opts.ClientCAFile != "" && opts.CertFile == "" {
		return nil, fmt.Errorf("%w: a client CA (mTLS) needs TLS (certificate and key files)", ErrInvalidArgument)
	}
	if opts.CertFile == "" && !opts.AllowPlaintext && !loopback(opts.Addr) {
		return nil, fmt.Errorf("%w: %s is not a loopback address; give a certificate and key, or allow plain HTTP explicitly", ErrPlaintext, opts.Addr)
	}
	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("server: listen: %w", err)
	}
	return ln, nil
}

// loopback reports whether addr's host is a loopback IP or "localhost".
// An empty host (all interfaces) is not.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Serve serves h on ln until ctx is done, then shuts down gracefully: it
// stops accepting, lets in-flight requests finish (each write is one
// transaction, so nothing is left half-written) for up to
// ShutdownTimeout, then closes what remains. It returns nil after a
// graceful shutdown. ln is closed when Serve returns.
func Serve(ctx context.Context, ln net.Listener, h http.Handler, opts Options) error {
	hs := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: orDefault(opts.ReadHeaderTimeout, DefaultReadHeaderTimeout),
		ReadTimeout:       orDefault(opts.ReadTimeout, DefaultReadTimeout),
		WriteTimeout:      orDefault(opts.WriteTimeout, DefaultWriteTimeout),
		IdleTimeout:       orDefault(opts.IdleTimeout, DefaultIdleTimeout),
		MaxHeaderBytes:    orDefault(opts.MaxHeaderBytes, DefaultMaxHeaderBytes),
	}
	if opts.CertFile != "" {
		cfg, err := tlsConfig(opts)
		if err != nil {
			ln.Close()
			return err
		}
		hs.TLSConfig = cfg
		ln = tls.NewListener(ln, cfg)
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("server: serve: %w", err)
	case <-ctx.Done():
	}
	if opts.OnShutdown != nil {
		opts.OnShutdown()
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), orDefault(opts.ShutdownTimeout, DefaultShutdownTimeout))
	defer cancel()
	err := hs.Shutdown(sctx)
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) && serr != nil {
		return fmt.Errorf("server: serve: %w", serr)
	}
	if err != nil {
		hs.Close()
		return fmt.Errorf("server: shutdown: %w", err)
	}
	return nil
}

func tlsConfig(opts Options) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(opts.CertFile, opts.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: TLS certificate or key: %v", ErrInvalidArgument, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if opts.ClientCAFile != "" {
		pem, err := os.ReadFile(opts.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("%w: client CA file: %v", ErrInvalidArgument, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%w: client CA file holds no PEM certificate", ErrInvalidArgument)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}
