package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"

	"github.com/profullstack/keybroker/pgcolumn"
	"github.com/profullstack/keybroker/pgstore"
)

// columnFlags name a declared column: --table and --value always;
// --project-column and --key for install (the others read them from the
// registry, and check them when given).
type columnFlags struct {
	table, project, value string
	key                   []string
}

func (f *columnFlags) register(cmd *cobra.Command) {
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.table, "table", "", `schema-qualified table, e.g. public.secrets (names taken literally: case and spaces as in the catalog)`)
	pf.StringVar(&f.value, "value", "", "bytea column holding the sealed values, e.g. value_encrypted")
	pf.StringVar(&f.project, "project-column", "", "column holding the row's project id, e.g. project_id (install; optional otherwise)")
	pf.StringSliceVar(&f.key, "key", nil, "column(s) identifying a row within its project, comma-separated or repeated, e.g. key (install; optional otherwise)")
}

// declaration returns the column the flags name: as given for install
// (lookup false), else as installed, checked against any flag given.
func (f *columnFlags) declaration(ctx context.Context, s *session, lookup bool) (pgcolumn.Column, error) {
	if f.table == "" || f.value == "" {
		return pgcolumn.Column{}, usageErrorf("column: --table and --value are required")
	}
	col := pgcolumn.Column{Table: f.table, Project: f.project, Key: f.key, Value: f.value}
	if !lookup {
		if f.project == "" || len(f.key) == 0 {
			return col, usageErrorf("column install: --project-column and --key are required")
		}
		return col, nil
	}
	got, err := pgcolumn.Lookup(ctx, s.store, f.table, f.value)
	if err != nil {
		return col, err
	}
	if (f.project != "" && f.project != got.Project) || (len(f.key) > 0 && strings.Join(f.key, "\x00") != strings.Join(got.Key, "\x00")) {
		return col, usageErrorf("column: %s.%s is installed with --project-column %q --key %q", f.table, f.value, got.Project, strings.Join(got.Key, ","))
	}
	return got, nil
}

func newColumnCmd(a *app) *cobra.Command {
	f := &columnFlags{}
	cmd := &cobra.Command{
		Use:   "column",
		Short: "Encrypted columns in the application's own tables",
		Long: `column manages an encrypted column of an application table (package
pgcolumn): a bytea column whose values are sealed under the row's project's
data keys and bound to the table, the column and the row's key, so a value
copied to another row, column or project does not open.

Name the column with --table and --value; install also needs
--project-column and --key (the project and key columns must form a unique
index, NOT NULL). Identifiers are taken literally.`,
	}
	f.register(cmd)
	cmd.AddCommand(newColumnInstallCmd(a, f), newColumnReencryptCmd(a, f), newColumnVerifyCmd(a, f), newColumnStatusCmd(a, f),
		newColumnMigrateCmd(a, f), newColumnFinishCmd(a, f))
	return cmd
}

func newColumnInstallCmd(a *app, f *columnFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "install",
		Short: "Declare an encrypted column and attach its fence trigger",
		Long: `install records the column in keybroker's columns table and attaches to the
table a trigger (BEFORE INSERT OR UPDATE OF the value column) that refuses a
sealed value whose data key is retired, gone, or of another project or
column, and an unsealed value once the column no longer accepts legacy
values. Run it as the role that migrates keybroker's schema, with the
TRIGGER privilege on the table. Installing again is harmless: it
regenerates the trigger. A column installed with other project or key
columns is refused (exit 2).`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			s, err := a.openStore(ctx)
			if err != nil {
				return err
			}
			defer s.close()
			col, err := f.declaration(ctx, s, false)
			if err != nil {
				return err
			}
			if err := pgcolumn.Install(ctx, s.store, col); err != nil {
				return err
			}
			out := struct {
				Table         string   `json:"table"`
				Value         string   `json:"value"`
				ProjectColumn string   `json:"project_column"`
				Key           []string `json:"key"`
				Scope         string   `json:"scope"`
			}{col.Table, col.Value, col.Project, col.Key, col.Scope()}
			return a.emit(out, func(w io.Writer) {
				fmt.Fprintf(w, "installed %s.%s (project %s, key %s)\n", col.Table, col.Value, col.Project, strings.Join(col.Key, ","))
			})
		},
	}
}

