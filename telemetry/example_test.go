package telemetry_test

import (
	"context"
	"fmt"
	"log"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/provider/local"
	"github.com/profullstack/keybroker/telemetry"
)

// Instrument an Envelope and its KEK provider, then read the metrics. An
// application would install its exporter's MeterProvider globally (or
// pass it, as here) instead of a ManualReader.
func Example() {
	ctx := context.Background()
	reader := sdkmetric.NewManualReader()
	tel, err := telemetry.New(telemetry.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
	if err != nil {
		log.Fatal(err)
	}
	kek, err := local.Generate("meshhook")
	if err != nil {
		log.Fatal(err)
	}
	raw, err := envelope.New(tel.WrapProvider(kek))
	if err != nil {
		log.Fatal(err)
	}
	env, err := tel.Envelope(raw)
	if err != nil {
		log.Fatal(err)
	}
	defer env.Close()
	for range 3 {
		if _, err := env.Encrypt(ctx, []byte("webhook signing secret"), []byte("project=42")); err != nil {
			log.Fatal(err)
		}
	}

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		log.Fatal(err)
	}
	for _, m := range rm.ScopeMetrics[0].Metrics {
		if sum, ok := m.Data.(metricdata.Sum[int64]); ok && sum.IsMonotonic {
			for _, p := range sum.DataPoints {
				op, _ := p.Attributes.Value(telemetry.AttrOperation)
				out, _ := p.Attributes.Value(telemetry.AttrOutcome)
				if op.String() != "" {
					fmt.Println(m.Name, op.String(), out.String(), p.Value)
				}
			}
		}
	}
	// Unordered output:
	// keybroker.kms.calls wrap ok 1
	// keybroker.operations encrypt ok 3
}
