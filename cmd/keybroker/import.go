package main

import (
	"context"
	"fmt"
	"io"
	"strconv"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/spf13/cobra"
)

// importSpec names the plaintext table and columns to import.
type importSpec struct {
	Table, Column, KeyColumn, ProjectColumn, NameColumn string
	Clear                                               bool
	Batch                                               int
	StartAfter                                          string
}

type importResult struct {
	Table          string `json:"table"`
	Column         string `json:"column"`
	Pending        int64  `json:"pending"`
	Imported       int64  `json:"imported"`
	AlreadyPresent int64  `json:"already_present"`
	Conflicts      int64  `json:"conflicts"`
	// ConflictRows names the first pgstore.MaxConflictRows conflicts.
	ConflictRows []importConflict `json:"conflict_rows"`
	Cleared      int64            `json:"cleared"`
	LastKey      string           `json:"last_key,omitempty"`
	DryRun       bool             `json:"dry_run"`
}

// importConflict is a source row left alone because its secret is stored
// with another value: where it is, never what it holds.
type importConflict struct {
	Project string `json:"project"`
	Name    string `json:"name"`
	Key     string `json:"key"`
}

// importPlaintext encrypts the plaintext column into the store, with
// progress. On failure it logs where a rerun may resume.
func (a *app) importPlaintext(ctx context.Context, s *session, spec importSpec, dryRun bool) (*importResult, error) {
	if spec.KeyColumn == "" {
		spec.KeyColumn = "id"
	}
	p := a.newProgress("import", -1)
	res, err := s.store.MigratePlaintext(ctx, pgstore.PlaintextSource{
		Table:         spec.Table,
		KeyColumn:     spec.KeyColumn,
		ProjectColumn: spec.ProjectColumn,
		NameColumn:    spec.NameColumn,
		ValueColumn:   spec.Column,
	}, pgstore.MigrateOptions{
		BatchSize:      spec.Batch,
		ClearPlaintext: spec.Clear,
		DryRun:         dryRun,
		StartAfter:     spec.StartAfter,
		Progress:       func(pr pgstore.MigrateProgress) { p.set(pr.Done, pr.Total) },
	})
	p.finish()
	if err != nil {
		if res.LastKey != "" && res.LastKey != spec.StartAfter {
			a.log.Warn("import stopped; committed batches are kept: rerun to continue", "table", spec.Table, "last_key", res.LastKey)
		}
		return nil, err
	}
	if !dryRun {
		a.log.Info("imported plaintext", "table", spec.Table, "column", spec.Column, "imported", res.Migrated,
			"already_present", res.AlreadyPresent, "conflicts", res.Conflicts, "cleared", res.Cleared)
	}
	out := &importResult{
		Table: spec.Table, Column: spec.Column, Pending: res.Pending, Imported: res.Migrated,
		AlreadyPresent: res.AlreadyPresent, Conflicts: res.Conflicts, ConflictRows: []importConflict{}, Cleared: res.Cleared,
		LastKey: res.LastKey, DryRun: dryRun,
	}
	for _, c := range res.ConflictRows {
		out.ConflictRows = append(out.ConflictRows, importConflict{Project: c.Project, Name: c.Name, Key: c.Key})
	}
	return out, nil
}

func newImportCmd(a *app) *cobra.Command {
	spec := importSpec{}
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "import-plaintext TABLE COLUMN",
		Short: "Encrypt an existing table's plaintext secret column into the store",
		Long: `import-plaintext reads TABLE (or SCHEMA.TABLE) in --key-column order and
stores each row's COLUMN value as the secret --name-column of project
--project-column. Every stored secret is decrypted and compared with its
source before the batch commits; a secret already stored with the same value
counts as already present, one stored with another value is left alone and
reported as a conflict: named (project, name and key, never the value) on
stdout and in --json's conflict_rows, the first ` + strconv.Itoa(pgstore.MaxConflictRows) + ` of them. The table, columns and rows are checked before
anything is written. Each batch commits on its own, so an interrupted run
keeps its finished batches and a rerun continues. --clear-plaintext sets
each imported source value to NULL in the same transaction; on a NOT NULL
COLUMN it is refused before anything is written (--dry-run says so too).`,
		Args: args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			spec.Table, spec.Column = argv[0], argv[1]
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			res, err := a.importPlaintext(cmd.Context(), s, spec, dryRun)
			if err != nil {
				return err
			}
			return a.emit(res, func(w io.Writer) {
				if dryRun {
					fmt.Fprintf(w, "dry run: would import %d rows from %s.%s\n", res.Pending, res.Table, res.Column)
					return
				}
				for _, c := range res.ConflictRows {
					fmt.Fprintf(w, "CONFLICT %s/%s (%s %s): already stored with another value; source row left alone\n", c.Project, c.Name, spec.KeyColumn, c.Key)
				}
				if more := res.Conflicts - int64(len(res.ConflictRows)); more > 0 {
					fmt.Fprintf(w, "CONFLICT ... and %d more\n", more)
				}
				fmt.Fprintf(w, "imported %d secrets from %s.%s (%d already present, %d conflicts, %d plaintext values cleared)\n",
					res.Imported, res.Table, res.Column, res.AlreadyPresent, res.Conflicts, res.Cleared)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&spec.KeyColumn, "key-column", "id", "unique column that orders the rows")
	f.StringVar(&spec.ProjectColumn, "project-column", "project_id", "column holding the project id")
	f.StringVar(&spec.NameColumn, "name-column", "name", "column holding the secret name")
	f.BoolVar(&spec.Clear, "clear-plaintext", false, "set each imported plaintext value to NULL")
	f.IntVar(&spec.Batch, "batch", 0, "rows per transaction (default 1000)")
	f.StringVar(&spec.StartAfter, "start-after", "", "resume after this key (a rerun without it is also safe)")
	f.BoolVar(&dryRun, "dry-run", false, "check the table and count rows, change nothing")
	return cmd
}
