package telemetry

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/provider"
)

// ScopeName is the instrumentation scope of every meter and tracer here.
const ScopeName = "github.com/profullstack/keybroker/telemetry"

// Metric names. Durations are in seconds.
const (
	MetricOperations     = "keybroker.operations"          // counter: encrypt/decrypt by outcome
	MetricOperationTime  = "keybroker.operation.duration"  // histogram (s)
	MetricKMSCalls       = "keybroker.kms.calls"           // counter: key-service calls by backend, operation, outcome
	MetricKMSTime        = "keybroker.kms.duration"        // histogram (s)
	MetricCacheHits      = "keybroker.dek_cache.hits"      // observable counter
	MetricCacheMisses    = "keybroker.dek_cache.misses"    // observable counter
	MetricCacheEvictions = "keybroker.dek_cache.evictions" // observable counter
	MetricCacheEntries   = "keybroker.dek_cache.entries"   // observable gauge
	MetricBudgetUsed     = "keybroker.dek.budget.used"     // observable gauge: messages sealed by the active DEK
	MetricBudgetLimit    = "keybroker.dek.budget.limit"    // observable gauge: the DEK message budget
	MetricProgressDone   = "keybroker.progress.done"       // gauge: items done by a rewrap, re-encryption or migration
	MetricProgressTotal  = "keybroker.progress.total"      // gauge: items it set out to do
)

// Attribute keys. Their values come from fixed sets (see the package
// documentation); none is derived from data, keys or names.
const (
	AttrOperation = attribute.Key("keybroker.operation")
	AttrOutcome   = attribute.Key("keybroker.outcome")
	AttrBackend   = attribute.Key("keybroker.backend")
	AttrComponent = attribute.Key("keybroker.component")
)

// Outcomes: the values of AttrOutcome. A decryption (Envelope's Decrypt,
// pgstore's Get) whose ciphertext or data key was altered, moved, or wrapped
// under a key the keyring lacks has outcome decrypt_failed in
// MetricOperations, whichever it was; the key-service call such a data key
// caused has the service's own verdict (invalid_ciphertext or
// key_not_found) in MetricKMSCalls.
const (
	OutcomeOK                = "ok"
	OutcomeDecryptFailed     = "decrypt_failed" // envelope.ErrDecrypt
	OutcomeKeyNotFound       = "key_not_found"  // provider.ErrKeyNotFound
	OutcomeAccessDenied      = "access_denied"
	OutcomeKeyDisabled       = "key_disabled"
	OutcomeUnavailable       = "unavailable"
	OutcomeInvalidCiphertext = "invalid_ciphertext" // provider.ErrInvalidCiphertext
	OutcomeCanceled          = "canceled"
	OutcomeDeadline          = "deadline_exceeded"
	OutcomeClosed            = "closed"
	OutcomeError             = "error" // anything else, for example bad input
)

// outcomes lists every Outcome value; outcomeIndex indexes it.
var outcomes = [...]string{OutcomeOK, OutcomeCanceled, OutcomeDeadline, OutcomeDecryptFailed, OutcomeClosed,
	OutcomeUnavailable, OutcomeKeyNotFound, OutcomeAccessDenied, OutcomeKeyDisabled, OutcomeInvalidCiphertext, OutcomeError}

// Outcome classifies err into one of the Outcome constants. It looks only
// at error identity (errors.Is), never at the message.
func Outcome(err error) string { return outcomes[outcomeIndex(err)] }

func outcomeIndex(err error) int {
	if err == nil {
		return 0
	}
	for i, target := range [...]error{context.Canceled, context.DeadlineExceeded, envelope.ErrDecrypt, envelope.ErrClosed,
		provider.ErrUnavailable, provider.ErrKeyNotFound, provider.ErrAccessDenied, provider.ErrKeyDisabled, provider.ErrInvalidCiphertext} {
		if errors.Is(err, target) {
			return i + 1
		}
	}
	return len(outcomes) - 1
}

// attrSets holds one operation's metric attribute sets, one per outcome,
// as ready-made option slices: recording passes them on without allocating.
type attrSets struct {
	add    [len(outcomes)][]metric.AddOption
	record [len(outcomes)][]metric.RecordOption
}

func newAttrSets(attrs ...attribute.KeyValue) *attrSets {
	var s attrSets
	for i, o := range outcomes {
		set := metric.WithAttributeSet(attribute.NewSet(append(attrs[:len(attrs):len(attrs)], AttrOutcome.String(o))...))
		s.add[i] = []metric.AddOption{set}
		s.record[i] = []metric.RecordOption{set}
	}
	return &s
}

// Option configures New.
type Option func(*config)

type config struct {
	mp metric.MeterProvider
	tp trace.TracerProvider
}

// WithMeterProvider records metrics with mp instead of the global
// MeterProvider (otel.GetMeterProvider, a no-op until the application
// installs one).
func WithMeterProvider(mp metric.MeterProvider) Option { return func(c *config) { c.mp = mp } }

// WithTracerProvider records spans with tp instead of the global
// TracerProvider (otel.GetTracerProvider, a no-op until the application
// installs one).
func WithTracerProvider(tp trace.TracerProvider) Option { return func(c *config) { c.tp = tp } }

// Telemetry holds the instruments. Make one per process (or per provider
// pair) with New and share it; it is safe for concurrent use.
type Telemetry struct {
	meter  metric.Meter
	tracer trace.Tracer

	ops, kmsCalls                    metric.Int64Counter
	opTime, kmsTime                  metric.Float64Histogram
	hits, misses, evictions          metric.Int64ObservableCounter
	entries, budgetUsed, budgetLimit metric.Int64ObservableGauge
	progressDone, progressTotal      metric.Int64Gauge
}

