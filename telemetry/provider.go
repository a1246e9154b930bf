package telemetry

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/profullstack/keybroker/provider"
)

// Key-service operations: the values of AttrOperation on kms metrics.
const (
	OpWrap     = "wrap"
	OpUnwrap   = "unwrap"
	OpRewrap   = "rewrap"
	OpRotate   = "rotate"
	OpDescribe = "describe"
	OpRetire   = "retire"
)

// WrapProvider returns p instrumented: every key-service call is counted
// and timed (MetricKMSCalls, MetricKMSTime) and traced (span
// "keybroker.kms.<operation>") with p's backend scheme, the operation and
// the outcome as attributes. The result has the same Ref as p (so a
// provider.Keyring routes to it as it would to p) and implements exactly
// the optional interfaces p implements (Rotator, Rewrapper, Describer,
// Retirer): a type assertion on it answers as one on p would. p must not
// be nil. Wrapping
// a *provider.Keyring hides its Keyring methods; wrap its members instead
// (see Keyring).
func (t *Telemetry) WrapProvider(p provider.KEKProvider) provider.KEKProvider {
	b := &base{t: t, p: p, backend: AttrBackend.String(p.Ref().Provider), ops: map[string]*kmsOp{}}
	for _, op := range []string{OpWrap, OpUnwrap, OpRewrap, OpRotate, OpDescribe, OpRetire} {
		b.ops[op] = &kmsOp{
			span: "keybroker.kms." + op,
			start: []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindClient),
				trace.WithAttributes(b.backend, AttrOperation.String(op))},
			sets: newAttrSets(b.backend, AttrOperation.String(op)),
		}
	}
	rot, _ := p.(provider.Rotator)
	rw, _ := p.(provider.Rewrapper)
	d, _ := p.(provider.Describer)
	ret, _ := p.(provider.Retirer)
	// One type per combination of optional interfaces, so none is claimed
	// that p lacks.
	var mask int
	for i, has := range []bool{rot != nil, rw != nil, d != nil, ret != nil} {
		if has {
			mask |= 1 << i
		}
	}
	r, w, de, re := rotator{b}, rewrapper{b}, describer{b}, retirer{b}
	switch mask {
	case 0b0000:
		return b
	case 0b0001:
		return struct {
			*base
			rotator
		}{b, r}
	case 0b0010:
		return struct {
			*base
			rewrapper
		}{b, w}
	case 0b0011:
		return struct {
			*base
			rotator
			rewrapper
		}{b, r, w}
	case 0b0100:
		return struct {
			*base
			describer
		}{b, de}
	case 0b0101:
		return struct {
			*base
			rotator
			describer
		}{b, r, de}
	case 0b0110:
		return struct {
			*base
			rewrapper
			describer
		}{b, w, de}
	case 0b0111:
		return struct {
			*base
			rotator
			rewrapper
			describer
		}{b, r, w, de}
	case 0b1000:
		return struct {
			*base
			retirer
		}{b, re}
	case 0b1001:
		return struct {
			*base
			rotator
			retirer
		}{b, r, re}
	case 0b1010:
		return struct {
			*base
			rewrapper
			retirer
		}{b, w, re}
	case 0b1011:
		return struct {
			*base
			rotator
			rewrapper
			retirer
		}{b, r, w, re}
	case 0b1100:
		return struct {
			*base
			describer
			retirer
		}{b, de, re}
	case 0b1101:
		return struct {
			*base
			rotator
			describer
			retirer
		}{b, r, de, re}
	case 0b1110:
		return struct {
			*base
			rewrapper
			describer
			retirer
		}{b, w, de, re}
	default:
		return struct {
			*base
			rotator
			rewrapper
			describer
			retirer
		}{b, r, w, de, re}
	}
}

// Keyring builds a provider.Keyring of instrumented providers (see
// WrapProvider): primary wraps, decryptOnly only unwrap.
func (t *Telemetry) Keyring(primary provider.KEKProvider, decryptOnly ...provider.KEKProvider) (*provider.Keyring, error) {
	if primary == nil {
		return provider.NewKeyring(nil) // its error names the problem
	}
	w := make([]provider.KEKProvider, len(decryptOnly))
	for i, p := range decryptOnly {
		if p != nil {
			w[i] = t.WrapProvider(p)
		}
	}
	return provider.NewKeyring(t.WrapProvider(primary), w...)
}

type base struct {
	t       *Telemetry
	p       provider.KEKProvider
	backend attribute.KeyValue
	ops     map[string]*kmsOp
}

// kmsOp is what recording one key-service operation needs, made once.
type kmsOp struct {
	span  string
	start []trace.SpanStartOption
	sets  *attrSets
}

var _ provider.KEKProvider = (*base)(nil)

// start opens a key-service span; done records it.
func (b *base) start(ctx context.Context, op string) (context.Context, trace.Span, time.Time) {
	o := b.ops[op]
	ctx, span := b.t.tracer.Start(ctx, o.span, o.start...)
	return ctx, span, time.Now()
}

func (b *base) done(ctx context.Context, span trace.Span, start time.Time, op string, err error) {
	b.t.record(ctx, span, start, b.t.kmsCalls, b.t.kmsTime, b.ops[op].sets, err)
}

func (b *base) Ref() provider.KeyRef { return b.p.Ref() }

func (b *base) Wrap(ctx context.Context, dek, aad []byte) (*provider.WrappedKey, error) {
	ctx, span, start := b.start(ctx, OpWrap)
	wk, err := b.p.Wrap(ctx, dek, aad)
	b.done(ctx, span, start, OpWrap, err)
	return wk, err
}

func (b *base) Unwrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) ([]byte, error) {
	ctx, span, start := b.start(ctx, OpUnwrap)
	dek, err := b.p.Unwrap(ctx, wk, aad)
	b.done(ctx, span, start, OpUnwrap, err)
	return dek, err
}

type rotator struct{ *base }

func (r rotator) Rotate(ctx context.Context) (string, error) {
	ctx, span, start := r.start(ctx, OpRotate)
	v, err := r.p.(provider.Rotator).Rotate(ctx)
	r.done(ctx, span, start, OpRotate, err)
	return v, err
}

type rewrapper struct{ *base }

func (r rewrapper) Rewrap(ctx context.Context, wk *provider.WrappedKey, aad []byte) (*provider.WrappedKey, error) {
	ctx, span, start := r.start(ctx, OpRewrap)
	out, err := r.p.(provider.Rewrapper).Rewrap(ctx, wk, aad)
	r.done(ctx, span, start, OpRewrap, err)
	return out, err
}

type describer struct{ *base }

func (d describer) Describe(ctx context.Context) (provider.Status, error) {
	ctx, span, start := d.start(ctx, OpDescribe)
	s, err := d.p.(provider.Describer).Describe(ctx)
	d.done(ctx, span, start, OpDescribe, err)
	return s, err
}

type retirer struct{ *base }

func (r retirer) Retire(ctx context.Context, version string) error {
	ctx, span, start := r.start(ctx, OpRetire)
	err := r.p.(provider.Retirer).Retire(ctx, version)
	r.done(ctx, span, start, OpRetire, err)
	return err
}
