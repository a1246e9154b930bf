package server_test

import (
	"context"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/profullstack/keybroker/health"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	_ "github.com/profullstack/keybroker/provider/local"
	"github.com/profullstack/keybroker/server"
)

// What `keybroker serve` does: a Store, a readiness checker, a token, and
// the server on TLS until SIGTERM. (Compiled, not run: it needs a database.)
func Example() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	kek, err := provider.Open(ctx, os.Getenv("KEYBROKER_KEK"))
	if err != nil {
		log.Fatal(err)
	}
	pool, err := pgstore.NewPool(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	store, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek, Actor: "keybroker-serve"})
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	checker, err := health.New(health.Config{Store: store})
	if err != nil {
		log.Fatal(err)
	}

	// A token for MeshHook's API: read and write in one project, 90 days.
	tokens, err := server.NewTokens(pool, store.Schema())
	if err != nil {
		log.Fatal(err)
	}
	token, info, err := tokens.Create(ctx, server.TokenSpec{
		Name: "meshhook-api", Projects: []string{"project-42"},
		Ops: []server.Op{server.OpRead, server.OpWrite}, TTL: 90 * 24 * time.Hour,
	})
	if err != nil {
		log.Fatal(err)
	}
	_ = token // hand it to the service's secret configuration; it is not shown again
	log.Printf("token %s expires %s", info.ID, info.ExpiresAt)

	srv, err := server.New(server.Config{Store: store, Pool: pool, Ready: checker})
	if err != nil {
		log.Fatal(err)
	}
	opts := server.Options{Addr: ":8443", CertFile: "/etc/keybroker/tls.crt", KeyFile: "/etc/keybroker/tls.key"}
	ln, err := server.Listen(opts)
	if err != nil {
		log.Fatal(err)
	}
	if err := server.Serve(ctx, ln, srv, opts); err != nil {
		log.Fatal(err)
	}
}
