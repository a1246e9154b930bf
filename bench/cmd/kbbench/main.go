// Command kbbench measures keybroker against the envelope-encryption
// libraries and key-service patterns a user might run instead, in one
// process, and prints every figure as a ratio to raw AES-256-GCM measured
// in the same run. It writes the "Contenders" section of docs/BENCHMARKS.md
// and docs/benchmarks.svg.
//
//	cd bench && go run ./cmd/kbbench [-quick]
//
// It starts a dev-mode Vault and local-kms (built by `make deps`) and, unless
// KEYBROKER_BENCH_DATABASE_URL names a PostgreSQL superuser URL, a throwaway
// PostgreSQL server (internal/pgserver); all are stopped at exit.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/profullstack/keybroker/bench"
)

func main() {
	os.Exit(run())
}

// cleanups run once, at exit or on a signal.
var (
	cleanupMu sync.Mutex
	cleanups  []func()
)

func atExit(f func()) {
	cleanupMu.Lock()
	defer cleanupMu.Unlock()
	cleanups = append(cleanups, f)
}

func cleanup() {
	cleanupMu.Lock()
	defer cleanupMu.Unlock()
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	cleanups = nil
}

func run() int {
	quick := flag.Bool("quick", false, "short run: fewer rounds, shorter benchmarks, fewer rows")
	rounds := flag.Int("rounds", 0, "interleaved rounds (default 5, 3 with -quick)")
	benchtime := flag.Duration("benchtime", 0, "time per benchmark (default 300ms, 50ms with -quick)")
	rows := flag.Int("rows", 0, "secrets stored per database contender (default 100000, 6000 with -quick)")
	secrets := flag.Int("secrets", 0, "secrets encrypted when counting key-service calls (default 10000, 1000 with -quick)")
	skipKS := flag.Bool("skip-keyservices", false, "skip the Vault and local-kms contenders")
	skipDB := flag.Bool("skip-db", false, "skip the PostgreSQL contenders")
	profDir := flag.String("profiles", "", "also write the raw CPU profiles to this directory")
	write := flag.Bool("write", true, "write docs/BENCHMARKS.md and docs/benchmarks.svg")
	flag.Parse()

	def := func(p *int, full, q int) {
		if *p == 0 {
			*p = full
			if *quick {
				*p = q
			}
		}
	}
	def(rounds, 5, 3)
	def(rows, 100000, 6000)
	def(secrets, 10000, 1000)
	if *benchtime == 0 {
		*benchtime = 300 * time.Millisecond
		if *quick {
			*benchtime = 50 * time.Millisecond
		}
	}
	if *rounds < 1 || *rows < *rounds || *secrets < 1 || *benchtime <= 0 {
		fmt.Fprintln(os.Stderr, "kbbench: -rounds, -rows, -secrets and -benchtime must be positive, and -rows at least -rounds")
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		if context.Cause(ctx) != nil {
			cleanup()
		}
	}()
	defer cleanup()

	start := time.Now()
	progress := func(s string) {
		fmt.Fprintf(os.Stderr, "\r\033[K[%5.1fs] %s", time.Since(start).Seconds(), s)
	}
	done := func() { fmt.Fprintln(os.Stderr) }
	fail := func(err error) int {
		done()
		fmt.Fprintln(os.Stderr, "kbbench:", err)
		return 1
	}
	rep := &bench.Report{Date: start, Quick: *quick, Rounds: *rounds, Benchtime: *benchtime}

	// In process.
	cs, err := bench.InProcess()
	if err != nil {
		return fail(err)
	}
	atExit(func() {
		for _, c := range cs {
			c.Close()
		}
	})
	if rep.InProcess, err = bench.Measure(ctx, cs, bench.Sizes, *rounds, *benchtime, bench.CPU, progress); err != nil {
		return fail(err)
	}
	// Profile keybroker where it is furthest behind raw AES-GCM, for each op.
	for _, op := range []bench.Op{bench.Encrypt, bench.Decrypt} {
		if err := profileWorst(ctx, rep, cs[1], op, *profDir, progress); err != nil {
			return fail(err)
		}
	}
	done()

	// Key services.
	if *skipKS {
		rep.Skipped = append(rep.Skipped, "Key services: skipped with -skip-keyservices.")
	} else if err := keyServices(ctx, rep, *rounds, *benchtime, *secrets, progress); err != nil {
		return fail(err)
	}
	done()

	// Database.
	if *skipDB {
		rep.Skipped = append(rep.Skipped, "Database: skipped with -skip-db.")
	} else if err := database(ctx, rep, *rows, *rounds, *profDir, progress); err != nil {
		return fail(err)
	}
	done()

	md := rep.Markdown()
	fmt.Print(md)
	if *write {
		root, err := bench.RepoRoot()
		if err != nil {
			return fail(err)
		}
		docs := filepath.Join(root, "docs")
		if err := os.MkdirAll(docs, 0o755); err != nil {
			return fail(err)
		}
		if err := os.WriteFile(filepath.Join(docs, "benchmarks.svg"), []byte(bench.SVG(rep.InProcess)), 0o644); err != nil {
			return fail(err)
		}
		if err := bench.WriteSection(filepath.Join(docs, "BENCHMARKS.md"), md); err != nil {
			return fail(err)
		}
		fmt.Fprintf(os.Stderr, "kbbench: wrote docs/BENCHMARKS.md (section Contenders) and docs/benchmarks.svg in %v\n", time.Since(start).Round(time.Second))
	}
	return 0
}

