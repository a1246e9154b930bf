package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	embeddedpostgres "github.com/fergusstrange/embedded-postgres"
)

// embeddedRepo overrides embedded-postgres's download repository (tests
// point it at a closed port); empty means its default.
var embeddedRepo = ""

// startEmbeddedPG is the last resort when the machine has no PostgreSQL
// binaries: embedded-postgres, which uses binaries from its cache or
// downloads them (so it fails on a machine without network access). Like
// initdb it refuses to run as root.
func startEmbeddedPG(ctx context.Context, log *slog.Logger) (*demoServer, error) {
	if os.Geteuid() == 0 {
		return nil, errors.New("embedded-postgres cannot run as root")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := uint32(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	dir, err := os.MkdirTemp("", "keybroker-epg-")
	if err != nil {
		return nil, err
	}
	cfg := embeddedpostgres.DefaultConfig().
		Port(port).
		RuntimePath(filepath.Join(dir, "run")).
		DataPath(filepath.Join(dir, "data")).
		StartTimeout(60 * time.Second).
		Logger(io.Discard)
	if embeddedRepo != "" {
		cfg = cfg.BinaryRepositoryURL(embeddedRepo)
	}
	db := embeddedpostgres.NewDatabase(cfg)
	log.Info("starting embedded-postgres", "dir", dir)
	started := make(chan error, 1)
	go func() { started <- db.Start() }()
	select {
	case err = <-started:
	case <-ctx.Done():
		// Start cannot be cancelled: let it finish, then stop the server.
		if e := <-started; e == nil {
			_ = db.Stop()
		}
		err = ctx.Err()
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("embedded-postgres: %v", err)
	}
	return &demoServer{
		dir: dir,
		URL: cfg.GetConnectionURL() + "?sslmode=disable",
		stop: func() error {
			err := db.Stop()
			if e := os.RemoveAll(dir); err == nil {
				err = e
			}
			return err
		},
	}, nil
}
