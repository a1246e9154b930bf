package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
)

// legacy creates public.legacy_secrets (id, project, secret_name, value)
// with n rows over 3 projects.
func legacy(t testing.TB, pool *pgxpool.Pool, valueType string, n int) {
	t.Helper()
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE legacy_secrets (id bigint PRIMARY KEY, project text, secret_name text, value `+valueType+`)`); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO legacy_secrets SELECT g, 'proj' || (g % 3), 'name' || g, `+
		map[string]string{"bytea": `convert_to('value-' || g, 'UTF8')`, "text": `'välue-' || g`}[valueType]+
		` FROM generate_series(1, $1) g`, n); err != nil {
		t.Fatal(err)
	}
}

var legacySource = pgstore.PlaintextSource{Table: "public.legacy_secrets", KeyColumn: "id", ProjectColumn: "project", NameColumn: "secret_name", ValueColumn: "value"}

func TestMigratePlaintext(t *testing.T) {
	for _, typ := range []string{"bytea", "text"} {
		t.Run(typ, func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t, pgstore.Config{})
			legacy(t, e.pool, typ, 50)
			// A secret already stored with the legacy value, and one with another value.
			want := func(g int) string {
				if typ == "text" {
					return fmt.Sprintf("välue-%d", g)
				}
				return fmt.Sprintf("value-%d", g)
			}
			if err := e.store.Put(ctx, "proj1", "name1", []byte(want(1))); err != nil {
				t.Fatal(err)
			}
			if err := e.store.Put(ctx, "proj2", "name2", []byte("newer")); err != nil {
				t.Fatal(err)
			}
			before := snapshot(t, e.pool)
			res, err := e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{DryRun: true})
			if err != nil || res.Pending != 50 || res.Migrated != 0 {
				t.Fatalf("dry run: %+v, %v", res, err)
			}
			if snapshot(t, e.pool) != before {
				t.Fatal("dry run wrote")
			}
			var progress []pgstore.MigrateProgress
			res, err = e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{BatchSize: 7, ClearPlaintext: true,
				Progress: func(p pgstore.MigrateProgress) { progress = append(progress, p) }})
			if err != nil {
				t.Fatal(err)
			}
			if res.Migrated != 48 || res.AlreadyPresent != 1 || res.Conflicts != 1 || res.Cleared != 49 || res.LastKey != "50" {
				t.Fatalf("result: %+v", res)
			}
			if want := []pgstore.MigrateConflict{{Key: "2", Project: "proj2", Name: "name2"}}; !slices.Equal(res.ConflictRows, want) {
				t.Fatalf("conflict rows %+v, want %+v", res.ConflictRows, want)
			}
			if len(progress) != 8 || progress[7].Done != 50 || progress[7].LastKey != "50" {
				t.Fatalf("progress: %+v", progress)
			}
			// Only the conflicting row keeps its plaintext.
			if n := count(t, e.pool, `SELECT count(*) FROM legacy_secrets WHERE value IS NOT NULL`); n != 1 {
				t.Fatalf("%d plaintext values left", n)
			}
			if n := count(t, e.pool, `SELECT count(*) FROM legacy_secrets WHERE value IS NOT NULL AND id = 2`); n != 1 {
				t.Fatal("the conflicting row was cleared")
			}
			fresh := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
			for g := 1; g <= 50; g++ {
				got, err := fresh.Get(ctx, fmt.Sprintf("proj%d", g%3), fmt.Sprintf("name%d", g))
				w := want(g)
				if g == 2 {
					w = "newer"
				}
				if err != nil || string(got) != w {
					t.Fatalf("row %d: %q, %v", g, got, err)
				}
			}
			// Idempotent: a second run finds only the conflict.
			res, err = e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{ClearPlaintext: true})
			if err != nil || res.Pending != 1 || res.Migrated != 0 || res.Conflicts != 1 {
				t.Fatalf("second run: %+v, %v", res, err)
			}
		})
	}
}

// Without clearing, a re-run (or a resume from the start) rewrites nothing.
func TestMigratePlaintextResume(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	legacy(t, e.pool, "bytea", 30)
	var last pgstore.MigrateProgress
	res, err := e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{BatchSize: 10, StartAfter: "20",
		Progress: func(p pgstore.MigrateProgress) { last = p }})
	// Pending counts the rows after StartAfter, so progress ends at Total.
	if err != nil || res.Migrated != 10 || res.Pending != 10 || last.Done != last.Total || res.LastKey != "30" {
		t.Fatalf("from 20: %+v, %v", res, err)
	}
	secrets := snapshotSecrets(t, e)
	res, err = e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{BatchSize: 10})
	if err != nil || res.Migrated != 20 || res.AlreadyPresent != 10 || res.Conflicts != 0 {
		t.Fatalf("from start: %+v, %v", res, err)
	}
	if count(t, e.pool, `SELECT count(*) FROM keybroker.encrypted_secrets`) != 30 {
		t.Fatal("wrong secret count")
	}
	// The 10 rows already migrated were not rewritten.
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.encrypted_secrets s WHERE position(s::text in $1) > 0`, secrets); n != 10 {
		t.Fatalf("%d of the first run's rows unchanged, want 10", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM legacy_secrets WHERE value IS NOT NULL`); n != 30 {
		t.Fatalf("plaintext cleared without ClearPlaintext: %d left", n)
	}
}

