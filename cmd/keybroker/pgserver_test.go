package main

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
)

// TestNoPostgreSQLSaysWhatToInstall: with no server binaries installed and
// embedded-postgres unable to download, demo's server start fails with the
// one line that says what to install.
func TestNoPostgreSQLSaysWhatToInstall(t *testing.T) {
	glob, repo := pgBinGlob, embeddedRepo
	t.Cleanup(func() { pgBinGlob, embeddedRepo = glob, repo })
	pgBinGlob = filepath.Join(t.TempDir(), "*", "bin")
	embeddedRepo = "http://127.0.0.1:1"
	t.Setenv("PATH", t.TempDir())
	t.Setenv("HOME", t.TempDir()) // no cached embedded-postgres download

	s, err := startPGServer(context.Background(), slog.New(slog.DiscardHandler))
	if err == nil {
		s.stop()
		t.Fatal("started a server without binaries")
	}
	if err.Error() != installHint {
		t.Fatalf("error %q, want %q", err, installHint)
	}
}

// TestThrowawayServer starts and stops demo's server from the machine's
// binaries and checks it is reachable only through its socket directory,
// which stop removes.
func TestThrowawayServer(t *testing.T) {
	ctx := context.Background()
	s, err := startPGServer(ctx, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	a := &app{cfg: config{DatabaseURL: s.URL}}
	pool, err := a.openDB(ctx)
	if err != nil {
		s.stop()
		t.Fatal(err)
	}
	var listen string
	err = pool.QueryRow(ctx, "SHOW listen_addresses").Scan(&listen)
	pool.Close()
	if err != nil {
		s.stop()
		t.Fatal(err)
	}
	if listen != "" {
		t.Errorf("listen_addresses = %q, want none (Unix socket only)", listen)
	}
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	if pids := processesMentioning(t, s.dir); len(pids) != 0 {
		t.Errorf("server processes left running: %v", pids)
	}
	if _, err := os.Stat(s.dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("server directory still there after stop: %v", err)
	}
}
