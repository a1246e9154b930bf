package main

import (
	"context"
	"fmt"
	"io"
	"strconv"

	"github.com/profullstack/keybroker/legacy"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/spf13/cobra"
)

// importSpec names the plaintext table and columns to import.
type importSpec struct {
	Table, Column, KeyColumn, ProjectColumn, NameColumn string
	Clear                                               bool
	Batch                                               int
	StartAfter                                          string
	// Legacy lists decoder URLs (legacy.Open) tried in order on each
	// value; see legacyChain.
	Legacy []string
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
	// Undecodable counts rows left alone because their value did not
	// decode (--legacy); UndecodableRows names the first of them.
	Undecodable     int64            `json:"undecodable"`
	UndecodableRows []importConflict `json:"undecodable_rows"`
	Cleared         int64            `json:"cleared"`
	LastKey         string           `json:"last_key,omitempty"`
	DryRun          bool             `json:"dry_run"`
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
	dec, err := legacyChain(spec.Legacy)
	if err != nil {
		return nil, err
	}
	if dec != nil {
		defer dec.Close()
	}
	var decoder legacy.Decoder
	if dec != nil {
		decoder = dec
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
		Legacy:         decoder,
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
		LastKey: res.LastKey, DryRun: dryRun, Undecodable: res.Undecodable, UndecodableRows: []importConflict{},
	}
	for _, c := range res.UndecodableRows {
		out.UndecodableRows = append(out.UndecodableRows, importConflict{Project: c.Project, Name: c.Name, Key: c.Key})
	}
	for _, c := range res.ConflictRows {
		out.ConflictRows = append(out.ConflictRows, importConflict{Project: c.Project, Name: c.Name, Key: c.Key})
	}
	return out, nil
}

// legacyChain opens the decoders urls name (legacy.Open: the key of a
// meshhook-v1 URL is read from the environment, never from the URL) and
// chains them before legacy.Plaintext, so a value no decoder claims is
// imported as the plaintext it is. It returns nil for no URLs. An error is
// a usage error that names the flag, never the URL.
func legacyChain(urls []string) (*legacy.Chain, error) {
	if len(urls) == 0 {
		return nil, nil
	}
	var ds []legacy.Decoder
	closeAll := func() {
		for _, d := range ds {
			if c, ok := d.(interface{ Close() error }); ok {
				c.Close()
			}
		}
	}
	for i, u := range urls {
		d, err := legacy.Open(u)
		if err != nil {
			closeAll()
			return nil, usageErrorf("--legacy %d: %v", i+1, err)
		}
		if u == legacy.SchemePlaintext+"://" && i != len(urls)-1 {
			closeAll()
			return nil, usageErrorf("--legacy %d: plaintext:// claims every value, so it must be the last --legacy", i+1)
		}
		ds = append(ds, d)
	}
	if urls[len(urls)-1] != legacy.SchemePlaintext+"://" {
		ds = append(ds, legacy.Plaintext())
	}
	c, err := legacy.NewChain(ds...)
	if err != nil {
		closeAll()
		return nil, usageErrorf("--legacy: %v", err)
	}
	return c, nil
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
COLUMN it is refused before anything is written (--dry-run says so too).

--legacy URL decodes each value before it is stored, for tables that hold
values of an earlier encryption scheme beside plaintext:
meshhook-v1://env/VARNAME decodes MeshHook's "v1:<iv>:<tag>:<ct>" values
with the key in the environment variable VARNAME (64 hex digits, base64 of
32 bytes, or a passphrase of at least 32 characters; never given on the
command line, never logged). Repeat --legacy to try several decoders in
order; a value none of them claims is imported as plaintext. A value a
decoder claims but cannot decode (altered, or the wrong key) is left alone,
its row named (never its value) on stdout and in --json's undecodable_rows,
and the command exits 5 after importing the rest.`,
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
			err = a.emit(res, func(w io.Writer) {
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
				for _, c := range res.UndecodableRows {
					fmt.Fprintf(w, "UNDECODABLE %s/%s (%s %s): value did not decode; source row left alone\n", c.Project, c.Name, spec.KeyColumn, c.Key)
				}
				if more := res.Undecodable - int64(len(res.UndecodableRows)); more > 0 {
					fmt.Fprintf(w, "UNDECODABLE ... and %d more\n", more)
				}
				fmt.Fprintf(w, "imported %d secrets from %s.%s (%d already present, %d conflicts, %d plaintext values cleared)\n",
					res.Imported, res.Table, res.Column, res.AlreadyPresent, res.Conflicts, res.Cleared)
			})
			if err == nil && res.Undecodable > 0 {
				return incomplete("import-plaintext: %d values did not decode and were left alone (wrong key, or altered values): see the rows named above", res.Undecodable)
			}
			return err
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
	f.StringArrayVar(&spec.Legacy, "legacy", nil, "decode values with this decoder first (meshhook-v1://env/VARNAME); repeatable")
	return cmd
}