// profileWorst profiles keybroker's op at the size where its ratio to raw
// AES-GCM is worst.
func profileWorst(ctx context.Context, rep *bench.Report, kb *bench.Contender, op bench.Op, dir string, progress func(string)) error {
	worst, ratio := bench.Sizes[0], 0.0
	for _, n := range bench.Sizes {
		k, _ := bench.Find(rep.InProcess, bench.NameKeybroker, op, n)
		r, _ := bench.Find(rep.InProcess, bench.NameRaw, op, n)
		if k.NsPerOp/r.NsPerOp > ratio {
			worst, ratio = n, k.NsPerOp/r.NsPerOp
		}
	}
	pt := bench.Payload(worst)
	f := func() error { _, err := kb.Seal(ctx, pt); return err }
	if op == bench.Decrypt {
		ct, err := kb.Seal(ctx, pt)
		if err != nil {
			return err
		}
		f = func() error { _, err := kb.Open(ctx, ct); return err }
	}
	progress(fmt.Sprintf("profiling keybroker %s of %s", op, bench.SizeName(worst)))
	flat, cum, raw, err := bench.Profile(ctx, 3*time.Second, 10, f)
	if err != nil {
		return err
	}
	rep.Profiles = append(rep.Profiles, bench.ProfileSection{
		Title: fmt.Sprintf("CPU profile of keybroker %s of %s, its worst ratio to raw AES-GCM (%.2f×), 3 s:", op, bench.SizeName(worst), ratio),
		Flat:  flat, Cum: cum})
	saveProfile(dir, fmt.Sprintf("keybroker-%s-%d.pprof", op, worst), raw)
	return nil
}

func keyServices(ctx context.Context, rep *bench.Report, rounds int, benchtime time.Duration, secrets int, progress func(string)) error {
	progress("starting Vault and local-kms")
	ks, err := bench.StartKeyServices(ctx)
	if err != nil {
		return err
	}
	atExit(ks.Close)
	cs, err := ks.Contenders(ctx, false)
	if err != nil {
		return err
	}
	atExit(func() {
		for _, c := range cs {
			c.Close()
		}
	})
	// Raw AES-GCM runs again, interleaved with these, for same-run ratios.
	raw, err := bench.NewRaw()
	if err != nil {
		return err
	}
	if rep.KeyService, err = bench.Measure(ctx, append([]*bench.Contender{raw}, cs...), []int{bench.KeyServiceSize}, rounds, benchtime, bench.Wall, progress); err != nil {
		return err
	}
	counted, err := ks.Contenders(ctx, true)
	if err != nil {
		return err
	}
	atExit(func() {
		for _, c := range counted {
			c.Close()
		}
	})
	for _, c := range counted {
		progress(fmt.Sprintf("counting key-service calls for %d secrets: %s", secrets, c.Name))
		n, err := bench.CountCalls(ctx, c, secrets, bench.KeyServiceSize)
		if err != nil {
			return err
		}
		rep.Calls = append(rep.Calls, n)
	}
	return nil
}

func database(ctx context.Context, rep *bench.Report, rows, rounds int, profDir string, progress func(string)) error {
	url := os.Getenv("KEYBROKER_BENCH_DATABASE_URL")
	var meter bench.CPUMeter
	if url == "" {
		progress("starting PostgreSQL")
		u, dataDir, stop, err := bench.StartPostgres(ctx)
		if err != nil {
			return err
		}
		atExit(stop)
		url = u
		if meter.Postmaster, err = bench.PostmasterPID(dataDir); err != nil {
			return err
		}
	}
	const conns, parallelism = 8, 4 // goroutines = parallelism × GOMAXPROCS
	db, err := bench.OpenDB(ctx, url, conns)
	if err != nil {
		return err
	}
	atExit(db.Close)
	rep.DBRows, rep.DBSize, rep.DBConns, rep.DBParallel = rows, 1<<10, conns, parallelism*runtime.GOMAXPROCS(0)
	cs := db.Contenders()
	if rep.DB, err = bench.MeasureDB(ctx, cs, rows, rep.DBSize, rounds, parallelism, meter, progress); err != nil {
		return err
	}
	progress("server-side pgcrypto cost")
	if rep.SQL, err = db.SQLCost(ctx, 2000, rep.DBSize, meter); err != nil {
		return fmt.Errorf("pgcrypto cost: %w", err)
	}
	progress("profiling pgstore put")
	v := bench.Payload(rep.DBSize)
	var i int
	_, cum, raw, err := bench.Profile(ctx, 3*time.Second, 12, func() error {
		i++
		return db.Store.Put(ctx, "project-profile", fmt.Sprintf("secret-%d", i%1000), v)
	})
	if err != nil {
		return err
	}
	rep.Profiles = append(rep.Profiles, bench.ProfileSection{Title: "CPU profile of this process during sequential pgstore puts of 1 KiB, 3 s (the server's time is not in it; see the CPU columns above):", Cum: cum})
	saveProfile(profDir, "pgstore-put-1k.pprof", raw)
	return nil
}

func saveProfile(dir, name string, b []byte) {
	if dir == "" {
		return
	}
	if err := os.MkdirAll(dir, 0o755); err == nil {
		os.WriteFile(filepath.Join(dir, name), b, 0o644)
	}
}
