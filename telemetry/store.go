package telemetry

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/trace"
)

// Store operations: the values of AttrOperation for pgstore's Put, Get and
// GetMany (one per call, however many names).
const (
	OpPut     = "put"
	OpGet     = "get"
	OpGetMany = "getmany"
)

// StoreObserver instruments pgstore's Put, Get and GetMany like Envelope's
// Encrypt and Decrypt: spans "keybroker.put", "keybroker.get" and
// "keybroker.getmany" (parents of the key-service spans they cause) and
// points in MetricOperations and MetricOperationTime. It implements
// pgstore.Observer; set it as pgstore.Config.Observer. (This package does
// not import pgstore, so using it does not pull in the PostgreSQL driver.)
type StoreObserver struct {
	t      *Telemetry
	sets   map[string]*attrSets
	starts map[string][]trace.SpanStartOption
}

// StoreObserver returns an observer for pgstore.Config.Observer.
func (t *Telemetry) StoreObserver() *StoreObserver {
	o := &StoreObserver{t: t, sets: map[string]*attrSets{}, starts: map[string][]trace.SpanStartOption{}}
	for _, op := range []string{OpPut, OpGet, OpGetMany} {
		o.sets[op] = newAttrSets(AttrOperation.String(op))
		o.starts[op] = []trace.SpanStartOption{trace.WithAttributes(AttrOperation.String(op))}
	}
	return o
}

// Start implements pgstore.Observer. Operations other than "put", "get"
// and "getmany" are not recorded.
func (o *StoreObserver) Start(ctx context.Context, op string) (context.Context, func(error)) {
	sets, ok := o.sets[op]
	if !ok {
		return ctx, func(error) {}
	}
	ctx, span := o.t.tracer.Start(ctx, "keybroker."+op, o.starts[op]...)
	start := time.Now()
	return ctx, func(err error) { o.t.record(ctx, span, start, o.t.ops, o.t.opTime, sets, err) }
}
