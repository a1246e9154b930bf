package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/profullstack/keybroker/internal/soak"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"

	_ "github.com/profullstack/keybroker/provider/local"
	_ "github.com/profullstack/keybroker/provider/vault"
)

// writer is one writer process: goroutines writing and reading back their
// own names.
type writer struct {
	o     options
	store *pgstore.Store
	stop  atomic.Bool

	mu  sync.Mutex
	sum soak.WriterSummary
}

// errBadValue: a read-back returned a value that is not the name's last
// acknowledged one (nor a later attempted one).
var errBadValue = errors.New("not the last acknowledged value")

func runWriter(ctx context.Context, o options) (*soak.WriterSummary, error) {
	if o.goroutines < 1 || o.names < 1 || o.projects < 1 {
		return nil, fmt.Errorf("-goroutines, -names and -projects must be positive")
	}
	pool, err := openPool(ctx)
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	kek, err := provider.Open(ctx, os.Getenv("KEYBROKER_KEK"))
	if err != nil {
		return nil, err
	}
	store, err := pgstore.New(ctx, pool, pgstore.Config{
		KEK: kek, Budget: o.budget, ReserveChunk: o.chunk, Actor: fmt.Sprintf("soak-writer-%d", o.worker),
	})
	if err != nil {
		return nil, err
	}
	defer store.Close()
	w := &writer{o: o, store: store, sum: soak.WriterSummary{Worker: o.worker, Errors: map[string]int{}}}

	start := time.Now()
	var wg sync.WaitGroup
	var done atomic.Int64 // goroutines that did their -ops
	names := make([][]soak.Name, o.goroutines)
	for g := range o.goroutines {
		names[g] = w.names(g)
		wg.Go(func() { w.loop(ctx, g, names[g], &done) })
	}
	// The writers stop once they have run long enough (or did their
	// operations) and the operator has done its rounds under them; a poll
	// of the operator's progress row, bounded by -limit, which the test
	// reports if it is what ended the run.
	tick := time.NewTicker(100 * time.Millisecond)
	for !w.stop.Load() {
		select {
		case <-ctx.Done():
			w.stop.Store(true)
			continue
		case <-tick.C:
		}
		elapsed := time.Since(start)
		if elapsed >= o.limit {
			w.stop.Store(true)
			break
		}
		if elapsed < o.duration && (o.ops == 0 || done.Load() < int64(o.goroutines)) {
			continue
		}
		n, err := operatorCycles(ctx, pool)
		if err != nil {
			w.fail("operator progress", err)
			continue
		}
		if n >= o.minCycles {
			w.sum.OperatorOK = true
			w.stop.Store(true)
		}
	}
	tick.Stop()
	wg.Wait()
	for _, ns := range names {
		w.sum.Names = append(w.sum.Names, ns...)
	}
	return &w.sum, ctx.Err()
}

// names returns goroutine g's names, spread over the projects so that
// every process writes to many projects and each project has writers from
// several processes.
func (w *writer) names(g int) []soak.Name {
	ns := make([]soak.Name, w.o.names)
	for i := range ns {
		p := (w.o.worker*7 + g*13 + i*3) % w.o.projects
		ns[i] = soak.Name{Project: soak.Project(p), Name: fmt.Sprintf("w%d-g%d-n%02d", w.o.worker, g, i)}
	}
	return ns
}

func (w *writer) loop(ctx context.Context, g int, ns []soak.Name, done *atomic.Int64) {
	rng := rand.New(rand.NewPCG(w.o.seed, uint64(w.o.worker)<<16|uint64(g)))
	var ops int64
	for !w.stop.Load() && ctx.Err() == nil {
		n := &ns[rng.IntN(len(ns))]
		n.Attempted++
		if err := w.store.Put(ctx, n.Project, n.Name, soak.Value(w.o.worker, n.Name, n.Attempted)); err != nil {
			w.count(&w.sum.PutErrors)
			w.fail("put", err)
		} else {
			n.Acked = n.Attempted
			w.count(&w.sum.Puts)
		}
		if ops++; ops == w.o.ops {
			done.Add(1)
		}
		w.readBack(ctx, &ns[rng.IntN(len(ns))])
	}
}

// readBack reads one of the goroutine's own names and checks it holds the
// last acknowledged value (or, after a failed Put, a later attempted one).
func (w *writer) readBack(ctx context.Context, n *soak.Name) {
	if n.Acked == 0 {
		return
	}
	got, err := w.store.Get(ctx, n.Project, n.Name)
	w.count(&w.sum.Gets)
	if err != nil {
		w.count(&w.sum.GetErrors)
		w.fail("read-back", err)
		return
	}
	for seq := n.Acked; seq <= n.Attempted; seq++ {
		if bytes.Equal(got, soak.Value(w.o.worker, n.Name, seq)) {
			return
		}
	}
	w.count(&w.sum.BadValues)
	w.fail("read-back", errBadValue)
}

func (w *writer) count(c *int64) {
	w.mu.Lock()
	*c++
	w.mu.Unlock()
}

// fail counts a failure under its message: what failed and the error,
// with names and seqs left out so that repeats of one fault add up.
func (w *writer) fail(what string, err error) {
	msg := what + ": " + err.Error()
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.sum.Errors[msg]; ok || len(w.sum.Errors) < soak.MaxErrorKinds {
		w.sum.Errors[msg]++
	}
}
