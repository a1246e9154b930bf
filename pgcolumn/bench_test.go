package pgcolumn_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/pgcolumn"
)

// BenchmarkOpenMany10 opens a workflow run's 10 secrets (1 KiB each, one
// project, one data key, warm cache) each iteration, in the same run:
// OpenMany of the 10 (openmany10), 10 Opens (open10x, what it replaces),
// and, as the application sees it, the SELECT of the 10 sealed rows alone
// (select10, the baseline) and followed by OpenMany (select10+openmany).
// The ops alternate within each iteration, the first one rotating. It
// reports each one's ns/op and select10+openmany-vs-select10.
func BenchmarkOpenMany10(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b)
	p := e.project(b)
	v := make([]byte, 1024)
	if _, err := rand.Read(v); err != nil {
		b.Fatal(err)
	}
	var names []string
	var rows []pgcolumn.Row
	for i := range 10 {
		name := fmt.Sprint("S", i)
		s, err := e.col.Seal(ctx, p, []string{name}, v)
		if err != nil {
			b.Fatal(err)
		}
		if err := e.insert(b, p, name, s); err != nil {
			b.Fatal(err)
		}
		names = append(names, name)
		rows = append(rows, pgcolumn.Row{Key: []string{name}, Stored: s})
	}
	selectRows := func() ([]pgcolumn.Row, error) {
		res, _ := e.pool.Query(ctx, `SELECT key, value_encrypted FROM secrets WHERE project_id = $1 AND key = ANY($2)`, p, names)
		var out []pgcolumn.Row
		var k string
		var s []byte
		_, err := pgx.ForEachRow(res, []any{&k, &s}, func() error {
			out = append(out, pgcolumn.Row{Key: []string{k}, Stored: s})
			return nil
		})
		if err == nil && len(out) != 10 {
			err = fmt.Errorf("SELECT returned %d rows", len(out))
		}
		return out, err
	}
	ops := []struct {
		name string
		run  func() error
	}{
		{"openmany10", func() error { _, err := e.col.OpenMany(ctx, p, rows); return err }},
		{"open10x", func() error {
			for _, r := range rows {
				if _, err := e.col.Open(ctx, p, r.Key, r.Stored); err != nil {
					return err
				}
			}
			return nil
		}},
		{"select10", func() error { _, err := selectRows(); return err }},
		{"select10+openmany", func() error {
			got, err := selectRows()
			if err == nil {
				_, err = e.col.OpenMany(ctx, p, got)
			}
			return err
		}},
	}
	spent := make([]time.Duration, len(ops))
	for _, op := range ops { // warm the cache and the statement cache
		if err := op.run(); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		for j := range ops {
			k := (i + j) % len(ops)
			start := time.Now()
			if err := ops[k].run(); err != nil {
				b.Fatal(err)
			}
			spent[k] += time.Since(start)
		}
	}
	n := float64(b.N)
	for k, op := range ops {
		b.ReportMetric(float64(spent[k].Nanoseconds())/n, op.name+"-ns/op")
	}
	b.ReportMetric(float64(spent[3])/float64(spent[2]), "select10+openmany-vs-select10")
	b.ReportMetric(float64(spent[1])/float64(spent[0]), "open10x-vs-openmany10")
}

// BenchmarkFence prices the column's fence trigger: each iteration
// inserts one pre-sealed 1 KiB value into MeshHook's secrets table (with
// the trigger) and one into an identical table (same indexes and foreign
// key) without it (the baseline),
// alternating which goes first, each in its own implicit transaction. It
// reports each one's ns/op and fence-vs-plain.
func BenchmarkFence(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b)
	p := e.project(b)
	if _, err := e.pool.Exec(ctx, `CREATE TABLE plain_secrets (LIKE secrets INCLUDING ALL, FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE)`); err != nil {
		b.Fatal(err)
	}
	v := make([]byte, 1024)
	if _, err := rand.Read(v); err != nil {
		b.Fatal(err)
	}
	const n = 256 // distinct sealed values, reused under fresh row keys
	sealed := make([][]byte, n)
	for i := range sealed {
		// The row key is bound into the value, but the fence does not
		// check it (only Open does): any row of the project accepts it.
		s, err := e.col.Seal(ctx, p, []string{"k"}, v)
		if err != nil {
			b.Fatal(err)
		}
		sealed[i] = s
	}
	var spent [2]time.Duration
	tables := [2]string{"secrets", "plain_secrets"}
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		for j := range 2 {
			k := (i + j) % 2
			start := time.Now()
			if _, err := e.pool.Exec(ctx, `INSERT INTO `+tables[k]+` (project_id, key, value_encrypted) VALUES ($1, $2, $3)`, p, fmt.Sprint("k", i), sealed[i%n]); err != nil {
				b.Fatal(err)
			}
			spent[k] += time.Since(start)
		}
	}
	b.ReportMetric(float64(spent[0].Nanoseconds())/float64(b.N), "fence-ns/op")
	b.ReportMetric(float64(spent[1].Nanoseconds())/float64(b.N), "plain-ns/op")
	b.ReportMetric(float64(spent[0])/float64(spent[1]), "fence-vs-plain")
}
