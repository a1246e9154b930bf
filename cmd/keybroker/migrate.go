package main

import (
	"context"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/spf13/cobra"
)

func (a *app) schema() string {
	if a.cfg.Schema == "" {
		return pgstore.DefaultSchema
	}
	return a.cfg.Schema
}

// schemaVersion reads the applied schema version; 0 when none.
func schemaVersion(ctx context.Context, pool *pgxpool.Pool, schema string) (int32, error) {
	var exists bool
	if err := pool.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL",
		pgx.Identifier{schema, pgstore.VersionTable}.Sanitize()).Scan(&exists); err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	if !exists {
		return 0, nil
	}
	var v int32
	if err := pool.QueryRow(ctx, "SELECT version FROM "+pgx.Identifier{schema, pgstore.VersionTable}.Sanitize()).Scan(&v); err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	return v, nil
}

func newMigrateCmd(a *app) *cobra.Command {
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Create or upgrade keybroker's tables in the schema",
		Args:  args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			pool, err := a.openDB(ctx)
			if err != nil {
				return err
			}
			defer pool.Close()
			schema := a.schema()
			from, err := schemaVersion(ctx, pool, schema)
			if err != nil {
				return err
			}
			to := pgstore.SchemaVersion()
			if !dryRun && from != to {
				if err := pgstore.Migrate(ctx, pool, schema); err != nil {
					return err
				}
				a.log.Info("migrated schema", "schema", schema, "from", from, "to", to)
			}
			res := struct {
				Schema string `json:"schema"`
				From   int32  `json:"from_version"`
				To     int32  `json:"to_version"`
				DryRun bool   `json:"dry_run"`
			}{schema, from, to, dryRun}
			return a.emit(res, func(w io.Writer) {
				switch {
				case from == to:
					fmt.Fprintf(w, "schema %s is up to date (version %d)\n", schema, to)
				case dryRun:
					fmt.Fprintf(w, "dry run: would migrate schema %s from version %d to %d\n", schema, from, to)
				default:
					fmt.Fprintf(w, "migrated schema %s from version %d to %d\n", schema, from, to)
				}
			})
		},
	}
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "report the migration without applying it")
	return cmd
}
