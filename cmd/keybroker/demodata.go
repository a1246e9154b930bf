package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// legacyRow is one row of the demo's plaintext table, shaped like
// MeshHook's webhook secrets before keybroker.
type legacyRow struct {
	ID        int64
	ProjectID string
	Name      string
	Secret    string
}

// demoRows makes n webhook rows spread over projects projects, each with a
// fresh random signing secret.
func demoRows(n, projects int) ([]legacyRow, error) {
	rows := make([]legacyRow, n)
	buf := make([]byte, 24)
	for i := range rows {
		if _, err := rand.Read(buf); err != nil {
			return nil, err
		}
		rows[i] = legacyRow{
			ID:        int64(i + 1),
			ProjectID: fmt.Sprintf("proj_%03d", i%projects),
			Name:      fmt.Sprintf("webhook_%05d", i+1),
			Secret:    "whsec_" + base64.RawURLEncoding.EncodeToString(buf),
		}
	}
	return rows, nil
}

// createLegacyTable creates schema.legacy_webhooks(id, project_id, name,
// secret) and loads rows with COPY.
func createLegacyTable(ctx context.Context, pool *pgxpool.Pool, schema string, rows []legacyRow) error {
	tbl := pgx.Identifier{schema, "legacy_webhooks"}
	ddl := fmt.Sprintf(`CREATE SCHEMA IF NOT EXISTS %s;
CREATE TABLE %s (
    id         bigint PRIMARY KEY,
    project_id text NOT NULL,
    name       text NOT NULL,
    secret     text,
    UNIQUE (project_id, name)
)`, pgx.Identifier{schema}.Sanitize(), tbl.Sanitize())
	if _, err := pool.Exec(ctx, ddl); err != nil {
		return fmt.Errorf("create legacy_webhooks: %w", err)
	}
	_, err := pool.CopyFrom(ctx, tbl, []string{"id", "project_id", "name", "secret"},
		pgx.CopyFromSlice(len(rows), func(i int) ([]any, error) {
			r := rows[i]
			return []any{r.ID, r.ProjectID, r.Name, r.Secret}, nil
		}))
	if err != nil {
		return fmt.Errorf("load legacy_webhooks: %w", err)
	}
	return nil
}
