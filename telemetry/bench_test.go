//go:build unix

package telemetry_test

import (
	"context"
	"syscall"
	"testing"
	"time"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/provider/local"
	"github.com/profullstack/keybroker/telemetry"
)

// BenchmarkEncrypt1KiB measures instrumentation overhead on a 1 KiB
// Envelope.Encrypt (a cached DEK, so no key-service call): the baseline is
// the uninstrumented Envelope in the same run; "noop" is the default (no
// SDK installed); "sdk" records metrics into an SDK MeterProvider and
// samples every span into an SDK TracerProvider with no exporter.
func BenchmarkEncrypt1KiB(b *testing.B) {
	ctx := context.Background()
	kek, err := local.Generate("bench")
	if err != nil {
		b.Fatal(err)
	}
	pt, aad := make([]byte, 1024), []byte("project=42,name=stripe")
	type encrypter interface {
		Encrypt(context.Context, []byte, []byte) ([]byte, error)
	}
	run := func(b *testing.B, e encrypter) {
		b.SetBytes(int64(len(pt)))
		b.ReportAllocs()
		start := cpuTime(b)
		for b.Loop() {
			if _, err := e.Encrypt(ctx, pt, aad); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64((cpuTime(b)-start).Nanoseconds())/float64(b.N), "cpu-ns/op")
	}
	newEnv := func(b *testing.B) *envelope.Envelope {
		e, err := envelope.New(kek)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { e.Close() })
		return e
	}
	b.Run("baseline", func(b *testing.B) { run(b, newEnv(b)) })
	b.Run("noop", func(b *testing.B) {
		tel, err := telemetry.New()
		if err != nil {
			b.Fatal(err)
		}
		e, err := tel.Envelope(newEnv(b))
		if err != nil {
			b.Fatal(err)
		}
		run(b, e)
	})
	b.Run("sdk", func(b *testing.B) {
		mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
		tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()))
		b.Cleanup(func() { mp.Shutdown(ctx); tp.Shutdown(ctx) })
		tel, err := telemetry.New(telemetry.WithMeterProvider(mp), telemetry.WithTracerProvider(tp))
		if err != nil {
			b.Fatal(err)
		}
		e, err := tel.Envelope(newEnv(b))
		if err != nil {
			b.Fatal(err)
		}
		run(b, e)
	})
}

// cpuTime is the process's CPU time: on a shared machine the wall clock
// includes time spent waiting for a core, CPU time does not.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
