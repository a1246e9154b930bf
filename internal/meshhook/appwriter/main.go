// Command appwriter is MeshHook's application writing its secrets table,
// as one OS process of a multi-process test: it runs meshhook.RunWriter
// against the database in DATABASE_URL (MeshHook's tables in -schema),
// appends each attempted and acknowledged write to -log (project, key and
// the value's SHA-256, never the value), and prints a JSON
// meshhook.WriterSummary on stdout when it stops (after -ops acknowledged
// writes, -duration, or SIGINT/SIGTERM). SIGKILL it at any point: the log
// stays correct up to its last whole line.
//
// -mode picks the value encoder by its registered name
// (meshhook.RegisterEncoder): "v1" (MeshHook's legacy v1 values under
// SECRETS_ENCRYPTION_KEY), "plaintext", and "keybroker-store" (the value
// in keybroker's own table through pgstore, KEK from KEYBROKER_KEK, schema
// KEYBROKER_SCHEMA) are built in; a file registering another one in an
// init function adds a mode.
// Errors that stop it go to stderr with exit status 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/meshhook"
)

func main() {
	var (
		cfg      meshhook.WriterConfig
		mode     string
		logPath  string
		duration time.Duration
	)
	flag.StringVar(&cfg.Schema, "schema", "public", "schema holding MeshHook's projects and secrets tables")
	flag.StringVar(&mode, "mode", "v1", "value encoder: "+strings.Join(meshhook.EncoderNames(), ", "))
	flag.StringVar(&logPath, "log", "", "append the write log here (required)")
	flag.IntVar(&cfg.Worker, "worker", 0, "this writer's number, 0 <= worker < workers")
	flag.IntVar(&cfg.Workers, "workers", 1, "writers sharing the table (each owns its own rows)")
	flag.Int64Var(&cfg.Ops, "ops", 0, "stop after this many acknowledged writes (0: until -duration or a signal)")
	flag.IntVar(&cfg.NewEvery, "new-every", 10, "every n-th write inserts a new key (0: never)")
	flag.Uint64Var(&cfg.Seed, "seed", 1, "random seed")
	flag.DurationVar(&duration, "duration", 0, "stop after this long (0: no limit)")
	flag.Parse()
	if err := run(cfg, mode, logPath, duration); err != nil {
		fmt.Fprintln(os.Stderr, "appwriter:", err)
		os.Exit(1)
	}
}

func run(cfg meshhook.WriterConfig, mode, logPath string, duration time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, duration)
		defer cancel()
	}
	if logPath == "" {
		return fmt.Errorf("-log is required")
	}
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		return fmt.Errorf("DATABASE_URL is unset")
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return fmt.Errorf("database: bad DATABASE_URL or pool settings") // pgx may quote the URL
	}
	defer pool.Close()
	cfg.Pool = pool
	if cfg.Encoder, err = meshhook.NewEncoder(ctx, mode, meshhook.EncoderEnv{Pool: pool, Schema: cfg.Schema, Getenv: os.Getenv}); err != nil {
		return err
	}
	f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	cfg.Log = f
	sum, err := meshhook.RunWriter(ctx, cfg)
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(sum)
}
