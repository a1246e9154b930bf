package server

import (
	"context"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5/pgtype"

	"github.com/profullstack/keybroker/internal/cpumeter"
)

// logCounters returns the access-log statements run so far and the rows
// offered to them.
func logCounters(s *Server) (statements, rows int64) {
	return s.audit.log.statements.Load(), s.audit.log.rows.Load()
}

// benchMeter measures this process's CPU and that of the test server's
// postmaster and backends (pgtest's server runs on this machine).
func benchMeter(b *testing.B, e *env) cpumeter.Meter {
	b.Helper()
	var dir string
	if err := e.tokens.pool.QueryRow(context.Background(), `SELECT current_setting('data_directory')`).Scan(&dir); err != nil {
		b.Fatal(err)
	}
	pid, err := cpumeter.PostmasterPID(dir)
	if err != nil {
		b.Fatalf("server CPU: %v (the benchmark needs the server on this machine)", err)
	}
	return cpumeter.Meter{Postmaster: pid}
}

// BenchmarkAccessLogInsert: the CPU (this process and the PostgreSQL
// server's backends) per access_log row of the single-row INSERT ...
// VALUES (a batch of one), of one INSERT ... SELECT FROM unnest of 1, 8
// or 64 rows (insertMany; the batcher uses it from 2 rows on), run from
// one goroutine, so the figures are the statements' cost, not the
// batching's; and of one row at a time through record (VALUES, plus the
// hand-off to a flusher and back).
func BenchmarkAccessLogInsert(b *testing.B) {
	e := newEnv(b, nil)
	_, id := e.createToken(nil, OpRead)
	raw, err := hex.DecodeString(id)
	if err != nil {
		b.Fatal(err)
	}
	var tok [tokenIDLen]byte
	copy(tok[:], raw)
	meter := benchMeter(b, e)
	ctx := context.Background()
	lb := e.srv.audit.log
	cpu := func(b *testing.B, rows int, run func()) {
		c0, s0 := meter.Sample()
		run()
		c1, s1 := meter.Sample()
		b.ReportMetric(float64((c1-c0)+(s1-s0))/1e3/float64(b.N*rows), "cpu-µs/row")
		b.ReportMetric(0, "ns/op")
	}
	b.Run("values", func(b *testing.B) {
		cpu(b, 1, func() {
			for range b.N {
				if _, err := e.tokens.pool.Exec(ctx, `INSERT INTO keybroker.access_log (token_id, project_id, names, operation, outcome)
VALUES ($1, $2, $3, $4, $5)`, pgtype.UUID{Bytes: tok, Valid: true}, "bench", []string{"name"}, "get", "ok"); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	// The same row through the flushers, as a request sends it: one
	// goroutine, so every row is a batch of one.
	b.Run("record", func(b *testing.B) {
		cpu(b, 1, func() {
			for range b.N {
				if err := lb.record(ctx, logRow{token: tok, project: "bench", names: []string{"name"}, op: "get", outcome: "ok"}); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	for _, n := range []int{1, 8, 64} {
		batch := make([]*waiter, n)
		for i := range batch {
			batch[i] = &waiter{row: logRow{token: tok, project: "bench", names: []string{"name"}, op: "get", outcome: "ok"}}
		}
		b.Run(fmt.Sprintf("unnest/rows=%d", n), func(b *testing.B) {
			cpu(b, n, func() {
				for range b.N {
					if err := lb.insertMany(ctx, batch); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}
