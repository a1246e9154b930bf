package pgcolumn_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/profullstack/keybroker/pgcolumn"
)

func sqlstateOf(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// The fence trigger accepts a value sealed for the row's project and this
// column under a key that is not retired, and refuses everything else that
// starts like an envelope with a dedicated SQLSTATE.
func TestFence(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p, q := e.project(t), e.project(t)
	good, err := e.col.Seal(ctx, p, []string{"A"}, []byte("v"))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.insert(t, p, "A", good); err != nil {
		t.Fatalf("a value sealed for its row: %v", err)
	}
	other, err := pgcolumn.SealContext(ctx, e.store, p, pgcolumn.Context{Table: "public.secrets", Column: "other", Row: []string{"B"}}, []byte("v"))
	if err != nil {
		t.Fatal(err)
	}
	forged := bytes.Clone(good)
	forged[7] = 8 // an 8-byte key id: not a column envelope
	for name, c := range map[string]struct {
		project string
		value   []byte
		state   string
		target  error
	}{
		"sealed for another project": {q, good, pgcolumn.SQLStateMisdirected, pgcolumn.ErrMisdirected},
		"sealed for another column":  {p, other, pgcolumn.SQLStateMisdirected, pgcolumn.ErrMisdirected},
		"not a column envelope":      {p, forged, pgcolumn.SQLStateMisdirected, pgcolumn.ErrMisdirected},
		"too short":                  {p, good[:55], pgcolumn.SQLStateMisdirected, pgcolumn.ErrMisdirected},
	} {
		err := e.insert(t, c.project, "B-"+name, c.value)
		if sqlstateOf(err) != c.state || !errors.Is(e.col.Refused(err, c.project, c.value), c.target) {
			t.Errorf("%s: insert: %v, want SQLSTATE %s (%v)", name, err, c.state, c.target)
		}
	}
	// Unsealed values pass while the column accepts legacy values, and are
	// refused (KB003) once it no longer does.
	if err := e.insert(t, p, "legacy", []byte("plaintext")); err != nil {
		t.Fatalf("legacy value while accepted: %v", err)
	}
	if _, err := e.pool.Exec(ctx, `UPDATE keybroker.columns SET accept_legacy = false, legacy_refused_at = now()`); err != nil {
		t.Fatal(err)
	}
	err = e.insert(t, p, "legacy2", []byte("plaintext"))
	if sqlstateOf(err) != pgcolumn.SQLStateLegacyRefused || !errors.Is(e.col.Refused(err, p, nil), pgcolumn.ErrLegacyRefused) {
		t.Fatalf("legacy value after refusal: %v, want SQLSTATE KB003", err)
	}
	// An unchanged value is not re-checked (the row already holds it), an
	// update of other columns does not fire the trigger, NULL is the
	// table's business (NOT NULL here).
	if _, err := e.pool.Exec(ctx, `UPDATE secrets SET value_encrypted = value_encrypted, updated_at = now() WHERE key = 'legacy'`); err != nil {
		t.Fatalf("unchanged legacy value: %v", err)
	}
}

// A value whose data key was retired after it was sealed is refused with
// KB005 (ErrStaleKey); Refused drops the reservation so the next Seal
// uses a fresh key, and Write does all of it inside the caller's
// transaction.
func TestFenceStaleKey(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p := e.project(t)
	retire := func() {
		t.Helper()
		if _, err := e.pool.Exec(ctx, `UPDATE keybroker.data_keys SET state = 'retired' WHERE project_id = $1`, p); err != nil {
			t.Fatal(err)
		}
	}
	stale, err := e.col.Seal(ctx, p, []string{"A"}, []byte("v"))
	if err != nil {
		t.Fatal(err)
	}
	retire()
	err = e.insert(t, p, "A", stale)
	if sqlstateOf(err) != pgcolumn.SQLStateStaleKey {
		t.Fatalf("insert under a retired key: %v, want SQLSTATE KB005", err)
	}
	if err := e.col.Refused(err, p, stale); !errors.Is(err, pgcolumn.ErrStaleKey) {
		t.Fatalf("Refused = %v, want ErrStaleKey", err)
	}
	fresh, err := e.col.Seal(ctx, p, []string{"A"}, []byte("v"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(fresh[8:24], stale[8:24]) {
		t.Fatal("Seal after Refused reused the retired key")
	}
	if err := e.insert(t, p, "A", fresh); err != nil {
		t.Fatal(err)
	}

	// Write: the first attempt's key is retired between Seal and the
	// INSERT (by the write function itself, in another connection); the
	// savepoint keeps the transaction usable and the second attempt lands.
	tx, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `UPDATE projects SET name = 'renamed' WHERE id = $1`, p); err != nil {
		t.Fatal(err)
	}
	attempts := 0
	err = e.col.Write(ctx, tx, p, []string{"B"}, []byte("value-b"), func(ctx context.Context, tx pgx.Tx, sealed []byte) error {
		attempts++
		if attempts == 1 {
			retire()
		}
		_, err := tx.Exec(ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, 'B', $2)`, p, sealed)
		return err
	})
	if err != nil || attempts != 2 {
		t.Fatalf("Write = %v after %d attempts, want nil after 2", err, attempts)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	var stored []byte
	if err := e.pool.QueryRow(ctx, `SELECT value_encrypted FROM secrets WHERE project_id = $1 AND key = 'B'`, p).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if v, err := e.col.Open(ctx, p, []string{"B"}, stored); err != nil || string(v) != "value-b" {
		t.Fatalf("Open after Write = %q, %v", v, err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM projects WHERE name = 'renamed'`); n != 1 {
		t.Fatalf("the transaction's earlier statement was lost: %d rows", n)
	}

	// Every attempt refused: ErrStaleKey, and the transaction still usable.
	tx2, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx2.Rollback(ctx)
	err = e.col.Write(ctx, tx2, p, []string{"C"}, []byte("v"), func(ctx context.Context, tx pgx.Tx, sealed []byte) error {
		retire()
		_, err := tx.Exec(ctx, `INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, 'C', $2)`, p, sealed)
		return err
	})
	if !errors.Is(err, pgcolumn.ErrStaleKey) {
		t.Fatalf("Write refused every time: %v, want ErrStaleKey", err)
	}
	if _, err := tx2.Exec(ctx, `SELECT 1`); err != nil {
		t.Fatalf("transaction unusable after Write: %v", err)
	}
}

func TestInstallChecks(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	if _, err := e.pool.Exec(ctx, `
CREATE TABLE loose (p text NOT NULL, k text NOT NULL, v bytea, t text, n text);
CREATE TABLE partial (p text NOT NULL, k text NOT NULL, v bytea);
CREATE UNIQUE INDEX ON partial (p, k) WHERE k <> '';
CREATE TABLE nullable (p text NOT NULL, k text, v bytea, UNIQUE (p, k));
CREATE TABLE "Mixed Case" ("P" text NOT NULL, "K" text NOT NULL, "V" bytea, PRIMARY KEY ("P", "K"))`); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		col  pgcolumn.Column
		want string
	}{
		"unqualified":      {pgcolumn.Column{Table: "secrets", Project: "project_id", Key: []string{"key"}, Value: "value_encrypted"}, "schema-qualified"},
		"no table":         {pgcolumn.Column{Table: "public.nope", Project: "p", Key: []string{"k"}, Value: "v"}, "does not exist"},
		"no column":        {pgcolumn.Column{Table: "public.loose", Project: "p", Key: []string{"k"}, Value: "nope"}, `no column "nope"`},
		"not bytea":        {pgcolumn.Column{Table: "public.loose", Project: "p", Key: []string{"k"}, Value: "t"}, "not bytea"},
		"no unique index":  {pgcolumn.Column{Table: "public.loose", Project: "p", Key: []string{"k"}, Value: "v"}, "no unique index"},
		"partial index":    {pgcolumn.Column{Table: "public.partial", Project: "p", Key: []string{"k"}, Value: "v"}, "no unique index"},
		"nullable key":     {pgcolumn.Column{Table: "public.nullable", Project: "p", Key: []string{"k"}, Value: "v"}, "NOT NULL"},
		"wrong index":      {pgcolumn.Column{Table: "public.secrets", Project: "project_id", Key: []string{"created_at"}, Value: "value_encrypted"}, "no unique index"},
		"case folded":      {pgcolumn.Column{Table: "public.mixed case", Project: "P", Key: []string{"K"}, Value: "V"}, "does not exist"},
		"named twice":      {pgcolumn.Column{Table: "public.loose", Project: "p", Key: []string{"p"}, Value: "v"}, "named twice"},
		"redeclared":       {pgcolumn.Column{Table: "public.secrets", Project: "project_id", Key: []string{"id"}, Value: "value_encrypted"}, "no unique index"},
		"empty identifier": {pgcolumn.Column{Table: "public.", Project: "p", Key: []string{"k"}, Value: "v"}, "identifier"},
	} {
		err := pgcolumn.Install(ctx, e.store, c.col)
		if !errors.Is(err, pgcolumn.ErrInvalidArgument) || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: Install = %v, want a one-line ErrInvalidArgument saying %q", name, err, c.want)
		}
	}
	// Identifiers are taken literally.
	mixed := pgcolumn.Column{Table: "public.Mixed Case", Project: "P", Key: []string{"K"}, Value: "V"}
	if err := pgcolumn.Install(ctx, e.store, mixed); err != nil {
		t.Fatal(err)
	}
	// Installing again is a no-op that regenerates the trigger; a
	// declaration with other key columns is refused.
	if err := pgcolumn.Install(ctx, e.store, secretsColumn); err != nil {
		t.Fatalf("second Install: %v", err)
	}
	if _, err := e.pool.Exec(ctx, `ALTER TABLE secrets ADD UNIQUE (project_id, id)`); err != nil {
		t.Fatal(err)
	}
	redeclared := pgcolumn.Column{Table: "public.secrets", Project: "project_id", Key: []string{"id"}, Value: "value_encrypted"}
	if err := pgcolumn.Install(ctx, e.store, redeclared); !errors.Is(err, pgcolumn.ErrInvalidArgument) || !strings.Contains(err.Error(), "already installed") {
		t.Fatalf("Install with other key columns: %v", err)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.columns`); n != 2 {
		t.Fatalf("%d registry rows, want 2", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.secrets'::regclass AND NOT tgisinternal`); n != 1 {
		t.Fatalf("%d triggers on secrets, want 1", n)
	}
	if n := count(t, e.pool, `SELECT count(*) FROM keybroker.key_events WHERE event = 'column.install'`); n != 3 {
		t.Fatalf("%d column.install events, want 3", n)
	}
}

func TestNewNotDeclared(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	for name, c := range map[string]pgcolumn.Column{
		"never installed": {Table: "public.projects", Project: "id", Key: []string{"name"}, Value: "owner"},
		"other key":       {Table: "public.secrets", Project: "project_id", Key: []string{"id"}, Value: "value_encrypted"},
	} {
		if _, err := pgcolumn.New(ctx, e.store, c, pgcolumn.Options{}); !errors.Is(err, pgcolumn.ErrNotDeclared) {
			t.Errorf("%s: New = %v, want ErrNotDeclared", name, err)
		}
	}
	if _, err := e.pool.Exec(ctx, `ALTER TABLE secrets DISABLE TRIGGER USER`); err != nil {
		t.Fatal(err)
	}
	if _, err := pgcolumn.New(ctx, e.store, secretsColumn, pgcolumn.Options{}); !errors.Is(err, pgcolumn.ErrNotDeclared) || !strings.Contains(err.Error(), "fence trigger") {
		t.Fatalf("New with the trigger disabled: %v, want ErrNotDeclared naming the fence trigger", err)
	}
	if err := pgcolumn.Install(ctx, e.store, secretsColumn); err != nil {
		t.Fatal(err)
	}
	if _, err := pgcolumn.New(ctx, e.store, secretsColumn, pgcolumn.Options{}); err != nil {
		t.Fatalf("New after reinstalling: %v", err)
	}
}
