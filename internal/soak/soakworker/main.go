// Command soakworker is one OS process of the fleet soak test (package
// internal/soak): a writer (-role writer) storing and reading back its own
// secrets through pgstore, or the operator (-role operator) looping the
// real keybroker CLI. It reads KEYBROKER_DATABASE_URL and KEYBROKER_KEK
// (and the key service's own variables, such as VAULT_TOKEN) from the
// environment and prints one JSON summary (soak.WriterSummary or
// soak.OperatorSummary) on stdout when it ends. Errors that stop it go to
// stderr with exit status 1.
//
// The e2e failover scenarios (e2e/failover_test.go) run writers too, with
// -ack-log (each acknowledged Put appended to a file another process reads
// while the writer runs) and -op-timeout (a Put to a server that stopped
// answering fails instead of waiting for TCP to give up).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/soak"
)

func main() {
	var o options
	flag.StringVar(&o.role, "role", "", "writer or operator")
	flag.IntVar(&o.worker, "worker", 0, "writer: this worker's number")
	flag.IntVar(&o.goroutines, "goroutines", 2, "writer: goroutines, each with its own names")
	flag.IntVar(&o.names, "names", 10, "writer: secret names per goroutine")
	flag.IntVar(&o.projects, "projects", 40, "projects the names are spread over")
	flag.Int64Var(&o.ops, "ops", 0, "writer: Puts per goroutine before it may stop (0: until -duration)")
	flag.DurationVar(&o.duration, "duration", 30*time.Second, "writer: run this long unless every goroutine made -ops Puts first (and until the operator did -min-cycles)")
	flag.DurationVar(&o.limit, "limit", 90*time.Second, "writer: stop after this long whatever the operator did")
	flag.IntVar(&o.minCycles, "min-cycles", 2, "writer: operator rounds to wait for before stopping")
	flag.Int64Var(&o.budget, "budget", 100, "writer: pgstore Config.Budget")
	flag.Int64Var(&o.chunk, "chunk", 10, "writer: pgstore Config.ReserveChunk")
	flag.StringVar(&o.ackLog, "ack-log", "", "writer: append \"project name seq\" to this file after each acknowledged Put, one write(2) per line, so that another process can read what was acknowledged while this one runs")
	flag.DurationVar(&o.opTimeout, "op-timeout", 0, "writer: deadline of each Put and read-back (0: none), so that a write to an unreachable server fails instead of waiting for TCP to give up")
	flag.Uint64Var(&o.seed, "seed", 1, "random seed")
	flag.StringVar(&o.keybroker, "keybroker", "", "operator: the keybroker binary")
	flag.StringVar(&o.tenantKEK, "tenant-kek", "", "operator: bind project 0 to this KEK of its own on even rounds, unbind it on odd ones and at the end")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var (
		out any
		err error
	)
	switch o.role {
	case "writer":
		out, err = runWriter(ctx, o)
	case "operator":
		out, err = runOperator(ctx, o)
	default:
		err = fmt.Errorf("-role must be writer or operator")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "soakworker:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "soakworker:", err)
		os.Exit(1)
	}
}

type options struct {
	role                       string
	worker, goroutines, names  int
	projects, minCycles        int
	ops, budget, chunk         int64
	duration, limit, opTimeout time.Duration
	seed                       uint64
	keybroker, ackLog          string
	tenantKEK                  string
}

func openPool(ctx context.Context) (*pgxpool.Pool, error) {
	url := os.Getenv("KEYBROKER_DATABASE_URL")
	if url == "" {
		return nil, fmt.Errorf("KEYBROKER_DATABASE_URL is unset")
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("database: %w", err)
	}
	return pool, nil
}

// operatorCycles reads how many rounds the operator has completed, from
// the table the test created (soak.ProgressTable).
func operatorCycles(ctx context.Context, pool *pgxpool.Pool) (int, error) {
	var n int
	err := pool.QueryRow(ctx, `SELECT cycles FROM `+soak.ProgressTable).Scan(&n)
	return n, err
}
