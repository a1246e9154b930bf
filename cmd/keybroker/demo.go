package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
	"github.com/spf13/cobra"
)

// demoSummary is what demo prints (and, with --json, its JSON output).
type demoSummary struct {
	Database  string `json:"database"` // "throwaway" or "external"
	Schema    string `json:"schema"`
	Rows      int    `json:"rows"`
	Projects  int    `json:"projects"`
	Imported  int64  `json:"imported"`
	Cleared   int64  `json:"plaintext_cleared"`
	Stored    int64  `json:"stored"`
	Rewrapped int64  `json:"rewrapped"`
	// RewrappedIKs counts the intermediate keys the rotation rewrapped
	// (the key hierarchy): data keys stay as they are.
	RewrappedIKs int          `json:"rewrapped_intermediate_keys"`
	Verified     int64        `json:"verified"`
	Failed       int64        `json:"failed"`
	KEKVersions  [2]string    `json:"kek_versions"` // before and after rotation
	Timings      []demoTiming `json:"timings"`
	Total        jsonDuration `json:"total"`
}

type demoTiming struct {
	Step     string       `json:"step"`
	Duration jsonDuration `json:"duration"`
}

// jsonDuration marshals as milliseconds with three decimals.
type jsonDuration time.Duration

func (d jsonDuration) MarshalJSON() ([]byte, error) {
	return fmt.Appendf(nil, "%.3f", float64(time.Duration(d).Microseconds())/1000), nil
}

func (d jsonDuration) String() string { return time.Duration(d).Round(time.Millisecond).String() }

