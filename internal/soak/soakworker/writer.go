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

	_ "github.com/profullstack/keybroker/provider/awskms" // a project's own KEK (TestSoak/tenant)
	_ "github.com/profullstack/keybroker/provider/local"
	_ "github.com/profullstack/keybroker/provider/vault"
)

// writer is one writer process: goroutines writing and reading back their
// own names.
type writer struct {
	o     options
	store *pgstore.Store
	stop  atomic.Bool

	mu     sync.Mutex
	sum    soak.WriterSummary
	ackLog *os.File // -ack-log, or nil; written under mu
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
	if o.ackLog != "" {
		if w.ackLog, err = os.OpenFile(o.ackLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600); err != nil {
			return nil, err
		}
		defer w.ackLog.Close()
	}

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
		pctx, cancel := w.opContext(ctx)
		n, err := operatorCycles(pctx, pool)
		cancel()
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
		if err := w.put(ctx, n); err != nil {
			w.count(&w.sum.PutErrors)
			w.fail("put", err)
		} else {
			n.Acked = n.Attempted
			w.acked(n)
		}
		if ops++; ops == w.o.ops {
			done.Add(1)
		}
		w.readBack(ctx, &ns[rng.IntN(len(ns))])
	}
}

// put writes n's next value (seq n.Attempted), within -op-timeout.
func (w *writer) put(ctx context.Context, n *soak.Name) error {
	ctx, cancel := w.opContext(ctx)
	defer cancel()
	return w.store.Put(ctx, n.Project, n.Name, soak.Value(w.o.worker, n.Name, n.Attempted))
}

// opContext bounds one operation by -op-timeout, when set.
func (w *writer) opContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if w.o.opTimeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, w.o.opTimeout)
}

// readBack reads one of the goroutine's own names and checks it holds the
// last acknowledged value (or, after a failed Put, a later attempted one).
func (w *writer) readBack(ctx context.Context, n *soak.Name) {
	if n.Acked == 0 {
		return
	}
	ctx, cancel := w.opContext(ctx)
	defer cancel()
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

// acked counts an acknowledged Put and appends it to the ack log. A
// failed log write ends the run's usefulness, so it is counted as an error
// the test sees.
func (w *writer) acked(n *soak.Name) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.sum.Puts++
	if w.ackLog == nil {
		return
	}
	if _, err := fmt.Fprintf(w.ackLog, "%s %s %d\n", n.Project, n.Name, n.Acked); err != nil {
		w.sum.Errors["ack log: "+err.Error()]++
	}
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
