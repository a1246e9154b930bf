package pgcolumn_test

import (
	"context"
	"testing"
	"time"

	"github.com/profullstack/keybroker/internal/meshhook"
	"github.com/profullstack/keybroker/pgcolumn"
)

// BenchmarkMigrateLegacy migrates issue 13's 20,000 MeshHook rows (Node's
// v1 values and plaintexts over 50 projects) in place with the default
// settings, against the same-run baseline of a plain UPDATE of the same
// rows to ready-made sealed values in transactions of as many rows, fence
// trigger included: the difference is reading, decoding, sealing,
// verifying and auditing. Each iteration starts from the legacy table
// (restored and analyzed outside the timer). Reports rows/s.
// plain-update-no-fence is the baseline without the fence trigger, to show
// its share.
func BenchmarkMigrateLegacy(b *testing.B) {
	ctx := context.Background()
	e := newEnv(b)
	f, dec := legacyFixture(b, e, meshhook.Standard())
	// Ready-made sealed values for the baseline.
	ps, ks := make([]string, len(f.Rows)), make([]string, len(f.Rows))
	sealed := make([][]byte, len(f.Rows))
	for i, r := range f.Rows {
		s, err := e.col.Seal(ctx, r.Project, []string{r.Key}, r.Plaintext)
		if err != nil {
			b.Fatal(err)
		}
		ps[i], ks[i], sealed[i] = r.Project, r.Key, s
	}
	restore := func(b *testing.B) {
		b.Helper()
		if _, err := e.pool.Exec(ctx, `TRUNCATE projects CASCADE`); err != nil {
			b.Fatal(err)
		}
		if err := meshhook.Load(ctx, e.pool, "public", f); err != nil {
			b.Fatal(err)
		}
		if _, err := e.pool.Exec(ctx, `VACUUM ANALYZE secrets`); err != nil {
			b.Fatal(err)
		}
	}
	rows := func(b *testing.B, run func() (int64, error)) {
		var elapsed time.Duration
		for b.Loop() {
			b.StopTimer()
			restore(b)
			b.StartTimer()
			start := time.Now()
			n, err := run()
			elapsed += time.Since(start)
			if err != nil || n != int64(len(f.Rows)) {
				b.Fatalf("%d rows, %v", n, err)
			}
		}
		b.ReportMetric(float64(len(f.Rows)*b.N)/elapsed.Seconds(), "rows/s")
	}
	b.Run("migrate", func(b *testing.B) {
		rows(b, func() (int64, error) {
			res, err := e.col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: dec})
			return res.Migrated, err
		})
	})
	plain := func() (int64, error) {
		var n int64
		for lo := 0; lo < len(f.Rows); lo += pgcolumn.DefaultMigrateBatch {
			hi := min(lo+pgcolumn.DefaultMigrateBatch, len(f.Rows))
			ct, err := e.pool.Exec(ctx, `UPDATE secrets t SET value_encrypted = u.v FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(p, k, v)
WHERE t.project_id = u.p::uuid AND t.key = u.k`, ps[lo:hi], ks[lo:hi], sealed[lo:hi])
			if err != nil {
				return n, err
			}
			n += ct.RowsAffected()
		}
		return n, nil
	}
	b.Run("plain-update", func(b *testing.B) { rows(b, plain) })
	// Diagnostic: the same UPDATE with the fence trigger disabled, to show
	// what the trigger costs per row.
	b.Run("plain-update-no-fence", func(b *testing.B) {
		if _, err := e.pool.Exec(ctx, `ALTER TABLE secrets DISABLE TRIGGER USER`); err != nil {
			b.Fatal(err)
		}
		defer e.pool.Exec(ctx, `ALTER TABLE secrets ENABLE TRIGGER USER`)
		rows(b, plain)
	})
}