func newDemoCmd(a *app) *cobra.Command {
	var rows, projects, extra int
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the whole job on a throwaway database and keyring, and summarise",
		Long: `demo runs keybroker's main job end to end and prints counts and timings:
it generates a local keyring in a temporary directory (any configured KEK is
not used, nor changed), applies the schema,
creates a plaintext table legacy_webhooks(id, project_id, name, secret) with
--rows rows, imports it (clearing the plaintext), stores --put more secrets,
rotates the KEK, rewraps every data key, retires the old KEK version, and
decrypts every secret and compares it with the value it started as.

The database is KEYBROKER_DATABASE_URL (or --database-url) when set; demo
then works in a fresh schema kb_demo_<random> and drops it at the end.
Otherwise demo starts a throwaway PostgreSQL server from the machine's
binaries (/usr/lib/postgresql/*/bin, or initdb and pg_ctl beside postgres
on $PATH), listening only on a Unix socket in a temporary directory that is
removed on exit, Ctrl-C included. initdb refuses to run as root, so as root
the server runs as the user who ran sudo (SUDO_UID) or else as the postgres
user, with the directory chowned to it. With no binaries installed, demo
tries embedded-postgres (which needs its cached download), and failing that
says what to install.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if rows < 1 || rows > 1_000_000 || projects < 1 || projects > rows || extra < 0 || extra > 100_000 {
				return usageErrorf("demo: want 1 <= --projects <= --rows <= 1000000 and 0 <= --put <= 100000")
			}
			// The summary is the demo's output: logs only for problems,
			// unless a level is configured.
			if err := a.setLogger("warn"); err != nil {
				return err
			}
			return a.demo(cmd.Context(), rows, projects, extra)
		},
	}
	cmd.Flags().IntVar(&rows, "rows", 2000, "rows in the plaintext table to import")
	cmd.Flags().IntVar(&projects, "projects", 20, "projects the rows are spread over")
	cmd.Flags().IntVar(&extra, "put", 100, "secrets stored one by one after the import")
	return cmd
}

// step times one stage of the demo.
func (s *demoSummary) step(name string, f func() error) error {
	t := time.Now()
	err := f()
	s.Timings = append(s.Timings, demoTiming{name, jsonDuration(time.Since(t))})
	return err
}

func (a *app) demo(ctx context.Context, nrows, projects, extra int) (err error) {
	start := time.Now()
	sum := &demoSummary{Rows: nrows, Projects: projects}

	tmp, err := os.MkdirTemp("", "keybroker-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	// The database: the configured one, in a schema of our own that we
	// drop afterwards, or a throwaway server.
	dbURL := a.cfg.DatabaseURL
	sum.Database, sum.Schema = "external", "kb_demo_"+randHex(4)
	if dbURL == "" {
		sum.Database, sum.Schema = "throwaway", pgstore.DefaultSchema
		var srv *demoServer
		if err := sum.step("start postgres", func() (err error) {
			srv, err = startPGServer(ctx, a.log)
			return err
		}); err != nil {
			return err
		}
		defer func() {
			if e := srv.stop(); e != nil && err == nil {
				err = e
			}
		}()
		dbURL = srv.URL
	}
	a.cfg.DatabaseURL, a.cfg.Schema = dbURL, sum.Schema
	pool, err := a.openDB(ctx)
	if err != nil {
		return err
	}
	defer pool.Close()
	if sum.Database == "external" {
		defer func() {
			// Clean up even after Ctrl-C, hence a fresh context.
			_, e := pool.Exec(context.WithoutCancel(ctx), "DROP SCHEMA IF EXISTS "+pgx.Identifier{sum.Schema}.Sanitize()+" CASCADE")
			if e != nil && err == nil {
				err = fmt.Errorf("drop demo schema: %w", e)
			}
		}()
	}

	// The keyring, in the temporary directory.
	var kek *local.Provider
	if err := sum.step("keygen", func() error {
		path := filepath.Join(tmp, "keyring.json")
		g, err := local.Generate("demo")
		if err != nil {
			return err
		}
		if err := g.Save(path); err != nil {
			return err
		}
		kek, err = local.OpenFile(path)
		return err
	}); err != nil {
		return err
	}

	if err := sum.step("migrate", func() error { return pgstore.Migrate(ctx, pool, sum.Schema) }); err != nil {
		return err
	}
	var rows []legacyRow
	if err := sum.step("create legacy_webhooks", func() (err error) {
		if rows, err = demoRows(nrows, projects); err != nil {
			return err
		}
		return createLegacyTable(ctx, pool, sum.Schema, rows)
	}); err != nil {
		return err
	}
	if err := a.demoStore(ctx, pool, kek, rows, extra, sum); err != nil {
		return err
	}
	sum.Total = jsonDuration(time.Since(start))
	if sum.Failed > 0 {
		err = &codeError{code: exitVerifyFail, err: fmt.Errorf("demo: %d of %d secrets failed verification", sum.Failed, sum.Verified+sum.Failed)}
	}
	if e := a.emit(sum, sum.print); e != nil {
		return e
	}
	return err
}

func (s *demoSummary) print(w io.Writer) {
	fmt.Fprintf(w, "keybroker demo: %s PostgreSQL, schema %s\n", s.Database, s.Schema)
	fmt.Fprintf(w, "  legacy rows     %d across %d projects\n", s.Rows, s.Projects)
	fmt.Fprintf(w, "  imported        %d (plaintext cleared: %d)\n", s.Imported, s.Cleared)
	fmt.Fprintf(w, "  stored (put)    %d\n", s.Stored)
	fmt.Fprintf(w, "  KEK rotated     version %s -> %s (version %s retired)\n", s.KEKVersions[0], s.KEKVersions[1], s.KEKVersions[0])
	fmt.Fprintf(w, "  rewrapped       %d data keys, %d intermediate keys\n", s.Rewrapped, s.RewrappedIKs)
	fmt.Fprintf(w, "  verified        %d ok, %d failed\n", s.Verified, s.Failed)
	fmt.Fprintln(w, "  timings:")
	for _, t := range s.Timings {
		fmt.Fprintf(w, "    %-24s %s\n", t.Step, t.Duration)
	}
	fmt.Fprintf(w, "  total           %s\n", s.Total)
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// demoStore is the part of the demo that goes through pgstore: import the
// plaintext table, store more secrets, rotate, rewrap, retire the old
// version, and check every secret against the value it started as.
func (a *app) demoStore(ctx context.Context, pool *pgxpool.Pool, kek *local.Provider, rows []legacyRow, extra int, sum *demoSummary) error {
	st, err := pgstore.New(ctx, pool, pgstore.Config{Schema: sum.Schema, KEK: kek, Actor: "keybroker-demo", Logger: a.log})
	if err != nil {
		return err
	}
	defer st.Close()
	s := &session{pool: pool, store: st}

	want := make(map[secretKey]string, len(rows)+extra)
	for _, r := range rows {
		want[secretKey{r.ProjectID, r.Name}] = r.Secret
	}
	if err := sum.step("import-plaintext", func() error {
		res, err := a.importPlaintext(ctx, s, importSpec{
			Table: sum.Schema + ".legacy_webhooks", Column: "secret", KeyColumn: "id",
			ProjectColumn: "project_id", NameColumn: "name", Clear: true,
		}, false)
		if err != nil {
			return err
		}
		sum.Imported, sum.Cleared = res.Imported, res.Cleared
		return nil
	}); err != nil {
		return err
	}

	if err := sum.step("put", func() error {
		extraRows, err := demoRows(extra, sum.Projects)
		if err != nil {
			return err
		}
		for _, r := range extraRows {
			name := "api_key_" + r.Name[len("webhook_"):]
			if err := st.Put(ctx, r.ProjectID, name, []byte(r.Secret)); err != nil {
				return err
			}
			want[secretKey{r.ProjectID, name}] = r.Secret
			sum.Stored++
		}
		return nil
	}); err != nil {
		return err
	}

	var prev, next pgstore.KEKVersion
	if err := sum.step("rotate kek", func() (err error) {
		if prev, err = st.KEKPrimaryVersion(ctx); err != nil {
			return err
		}
		next, err = st.RotateKEK(ctx)
		return err
	}); err != nil {
		return err
	}
	sum.KEKVersions = [2]string{prev.Version, next.Version}
	if err := sum.step("rewrap", func() error {
		res, err := a.rewrap(ctx, s, 0, 0, false)
		if err != nil {
			return err
		}
		sum.Rewrapped, sum.RewrappedIKs = res.Rewrapped, res.IntermediateKeys
		return nil
	}); err != nil {
		return err
	}
	if err := sum.step("retire old version", func() error { return st.RetireKEK(ctx, prev) }); err != nil {
		return err
	}

	return sum.step("verify", func() error {
		res, err := a.verifyAll(ctx, s, "verify", func(project, name string, value []byte) error {
			w, ok := want[secretKey{project, name}]
			if !ok || subtle.ConstantTimeCompare([]byte(w), value) != 1 {
				return errMismatch
			}
			return nil
		})
		if err != nil {
			return err
		}
		sum.Verified, sum.Failed = res.OK, int64(len(res.Failures))
		if missing := int64(len(want)) - res.Total; missing != 0 {
			return fmt.Errorf("demo: %d secrets missing from the store", missing)
		}
		return nil
	})
}
