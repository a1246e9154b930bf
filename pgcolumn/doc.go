// Package pgcolumn encrypts values an application stores in its own
// tables, in the spirit of Rails' `encrypts :value`: one declaration per
// encrypted column, sealed and opened with the project data keys that
// pgstore keeps in keybroker's data_keys table.
//
// # Shape
//
//	store, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek})
//	col := pgcolumn.Column{Table: "public.secrets", Project: "project_id", Key: []string{"key"}, Value: "value_encrypted"}
//	err = pgcolumn.Install(ctx, store, col) // once, as the migrating role (keybroker column install)
//	enc, err := pgcolumn.New(ctx, store, col, pgcolumn.Options{})
//	sealed, err := enc.Seal(ctx, projectID, []string{name}, value)
//	// the application: INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)
//	value, err := enc.Open(ctx, projectID, []string{name}, sealed)
//
// A declaration names the table ("schema.table"), the project column, the
// key columns and the bytea value column, all taken literally (quoted,
// never case-folded). Install checks them against the catalog — the value
// column is bytea, the project and key columns are NOT NULL and exactly
// the columns of a unique index, so no two rows share a context — records
// the column in keybroker's columns table and attaches its fence trigger.
// New (the service's role, no DDL) checks that the column is installed
// with the same columns and its trigger enabled: ErrNotDeclared otherwise.
//
// # Binding
//
// A sealed value is a keybroker envelope (docs/FORMAT.md) with an external
// key reference: the 16 bytes of a data_keys id. Its associated data
// (Context.AAD) binds the column (table and column names as declared), the
// project id and the row's key column values, so a value copied to another
// row, column or project fails to open with envelope.ErrDecrypt. The data
// keys of a column form their own scope in data_keys (Column.Scope), so
// re-encrypting a column never retires or destroys the keys of keybroker's
// own secrets table or of another column, and KEK rotation, rewrap and
// retirement (pgstore) never touch application tables. docs/STORAGE.md,
// "Encrypted columns", gives every byte with a worked example.
//
// The project and key values are their PostgreSQL text forms (col::text):
// pass a uuid project id in lower-case hyphenated form, as the database
// prints it. Reencrypt and Verify read them so; the fence compares the
// data key's project with the row's in that form.
//
// # Errors
//
// Every failure about a value's bytes or its data key — altered,
// truncated, moved, a data key destroyed or not unwrapping — is the one
// opaque envelope.ErrDecrypt, so a reader learns nothing about why. A
// value that does not start with the envelope magic "KBEN" is unsealed
// (legacy) and is ErrLegacyRefused for a reader without a legacy decoder.
// Arguments out of bounds (MaxValueLen, MaxSealedLen, the Context bounds)
// are ErrInvalidArgument, checked before anything is written. Errors name
// columns, rows and projects, never values or key material.
//
// # The fence and writes in the application's transaction
//
// The application writes the sealed bytes itself, in its own transaction,
// so a row and its secret commit or roll back together; a rolled-back write
// leaves nothing readable. The column's trigger (SECURITY DEFINER, in
// keybroker's schema) checks every written value in the database: its data
// key must be of the row's project and the column's scope and not retired,
// read FOR KEY SHARE so that Reencrypt's FOR UPDATE retirement and its
// destroying DELETE fence writers in every process. A value sealed just
// before a concurrent Reencrypt retired its key is refused with SQLSTATE
// KB005; Refused maps that to ErrStaleKey (and drops the stale
// reservation), and Write runs the application's statement in a savepoint
// and seals again, so the caller's transaction survives. Unsealed values
// pass only while the column accepts legacy values (KB003 after). KB004
// marks a value for another project or column (ErrMisdirected).
//
// Data keys themselves are not part of the caller's transaction (see
// pgstore.Store.In): a rolled-back write leaves at most the project's
// active key with budget reserved, used by its next write. Under
// REPEATABLE READ or SERIALIZABLE a key created after the transaction's
// snapshot is invisible to the fence; use READ COMMITTED.
//
// # Batch reads
//
// OpenMany opens N values of a project, each distinct data key looked up
// once; with the SELECT of the rows it is one round trip for a workflow
// run's secrets (BenchmarkOpenMany10, docs/BENCHMARKS.md).
//
// # Re-encryption, verification, status
//
// Reencrypt rotates a project's data key of the column in place — retire,
// re-encrypt in verified batches with a guarded UPDATE, destroy the retired
// keys no row references — audited (dek.retire, dek.reencrypt, dek.destroy,
// detail.column) and resumable, while the application keeps writing.
// Verify opens every value and counts (never returning values); Status
// counts values by data key state and KEK version without decrypting.
// `keybroker column install|reencrypt|verify|status` runs them.
//
// # Legacy values: reading them, migrating them, refusing them
//
// A column adopted from an existing table starts with unsealed values
// (plaintext, or another scheme's ciphertexts such as MeshHook's "v1:").
// While its registry row accepts legacy values (accept_legacy, on at
// Install), a handle made with Options.Legacy (a legacy.Decoder, e.g. a
// chain of legacy.MeshHookV1 and legacy.Plaintext) opens sealed and
// unsealed values alike; it accepts an unsealed value only after reading
// accept_legacy from the database in that call (Open: one query; OpenMany:
// one for the call), and remembers a refusal for good, so a long-running
// reader never accepts a legacy value after RefuseLegacy committed.
//
// MigrateLegacy seals every unsealed value in place — keyset batches over
// the column's unique index, each one transaction: read, decode, Seal, a
// guarded UPDATE (WHERE value = the value read, so a row the application
// rewrote meanwhile is left to it), every updated row opened again and
// compared with the decoded plaintext before commit (ErrVerify rolls the
// batch back), one column.migrate_legacy audit event per batch. It is
// stateless and so resumable after any kill; values that do not decode are
// left as they are and reported by row (never by value). NOT NULL holds
// throughout and no plaintext is written anywhere new.
//
// RefuseLegacy ends it, in the database: one transaction sets
// accept_legacy to false — the fence trigger holds that row FOR SHARE
// while it accepts an unsealed write, so the UPDATE waits for those in
// flight and later ones wait for it — then counts unsealed values and
// rolls back with ErrLegacyRemaining unless there are none. After it the
// trigger refuses unsealed writes (KB003) and readers refuse unsealed
// values (ErrLegacyRefused). `keybroker column migrate|finish` runs them;
// docs/OPERATIONS.md, "MeshHook adoption", gives the steps.
package pgcolumn