func newColumnReencryptCmd(a *app, f *columnFlags) *cobra.Command {
	var batch int
	var dryRun bool
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "reencrypt PROJECT",
		Short: "Re-encrypt a project's values of a column under a fresh data key",
		Long: `reencrypt gives PROJECT a fresh data key for the column, for when its data
key may have been exposed: it retires the project's data keys of the
column, re-encrypts the column's values of the project in place (checking
each opens to the same bytes before writing it, and writing a row only if
it still holds the value read), then destroys the retired keys no row
references. The application may keep writing meanwhile; its fence trigger
refuses values sealed under a retired key (the application seals again).
After an interruption a rerun resumes with the same fresh key. Other
columns and keybroker's own secrets keep their keys.

Exit status 5 while an old data key is still in use at the end: rerun, or
give --wait to keep trying that long.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			ctx := cmd.Context()
			project := argv[0]
			s, col, err := a.openColumn(ctx, f)
			if err != nil {
				return err
			}
			defer s.close()
			var resume bool
			if err := pgstore.WithProject(ctx, s.pool, project, func(tx pgx.Tx) error {
				q := pgx.Identifier{s.store.Schema()}.Sanitize()
				return tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM "+q+".data_keys WHERE project_id = $1 AND scope = $2 AND state = 'retired')",
					project, col.Column().Scope()).Scan(&resume)
			}); err != nil {
				return fmt.Errorf("column reencrypt: %w", err)
			}
			if resume {
				a.log.Info("resuming an interrupted re-encryption", "project", project, "column", col.Column().Scope())
			}
			p := a.newProgress("column reencrypt", -1)
			p.unit = "values"
			res, err := col.Reencrypt(ctx, project, pgcolumn.ReencryptOptions{
				BatchSize: batch, DryRun: dryRun, Resume: resume, Wait: wait,
				Progress: func(pr pgcolumn.ReencryptProgress) { p.set(pr.Done, pr.Total) },
			})
			p.finish()
			if err != nil {
				return err
			}
			c := col.Column()
			out := struct {
				Table         string `json:"table"`
				Value         string `json:"value"`
				Project       string `json:"project"`
				Pending       int64  `json:"pending"`
				Reencrypted   int64  `json:"reencrypted"`
				RetiredKeys   int64  `json:"retired_keys"`
				DestroyedKeys int64  `json:"destroyed_keys"`
				RemainingKeys int64  `json:"remaining_keys"`
				Resumed       bool   `json:"resumed"`
				DryRun        bool   `json:"dry_run"`
			}{c.Table, c.Value, project, res.Pending, res.Reencrypted, res.RetiredKeys, res.DestroyedKeys, res.RemainingKeys, resume, dryRun}
			if err := a.emit(out, func(w io.Writer) {
				if dryRun {
					fmt.Fprintf(w, "dry run: would re-encrypt %d values of %s.%s in %s under a fresh data key\n", res.Pending, c.Table, c.Value, project)
					return
				}
				fmt.Fprintf(w, "re-encrypted %d values of %s.%s in %s under a fresh data key; destroyed %d old data keys\n",
					res.Reencrypted, c.Table, c.Value, project, res.DestroyedKeys)
			}); err != nil {
				return err
			}
			if !dryRun && res.RemainingKeys > 0 {
				return incomplete("column reencrypt: %d old data keys of %s.%s in %s are still in use: rerun, or use --wait", res.RemainingKeys, c.Table, c.Value, project)
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&batch, "batch", pgcolumn.DefaultBatchSize, "rows per transaction")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "count what would be re-encrypted; write nothing")
	cmd.Flags().DurationVar(&wait, "wait", 0, "keep retrying this long while old data keys are still in use")
	return cmd
}

func newColumnVerifyCmd(a *app, f *columnFlags) *cobra.Command {
	var project string
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Open every value of a column and report those that do not open",
		Long: `verify opens every sealed value of the column (or of one --project) and
counts them: opened, unsealed (legacy), NULL, unreadable. It prints the
first unreadable rows by project and key, never a value, and writes
nothing. Exit status 4 when a value does not open.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			s, col, err := a.openColumn(ctx, f)
			if err != nil {
				return err
			}
			defer s.close()
			res, err := col.Verify(ctx, pgcolumn.VerifyOptions{Project: project})
			if err != nil {
				return err
			}
			type ref struct {
				Project string   `json:"project"`
				Key     []string `json:"key"`
			}
			out := struct {
				Rows       int64 `json:"rows"`
				Opened     int64 `json:"opened"`
				Unsealed   int64 `json:"unsealed"`
				Null       int64 `json:"null"`
				Unreadable int64 `json:"unreadable"`
				Failures   []ref `json:"failures"`
			}{res.Rows, res.Opened, res.Unsealed, res.Null, res.Unreadable, []ref{}}
			for _, r := range res.UnreadableRows {
				out.Failures = append(out.Failures, ref{r.Project, r.Key})
			}
			c := col.Column()
			if err := a.emit(out, func(w io.Writer) {
				fmt.Fprintf(w, "%s.%s: %d rows: %d opened, %d unsealed, %d NULL, %d unreadable\n", c.Table, c.Value, res.Rows, res.Opened, res.Unsealed, res.Null, res.Unreadable)
				for _, r := range out.Failures {
					fmt.Fprintf(w, "unreadable: project %s key %s\n", r.Project, strings.Join(r.Key, ","))
				}
			}); err != nil {
				return err
			}
			if res.Unreadable > 0 {
				return &codeError{code: exitVerifyFail, err: fmt.Errorf("column verify: %d of %d values of %s.%s failed to open", res.Unreadable, res.Rows, c.Table, c.Value)}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&project, "project", "", "verify only this project's rows")
	return cmd
}

