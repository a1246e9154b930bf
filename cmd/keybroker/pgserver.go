package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/profullstack/keybroker/internal/pgserver"
)

// demoServer is demo's throwaway PostgreSQL server: internal/pgserver's
// (Unix socket only, so nothing else can reach it), or, where the machine
// has no PostgreSQL binaries, embedded-postgres's.
type demoServer struct {
	URL  string
	dir  string
	stop func() error // stops the server and removes dir
}

const installHint = "no PostgreSQL server binaries found (initdb, pg_ctl): install them (apt-get install postgresql) or set KEYBROKER_DATABASE_URL"

// pgBinGlob overrides where pgserver looks for the binaries first (tests);
// empty means its default.
var pgBinGlob = ""

// startPGServer starts demo's server. The caller must call stop.
func startPGServer(ctx context.Context, log *slog.Logger) (*demoServer, error) {
	s, err := pgserver.Start(ctx, pgserver.Options{BinGlob: pgBinGlob})
	if errors.Is(err, pgserver.ErrNoBinaries) {
		s, err := startEmbeddedPG(ctx, log)
		if err != nil {
			log.Debug("embedded-postgres failed", "err", err)
			return nil, errors.New(installHint)
		}
		return s, nil
	}
	if err != nil {
		return nil, err
	}
	log.Info("started throwaway PostgreSQL", "dir", s.Dir)
	return &demoServer{URL: s.URL, dir: s.Dir, stop: s.Stop}, nil
}
