// Package pgcolumn encrypts values an application stores in its own
// tables, in the spirit of Rails' `encrypts :value`: one declaration per
// encrypted column, sealed and opened with the project data keys that
// pgstore keeps in keybroker's data_keys table.
//
// This file is the lead's skeleton: the types and contracts below are
// fixed; the implementation is being written (see the engineers' task
// files). Replace this paragraph with the real package documentation.
//
// # Shape
//
//	store, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek})
//	col, err := pgcolumn.New(ctx, store, pgcolumn.Column{
//		Table: "public.secrets", Project: "project_id", Key: []string{"key"}, Value: "value_encrypted",
//	}, pgcolumn.Options{})
//	sealed, err := col.Seal(ctx, projectID, []string{name}, value)
//	// the application: INSERT INTO secrets (project_id, key, value_encrypted) VALUES ($1, $2, $3)
//	value, err := col.Open(ctx, projectID, []string{name}, sealed)
//
// # Binding
//
// A sealed value is a keybroker envelope (docs/FORMAT.md) with an external
// key reference: the 16 bytes of a data_keys id. Its associated data
// (ContextAAD) binds the column (table and column names as declared), the
// project id and the row's key column values, so a value copied to another
// row, column or project fails to open with envelope.ErrDecrypt. The data
// keys of a column form their own scope in data_keys (Column.Scope), so
// re-encrypting a column never retires or destroys the keys of keybroker's
// own secrets table or of another column, and KEK rotation, rewrap and
// retirement (pgstore) never touch application tables.
package pgcolumn
