package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/profullstack/keybroker/pgcolumn"
)

// columnRow is a row named in output: project and key, never a value.
type columnRow struct {
	Project string   `json:"project"`
	Key     []string `json:"key"`
}

type columnMigrateResult struct {
	Column          string      `json:"column"`
	Pending         int64       `json:"pending"`
	Migrated        int64       `json:"migrated"`
	Changed         int64       `json:"changed"`
	Undecodable     int64       `json:"undecodable"`
	UndecodableRows []columnRow `json:"undecodable_rows"`
	Remaining       int64       `json:"remaining"`
}

func newColumnMigrateCmd(a *app, f *columnFlags) *cobra.Command {
	var (
		urls  []string
		batch int
	)
	cmd := &cobra.Command{
		Use:   "migrate [--legacy URL]...",
		Short: "Seal a column's plaintext and legacy values in place, online",
		Long: `migrate converts, in place, every unsealed value of an installed encrypted
column (plaintext, or a legacy ciphertext --legacy decodes) to keybroker's
sealed form, while the application keeps reading and writing. It walks the
table in batches, each one transaction: read unsealed rows, decode and seal
each value, update each row only if it still holds the value read (a row the
application rewrote meanwhile is left to it), then open every updated row
again and compare it with the decoded plaintext before the batch commits.
Each batch records a column.migrate_legacy audit event. NOT NULL columns stay
NOT NULL; no value is written anywhere else, logged or printed.

--legacy URL names a decoder tried before plaintext, as for import-plaintext:
meshhook-v1://env/VARNAME decodes MeshHook "v1:" values with the key in the
environment variable VARNAME (never on the command line, never logged). A
value a decoder claims but cannot decode (altered, the wrong key) is left as
it is and its row named (project and key) on stdout and in --json.

It is safe to interrupt or kill at any point: a rerun finds the values still
unsealed. When it reports no value remaining, "keybroker column finish"
switches legacy acceptance off.

Exit codes: 0 every value of the column is sealed; 5 unsealed values remain
(undecodable ones, or legacy values the application wrote behind the run):
fix or rewrite them and rerun; 1 error (committed batches are kept; rerun);
2 usage.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if len(urls) == 0 {
				urls = []string{"plaintext://"} // a column of plaintexts only
			}
			chain, err := legacyChain(urls)
			if err != nil {
				return err
			}
			defer chain.Close()
			ctx := cmd.Context()
			s, col, err := a.openColumn(ctx, f)
			if err != nil {
				return err
			}
			defer s.close()
			name := col.Column().Table + "." + col.Column().Value
			p := a.newProgress("column migrate", -1)
			res, err := col.MigrateLegacy(ctx, pgcolumn.MigrateOptions{Legacy: chain, BatchSize: batch,
				Progress: func(pr pgcolumn.MigrateProgress) {
					a.log.Info("column migrate: batch committed", "column", name, "done", pr.Done, "total", pr.Total)
					p.set(pr.Done, pr.Total)
				}})
			p.finish()
			if err != nil {
				return err
			}
			out := columnMigrateResult{Column: name, Pending: res.Pending, Migrated: res.Migrated,
				Changed: res.Changed, Undecodable: res.Undecodable, UndecodableRows: []columnRow{}, Remaining: res.Remaining}
			for _, r := range res.UndecodableRows {
				out.UndecodableRows = append(out.UndecodableRows, columnRow{Project: r.Project, Key: r.Key})
			}
			a.log.Info("column migrate", "column", name, "migrated", res.Migrated, "changed", res.Changed,
				"undecodable", res.Undecodable, "remaining", res.Remaining)
			err = a.emit(out, func(w io.Writer) {
				for _, r := range out.UndecodableRows {
					fmt.Fprintf(w, "UNDECODABLE %s/%s: value did not decode; left as it is\n", r.Project, strings.Join(r.Key, "/"))
				}
				if more := out.Undecodable - int64(len(out.UndecodableRows)); more > 0 {
					fmt.Fprintf(w, "UNDECODABLE ... and %d more\n", more)
				}
				fmt.Fprintf(w, "sealed %d values of %s (%d rewritten by the application meanwhile, %d undecodable); %d unsealed values remain\n",
					out.Migrated, out.Column, out.Changed, out.Undecodable, out.Remaining)
			})
			if err == nil && res.Remaining > 0 {
				return incomplete("column migrate: %d unsealed values remain in %s: rerun (rewrite the undecodable ones first)", res.Remaining, out.Column)
			}
			return err
		},
	}
	fl := cmd.Flags()
	fl.StringArrayVar(&urls, "legacy", nil, "decode values with this decoder before plaintext (meshhook-v1://env/VARNAME); repeatable")
	fl.IntVar(&batch, "batch", 0, fmt.Sprintf("rows per transaction (default %d)", pgcolumn.DefaultMigrateBatch))
	return cmd
}

func newColumnFinishCmd(a *app, f *columnFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "finish",
		Short: "Switch legacy acceptance off once every value is sealed",
		Long: `finish switches legacy acceptance off for an installed encrypted column, for
good: from then on the column's trigger refuses every unsealed write and
readers refuse unsealed values, whatever legacy decoder they were given. In
one transaction it first switches acceptance off, waiting for writers of
legacy values in flight, then counts the unsealed values; if any remain it
rolls back (acceptance stays on) and exits 5. Records a
column.refuse_legacy audit event.

Exit codes: 0 legacy values are refused from now on; 5 unsealed values
remain: run "keybroker column migrate" first; 1 error; 2 usage.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			s, col, err := a.openColumn(ctx, f)
			if err != nil {
				return err
			}
			defer s.close()
			if err := col.RefuseLegacy(ctx); errors.Is(err, pgcolumn.ErrLegacyRemaining) {
				return incomplete("column finish: %v", err)
			} else if err != nil {
				return err
			}
			name := col.Column().Table + "." + col.Column().Value
			return a.emit(struct {
				Column        string `json:"column"`
				LegacyRefused bool   `json:"legacy_refused"`
			}{name, true}, func(w io.Writer) {
				fmt.Fprintf(w, "%s: every value is sealed; legacy values are refused from now on\n", name)
			})
		},
	}
}
