package telemetry

import (
	"context"
	"errors"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/profullstack/keybroker/envelope"
)

// Envelope operations: the values of AttrOperation on operation metrics.
const (
	OpEncrypt = "encrypt"
	OpDecrypt = "decrypt"
)

// Envelope is an *envelope.Envelope whose Encrypt and Decrypt are counted,
// timed (MetricOperations, MetricOperationTime) and traced (spans
// "keybroker.encrypt", "keybroker.decrypt"), and whose DEK cache and budget
// are observed (component "envelope"). Wrap the Envelope's KEK provider
// with WrapProvider to see the key-service calls too, as child spans.
type Envelope struct {
	e        *envelope.Envelope
	t        *Telemetry
	reg      metric.Registration
	enc, dec *attrSets
	// Span start options, as slices made once: passing a fresh variadic
	// slice through the tracer interface would allocate per call.
	encStart, decStart []trace.SpanStartOption
}

// Envelope instruments e. Close the result (not e) to stop observing it.
func (t *Telemetry) Envelope(e *envelope.Envelope) (*Envelope, error) {
	if e == nil {
		return nil, errors.New("telemetry: nil envelope")
	}
	comp := metric.WithAttributeSet(attribute.NewSet(AttrComponent.String("envelope")))
	reg, err := t.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		s := e.Stats()
		o.ObserveInt64(t.hits, int64(s.Cache.Hits), comp)
		o.ObserveInt64(t.misses, int64(s.Cache.Misses), comp)
		o.ObserveInt64(t.evictions, int64(s.Cache.Evictions), comp)
		o.ObserveInt64(t.entries, int64(s.Cache.Entries), comp)
		o.ObserveInt64(t.budgetUsed, int64(s.ActiveMessages), comp)
		o.ObserveInt64(t.budgetLimit, int64(s.MaxMessages), comp)
		return nil
	}, t.hits, t.misses, t.evictions, t.entries, t.budgetUsed, t.budgetLimit)
	if err != nil {
		return nil, err
	}
	return &Envelope{
		e: e, t: t, reg: reg,
		enc:      newAttrSets(AttrOperation.String(OpEncrypt)),
		dec:      newAttrSets(AttrOperation.String(OpDecrypt)),
		encStart: []trace.SpanStartOption{trace.WithAttributes(AttrOperation.String(OpEncrypt))},
		decStart: []trace.SpanStartOption{trace.WithAttributes(AttrOperation.String(OpDecrypt))},
	}, nil
}

// Encrypt is envelope.Envelope.Encrypt, instrumented.
func (e *Envelope) Encrypt(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	ctx, span := e.t.tracer.Start(ctx, "keybroker.encrypt", e.encStart...)
	start := time.Now()
	out, err := e.e.Encrypt(ctx, plaintext, aad)
	e.t.record(ctx, span, start, e.t.ops, e.t.opTime, e.enc, err)
	return out, err
}

// Decrypt is envelope.Envelope.Decrypt, instrumented.
func (e *Envelope) Decrypt(ctx context.Context, blob, aad []byte) ([]byte, error) {
	ctx, span := e.t.tracer.Start(ctx, "keybroker.decrypt", e.decStart...)
	start := time.Now()
	out, err := e.e.Decrypt(ctx, blob, aad)
	e.t.record(ctx, span, start, e.t.ops, e.t.opTime, e.dec, err)
	return out, err
}

// Stats is envelope.Envelope.Stats.
func (e *Envelope) Stats() envelope.Stats { return e.e.Stats() }

// Close stops observing the Envelope and closes it.
func (e *Envelope) Close() error {
	return errors.Join(e.reg.Unregister(), e.e.Close())
}