func newColumnStatusCmd(a *app, f *columnFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Count a column's values by data key state and KEK version",
		Long: `status counts the column's values without decrypting any: by the state of
their data key (active, spent, retired) and the KEK version wrapping it,
and those that are unsealed (legacy), NULL, malformed, or name a data key
that is gone. It writes nothing.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			s, col, err := a.openColumn(ctx, f)
			if err != nil {
				return err
			}
			defer s.close()
			st, err := col.Status(ctx)
			if err != nil {
				return err
			}
			type keyRows struct {
				State    string `json:"state"`
				KEK      string `json:"kek"`
				DataKeys int64  `json:"data_keys"`
				Rows     int64  `json:"rows"`
			}
			out := struct {
				Table        string    `json:"table"`
				Value        string    `json:"value"`
				AcceptLegacy bool      `json:"accept_legacy"`
				Rows         int64     `json:"rows"`
				Null         int64     `json:"null"`
				Unsealed     int64     `json:"unsealed"`
				Malformed    int64     `json:"malformed"`
				NoKey        int64     `json:"no_key"`
				Keys         []keyRows `json:"keys"`
			}{st.Column.Table, st.Column.Value, st.AcceptLegacy, st.Rows, st.Null, st.Unsealed, st.Malformed, st.NoKey, []keyRows{}}
			for _, k := range st.Keys {
				out.Keys = append(out.Keys, keyRows{k.State, k.Provider + ":" + k.KeyID + "@" + k.Version, k.DataKeys, k.Rows})
			}
			return a.emit(out, func(w io.Writer) {
				fmt.Fprintf(w, "%s.%s: %d rows (accept legacy: %t)\n", out.Table, out.Value, st.Rows, st.AcceptLegacy)
				for _, k := range out.Keys {
					fmt.Fprintf(w, "  %-8s %s: %d rows under %d data keys\n", k.State, k.KEK, k.Rows, k.DataKeys)
				}
				fmt.Fprintf(w, "  unsealed %d, NULL %d, malformed %d, data key gone %d\n", st.Unsealed, st.Null, st.Malformed, st.NoKey)
			})
		},
	}
}

// openColumn opens the store and the installed column the flags name.
func (a *app) openColumn(ctx context.Context, f *columnFlags) (*session, *pgcolumn.Encrypted, error) {
	s, err := a.openStore(ctx)
	if err != nil {
		return nil, nil, err
	}
	col, err := f.declaration(ctx, s, true)
	if err == nil {
		var e *pgcolumn.Encrypted
		if e, err = pgcolumn.New(ctx, s.store, col, pgcolumn.Options{}); err == nil {
			return s, e, nil
		}
	}
	s.close()
	return nil, nil, err
}

// columnUsage reports whether err is the caller's to fix (exit 2).
func columnUsage(err error) bool {
	return errors.Is(err, pgcolumn.ErrInvalidArgument) || errors.Is(err, pgcolumn.ErrNotDeclared)
}
