package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/profullstack/keybroker/health"
	"github.com/profullstack/keybroker/server"
	"github.com/profullstack/keybroker/telemetry"
	"github.com/spf13/cobra"
)

func newServeCmd(a *app) *cobra.Command {
	var (
		opts     server.Options
		cfg      server.Config
		dbConns  int32
		noMetric bool
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve the HTTP API (package server) for services in any language",
		Long: `serve runs keybroker's HTTP API: a project's secrets (put, get, get-many,
delete, list) under /v1, for service tokens made with keybroker token create;
GET /livez, /readyz (package health), /metrics (Prometheus, unless
--no-metrics) and /v1/openapi.json (the API's OpenAPI 3 document) need no
token. Every authenticated request about a project is recorded in the
access_log table before its response is sent.

TLS comes from --tls-cert and --tls-key; --client-ca adds mTLS: every
client must present a certificate the CA signed, and a token made with
token create --client-cert is accepted only with its own certificate (the
access_log row names the token, which names the certificate); without
--client-ca serve logs a warning at start if such tokens exist (all of them
would get 401). Plain HTTP
is refused on an address that is not loopback unless --allow-plaintext (a
TLS-terminating proxy in front). Once listening it prints one line,
"listening on URL", to stdout. SIGTERM or SIGINT stops accepting, lets
in-flight requests finish (up to --shutdown-timeout) and exits 0.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			ln, err := server.Listen(opts)
			if err != nil {
				return &codeError{code: exitUsage, err: err}
			}
			defer ln.Close()
			reg := prometheus.NewRegistry()
			exp, err := otelprom.New(otelprom.WithRegisterer(reg))
			if err != nil {
				return fmt.Errorf("serve: metrics: %w", err)
			}
			mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
			defer mp.Shutdown(ctx)
			tel, err := telemetry.New(telemetry.WithMeterProvider(mp))
			if err != nil {
				return fmt.Errorf("serve: metrics: %w", err)
			}
			s, err := a.openStoreWith(ctx, dbConns, "keybroker-serve", tel.StoreObserver())
			if err != nil {
				return err
			}
			defer s.close()
			if reg, err := tel.ObserveCache("pgstore", s.store.CacheStats); err == nil {
				defer reg.Unregister()
			}
			checker, err := health.New(health.Config{Store: s.store, CacheStats: s.store.CacheStats})
			if err != nil {
				return err
			}
			cfg.Store, cfg.Pool, cfg.Ready, cfg.MeterProvider, cfg.Logger = s.store, s.pool, checker, mp, a.log
			if !noMetric {
				cfg.Metrics = promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
			}
			srv, err := server.New(cfg)
			if err != nil {
				return &codeError{code: exitUsage, err: err}
			}
			if opts.ClientCAFile == "" {
				warnBoundTokens(ctx, a, s.pool)
			}
			// Deferred after s.close, so it runs first: Serve has let the
			// in-flight requests finish, Close flushes the access-log rows
			// still queued, then the pool closes.
			defer srv.Close()
			scheme := "https"
			if opts.CertFile == "" {
				scheme = "http"
			}
			fmt.Fprintf(a.stdout, "listening on %s://%s\n", scheme, ln.Addr())
			a.log.Info("serving", "addr", ln.Addr().String(), "tls", opts.CertFile != "", "mtls", opts.ClientCAFile != "")
			opts.OnShutdown = func() { a.log.Info("shutting down: finishing in-flight requests") }
			if err := server.Serve(ctx, ln, srv, opts); err != nil {
				return err
			}
			a.log.Info("stopped")
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Addr, "listen", "127.0.0.1:8200", "TCP address to listen on")
	f.StringVar(&opts.CertFile, "tls-cert", "", "PEM certificate chain for TLS")
	f.StringVar(&opts.KeyFile, "tls-key", "", "PEM private key for TLS")
	f.StringVar(&opts.ClientCAFile, "client-ca", "", "PEM CA certificates: require client certificates (mTLS)")
	f.BoolVar(&opts.AllowPlaintext, "allow-plaintext", false, "allow plain HTTP on a non-loopback address")
	f.DurationVar(&opts.ShutdownTimeout, "shutdown-timeout", server.DefaultShutdownTimeout, "how long in-flight requests get to finish on SIGTERM")
	f.Int32Var(&dbConns, "db-conns", 32, "database connections")
	f.Int64Var(&cfg.MaxBody, "max-body", server.DefaultMaxBody, "largest request body in bytes")
	f.Float64Var(&cfg.Rate, "rate", server.DefaultRate, "requests per second per token")
	f.IntVar(&cfg.Burst, "burst", server.DefaultBurst, "burst of requests per token")
	f.DurationVar(&cfg.TokenRecheck, "token-recheck", server.DefaultTokenRecheck, "how long a token's row is trusted before it is read again (how soon a revocation bites)")
	f.BoolVar(&noMetric, "no-metrics", false, "do not serve /metrics")
	return cmd
}

// warnBoundTokens logs how many valid tokens are bound to a client
// certificate when serve runs without --client-ca: no connection can then
// carry a verified certificate, so every one of them gets 401, which the
// operator should hear about once at start rather than from clients.
func warnBoundTokens(ctx context.Context, a *app, pool *pgxpool.Pool) {
	t, err := server.NewTokens(pool, a.schema())
	if err != nil {
		return
	}
	list, err := t.List(ctx)
	if err != nil {
		a.log.Warn("could not list tokens to check client-certificate bindings", "err", err)
		return
	}
	n, now := 0, time.Now()
	for _, i := range list {
		if i.ClientCertPrefix != "" && i.RevokedAt == nil && now.Before(i.ExpiresAt) {
			n++
		}
	}
	if n > 0 {
		a.log.Warn("tokens bound to a client certificate are refused (401) without --client-ca", "tokens", n)
	}
}

func newTokenCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Create, list and revoke service tokens for keybroker serve",
		Long: `token manages the service tokens keybroker serve accepts. A token is 256
random bits (with a 128-bit id); the database keeps only its SHA-256. It is
printed once, by token create: store it in the service's secret
configuration. Each token is scoped to projects (--project, repeatable; none
for every project) and operations (read: get, get-many, list; write: put,
delete; seal, open; admin), and expires (--ttl). token revoke refuses it on
every server within their --token-recheck. token create --client-cert
binds the token to one client certificate: serve (with --client-ca) then
accepts it only on a connection that presented exactly that certificate,
and answers it anywhere else as a bad token. These commands need only the
database, not the KEK.`,
	}
	cmd.AddCommand(newTokenCreateCmd(a), newTokenListCmd(a), newTokenRevokeCmd(a))
	return cmd
}

func (a *app) openTokens(cmd *cobra.Command) (*server.Tokens, func(), error) {
	pool, err := a.openDB(cmd.Context())
	if err != nil {
		return nil, nil, err
	}
	t, err := server.NewTokens(pool, a.schema())
	if err != nil {
		pool.Close()
		return nil, nil, &codeError{code: exitUsage, err: err}
	}
	return t, pool.Close, nil
}

func newTokenCreateCmd(a *app) *cobra.Command {
	var (
		spec       server.TokenSpec
		ops        []string
		clientCert string
	)
	cmd := &cobra.Command{
		Use:   "create --name NAME --ops read,write [--project P]... [--ttl 2160h] [--client-cert client.crt]",
		Short: "Create a service token and print it (once)",
		Long: `create makes a service token and prints it once; the database keeps only
its SHA-256.

--client-cert FILE binds the token to the client certificate in FILE (PEM,
exactly one CERTIFICATE block: the client's own certificate, not its chain).
The table keeps the SHA-256 of the certificate's DER; keybroker serve, run
with --client-ca, accepts the token only on a TLS connection whose verified
client certificate is that one, and answers it on any other connection
(another certificate, none, plain HTTP) with the 401 of a bad token. A
stolen token is then useless without the certificate's private key. token
list shows the first 16 hex digits of the fingerprint (the digits openssl
x509 -noout -fingerprint -sha256 prints, in lower case without colons). A missing or
unreadable FILE, or one that is not a single certificate, is a usage error
(exit 2) and creates nothing.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, o := range ops {
				spec.Ops = append(spec.Ops, server.Op(strings.TrimSpace(o)))
			}
			if clientCert != "" {
				data, err := os.ReadFile(clientCert)
				if err != nil {
					return usageErrorf("token create: --client-cert: %v", err)
				}
				if spec.ClientCertSHA256, err = server.ClientCertFingerprint(data); err != nil {
					return usageErrorf("token create: --client-cert %s: %v", clientCert, err)
				}
			}
			t, done, err := a.openTokens(cmd)
			if err != nil {
				return err
			}
			defer done()
			tok, info, err := t.Create(cmd.Context(), spec)
			if err != nil {
				return &codeError{code: exitCodeFor(err), err: err}
			}
			a.log.Info("created token", "id", info.ID, "name", info.Name)
			res := struct {
				Token string `json:"token"`
				server.TokenInfo
			}{tok, info}
			return a.emit(res, func(w io.Writer) {
				fmt.Fprintf(w, "%s\n", tok)
				fmt.Fprintf(w, "id %s, expires %s (shown once: the database keeps only its hash)\n", info.ID, info.ExpiresAt.UTC().Format(time.RFC3339))
				if info.ClientCertPrefix != "" {
					fmt.Fprintf(w, "bound to client certificate sha256:%s...\n", info.ClientCertPrefix)
				}
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&spec.Name, "name", "", "who holds the token (required)")
	f.StringArrayVar(&spec.Projects, "project", nil, "a project the token may act on (repeatable; none: every project)")
	f.StringSliceVar(&ops, "ops", nil, "operations: read, write, seal, open, admin (comma-separated, required)")
	f.DurationVar(&spec.TTL, "ttl", 90*24*time.Hour, "how long the token is valid")
	f.StringVar(&clientCert, "client-cert", "", "PEM file of the one client certificate the token is accepted with (needs serve --client-ca)")
	return cmd
}

// exitCodeFor is exitCode, with the server package's argument errors as
// usage errors too.
func exitCodeFor(err error) int {
	if errors.Is(err, server.ErrInvalidArgument) {
		return exitUsage
	}
	return exitCode(err)
}

func newTokenListCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List service tokens (never the tokens themselves)",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			t, done, err := a.openTokens(cmd)
			if err != nil {
				return err
			}
			defer done()
			list, err := t.List(cmd.Context())
			if err != nil {
				return err
			}
			if list == nil {
				list = []server.TokenInfo{}
			}
			return a.emit(list, func(w io.Writer) {
				now := time.Now()
				for _, i := range list {
					state := "valid"
					switch {
					case i.RevokedAt != nil:
						state = "revoked"
					case !now.Before(i.ExpiresAt):
						state = "expired"
					}
					projects := "*"
					if i.Projects != nil {
						projects = strings.Join(i.Projects, ",")
					}
					ops := make([]string, len(i.Ops))
					for k, o := range i.Ops {
						ops[k] = string(o)
					}
					cert := "-"
					if i.ClientCertPrefix != "" {
						cert = "sha256:" + i.ClientCertPrefix + "..."
					}
					fmt.Fprintf(w, "%s  %-7s  %s  projects=%s  ops=%s  cert=%s  expires=%s\n", i.ID, state, i.Name, projects,
						strings.Join(ops, ","), cert, i.ExpiresAt.UTC().Format(time.RFC3339))
				}
			})
		},
	}
}

func newTokenRevokeCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke a service token by its id",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			t, done, err := a.openTokens(cmd)
			if err != nil {
				return err
			}
			defer done()
			if err := t.Revoke(cmd.Context(), argv[0]); err != nil {
				return &codeError{code: exitCodeFor(err), err: err}
			}
			a.log.Info("revoked token", "id", argv[0])
			return a.emit(map[string]string{"revoked": argv[0]}, func(w io.Writer) { fmt.Fprintf(w, "revoked %s\n", argv[0]) })
		},
	}
}