// New creates the instruments. With no options it uses the global otel
// providers, so instrumentation costs little until the application
// installs real ones.
func New(opts ...Option) (*Telemetry, error) {
	var c config
	for _, o := range opts {
		o(&c)
	}
	if c.mp == nil {
		c.mp = otel.GetMeterProvider()
	}
	if c.tp == nil {
		c.tp = otel.GetTracerProvider()
	}
	t := &Telemetry{meter: c.mp.Meter(ScopeName), tracer: c.tp.Tracer(ScopeName)}
	m := t.meter
	// Latency buckets from 50µs (a cached in-process encrypt) to 10 s (a
	// key-service call that times out).
	buckets := metric.WithExplicitBucketBoundaries(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
	var errs []error
	add := func(err error) { errs = append(errs, err) }
	var err error
	t.ops, err = m.Int64Counter(MetricOperations, metric.WithUnit("{operation}"), metric.WithDescription("Encryptions and decryptions, by operation and outcome."))
	add(err)
	t.opTime, err = m.Float64Histogram(MetricOperationTime, metric.WithUnit("s"), metric.WithDescription("Duration of encryptions and decryptions, including any key-service call they made."), buckets)
	add(err)
	t.kmsCalls, err = m.Int64Counter(MetricKMSCalls, metric.WithUnit("{call}"), metric.WithDescription("Key-service calls, by backend, operation and outcome."))
	add(err)
	t.kmsTime, err = m.Float64Histogram(MetricKMSTime, metric.WithUnit("s"), metric.WithDescription("Duration of key-service calls."), buckets)
	add(err)
	t.hits, err = m.Int64ObservableCounter(MetricCacheHits, metric.WithUnit("{hit}"), metric.WithDescription("Data-key cache hits."))
	add(err)
	t.misses, err = m.Int64ObservableCounter(MetricCacheMisses, metric.WithUnit("{miss}"), metric.WithDescription("Data-key cache misses (each one key-service unwrap, coalesced)."))
	add(err)
	t.evictions, err = m.Int64ObservableCounter(MetricCacheEvictions, metric.WithUnit("{eviction}"), metric.WithDescription("Data keys dropped from the cache for capacity or age."))
	add(err)
	t.entries, err = m.Int64ObservableGauge(MetricCacheEntries, metric.WithUnit("{key}"), metric.WithDescription("Unwrapped data keys held in the cache."))
	add(err)
	t.budgetUsed, err = m.Int64ObservableGauge(MetricBudgetUsed, metric.WithUnit("{message}"), metric.WithDescription("Messages sealed by the active data key."))
	add(err)
	t.budgetLimit, err = m.Int64ObservableGauge(MetricBudgetLimit, metric.WithUnit("{message}"), metric.WithDescription("Messages a data key may seal before a fresh one is made."))
	add(err)
	t.progressDone, err = m.Int64Gauge(MetricProgressDone, metric.WithUnit("{item}"), metric.WithDescription("Items a rewrap, re-encryption or plaintext migration has done so far."))
	add(err)
	t.progressTotal, err = m.Int64Gauge(MetricProgressTotal, metric.WithUnit("{item}"), metric.WithDescription("Items a rewrap, re-encryption or plaintext migration set out to do."))
	add(err)
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("telemetry: create instruments: %w", err)
	}
	return t, nil
}

// record ends an operation: one span end, one count, one duration.
func (t *Telemetry) record(ctx context.Context, span trace.Span, start time.Time, counter metric.Int64Counter, hist metric.Float64Histogram, sets *attrSets, err error) {
	i := outcomeIndex(err)
	counter.Add(ctx, 1, sets.add[i]...)
	hist.Record(ctx, time.Since(start).Seconds(), sets.record[i]...)
	if span.IsRecording() {
		span.SetAttributes(AttrOutcome.String(outcomes[i]))
		if err != nil {
			// The outcome, never err.Error(): native messages may name
			// keys or echo what a backend received.
			span.SetStatus(codes.Error, outcomes[i])
		}
	}
	span.End()
}

// ObserveCache reports a data-key cache's counters (from stats, for example
// pgstore's Store.CacheStats or a KeyCache's Stats) as the dek_cache
// metrics, with component as AttrComponent. component must be a constant
// naming the cache's owner ("pgstore", "envelope"), never a tenant or key.
// Unregister the returned registration when the cache is closed.
func (t *Telemetry) ObserveCache(component string, stats func() envelope.CacheStats) (metric.Registration, error) {
	set := metric.WithAttributeSet(attribute.NewSet(AttrComponent.String(component)))
	return t.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		s := stats()
		o.ObserveInt64(t.hits, int64(s.Hits), set)
		o.ObserveInt64(t.misses, int64(s.Misses), set)
		o.ObserveInt64(t.evictions, int64(s.Evictions), set)
		o.ObserveInt64(t.entries, int64(s.Entries), set)
		return nil
	}, t.hits, t.misses, t.evictions, t.entries)
}

// Progress returns a function that records a long operation's progress as
// the progress gauges, with operation (a constant such as "rewrap",
// "reencrypt", "migrate_plaintext") as AttrOperation. Call it from the
// Progress callback of pgstore's options, for example
//
//	rec := tel.Progress("rewrap")
//	opts.Progress = func(p pgstore.RewrapProgress) { rec(ctx, p.Done, p.Total) }
func (t *Telemetry) Progress(operation string) func(ctx context.Context, done, total int64) {
	set := metric.WithAttributeSet(attribute.NewSet(AttrOperation.String(operation)))
	return func(ctx context.Context, done, total int64) {
		t.progressDone.Record(ctx, done, set)
		t.progressTotal.Record(ctx, total, set)
	}
}