func TestMigratePlaintextBadSource(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	legacy(t, e.pool, "bytea", 5)
	if _, err := e.pool.Exec(ctx, `CREATE TABLE nokey (id bigint, project text, secret_name text, value bytea);
		CREATE TABLE badtype (id bigint PRIMARY KEY, project text, secret_name text, value int);
		CREATE TABLE required (id bigint PRIMARY KEY, project text, secret_name text, value bytea NOT NULL);
		INSERT INTO required VALUES (1, 'proj1', 'name1', 'v')`); err != nil {
		t.Fatal(err)
	}
	src := func(f func(*pgstore.PlaintextSource)) pgstore.PlaintextSource {
		s := legacySource
		f(&s)
		return s
	}
	cases := []struct {
		want string
		src  pgstore.PlaintextSource
	}{
		{"does not exist", src(func(s *pgstore.PlaintextSource) { s.Table = "missing" })},
		{`no value column "v"`, src(func(s *pgstore.PlaintextSource) { s.ValueColumn = "v" })},
		{`no key column "ID"`, src(func(s *pgstore.PlaintextSource) { s.KeyColumn = "ID" })},
		{"unique index", src(func(s *pgstore.PlaintextSource) { s.Table = "nokey" })},
		{"has type integer", src(func(s *pgstore.PlaintextSource) { s.Table = "badtype" })},
		{`value column "value" of table "required" is NOT NULL`, src(func(s *pgstore.PlaintextSource) { s.Table = "required" })},
		{"want table or schema", src(func(s *pgstore.PlaintextSource) { s.Table = "a.b.c" })},
		{"identifier", src(func(s *pgstore.PlaintextSource) { s.NameColumn = "" })},
		{`does not exist`, src(func(s *pgstore.PlaintextSource) { s.Table = `legacy_secrets"; DROP TABLE legacy_secrets; --` })},
	}
	before := snapshot(t, e.pool)
	for _, c := range cases {
		_, err := e.store.MigratePlaintext(ctx, c.src, pgstore.MigrateOptions{ClearPlaintext: true})
		if !errors.Is(err, pgstore.ErrSource) || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want ErrSource mentioning %q", c.src, err, c.want)
		}
	}
	// A row with a NULL name stops the run before any write.
	if _, err := e.pool.Exec(ctx, `UPDATE legacy_secrets SET secret_name = NULL WHERE id = 4`); err != nil {
		t.Fatal(err)
	}
	_, err := e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{ClearPlaintext: true})
	if !errors.Is(err, pgstore.ErrSource) || !strings.Contains(err.Error(), `id "4"`) {
		t.Fatalf("NULL name: %v", err)
	}
	if snapshot(t, e.pool) != before {
		t.Fatal("bad source changed keybroker tables")
	}
	if n := count(t, e.pool, `SELECT count(*) FROM legacy_secrets WHERE value IS NOT NULL`); n != 5 {
		t.Fatalf("legacy values changed: %d left", n)
	}
}

func TestMigratePlaintextLostConnection(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{})
	legacy(t, e.pool, "bytea", 20)
	px, viaProxy := newProxy(t, e.url)
	s := newStore(t, pgtest.PoolFor(t, viaProxy), pgstore.Config{KEK: e.kek})
	px.cut()
	before := snapshot(t, e.pool)
	if _, err := s.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{ClearPlaintext: true}); err == nil || !strings.HasPrefix(err.Error(), "pgstore: ") {
		t.Fatalf("migrate over a lost connection: %v", err)
	}
	if snapshot(t, e.pool) != before || count(t, e.pool, `SELECT count(*) FROM legacy_secrets WHERE value IS NOT NULL`) != 20 {
		t.Fatal("database changed")
	}
}

// Several workers split the keys; every row is migrated once.
func TestMigratePlaintextWorkers(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, pgstore.Config{ReserveChunk: 5})
	legacy(t, e.pool, "bytea", 200)
	var calls int
	res, err := e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{
		Workers: 3, BatchSize: 16, ClearPlaintext: true, StartAfter: "10",
		Progress: func(pgstore.MigrateProgress) { calls++ },
	})
	if err != nil || res.Migrated != 190 || res.Cleared != 190 || res.LastKey != "" || calls < 12 {
		t.Fatalf("workers: %+v, %v (%d progress calls)", res, err, calls)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM legacy_secrets WHERE value IS NOT NULL`); n != 10 {
		t.Fatalf("%d values left, want the 10 before the start key", n)
	}
	fresh := newStore(t, e.pool, pgstore.Config{KEK: e.kek})
	for g := 11; g <= 200; g++ {
		got, err := fresh.Get(ctx, fmt.Sprintf("proj%d", g%3), fmt.Sprintf("name%d", g))
		if err != nil || string(got) != fmt.Sprintf("value-%d", g) {
			t.Fatalf("row %d: %q, %v", g, got, err)
		}
	}
	if _, err := e.store.MigratePlaintext(ctx, legacySource, pgstore.MigrateOptions{Workers: -1}); !errors.Is(err, pgstore.ErrInvalidArgument) {
		t.Fatalf("negative workers: %v", err)
	}
}
