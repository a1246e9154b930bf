// Package pgstore keeps secrets envelope-encrypted in PostgreSQL (through
// pgx/v5), with per-project data keys wrapped by a KEK provider, KEK
// rotation and rewrap, data-key rotation (re-encryption), migration of
// plaintext secrets, status reporting and row-level security for
// multi-tenant deployments.
//
// Set up once per database (any process, any number of times), then open a
// Store:
//
//	pool, err := pgstore.NewPool(ctx, databaseURL) // or any *pgxpool.Pool
//	err = pgstore.Migrate(ctx, pool, "keybroker")
//	s, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek, Actor: "meshhook"})
//	err = s.Put(ctx, projectID, "stripe-key", value)
//	value, err := s.Get(ctx, projectID, "stripe-key")
//	values, err := s.GetMany(ctx, projectID, []string{"stripe-key", "github-token"})
//
// GetMany reads up to MaxGetMany secrets of one project with one statement
// in one round trip (plus one per data key not yet cached); names that are
// not set are absent from its map.
//
// # Schema
//
// Migrate creates a schema (default "keybroker"; lower-case letters,
// digits and underscores, always quoted in SQL; not pg_* or
// information_schema, which pg_dump leaves out) holding five tables,
// versioned by jackc/tern migrations embedded in the binary and recorded in
// <schema>.schema_version. Concurrent Migrate calls serialise on advisory
// locks; each migration is one transaction. New refuses a schema at another
// version (ErrSchemaVersion).
//
//   - kek: one row per KEK provider, key id and key version that has wrapped
//     a data key, with when it was first seen and when it was retired.
//   - data_keys: each project's data keys in wrapped form, the kek row that
//     wrapped them, how many encryptions have been reserved under them
//     (messages) and their state: active (at most one per project, used for
//     new writes), spent (budget used up) or retired (awaiting
//     re-encryption).
//   - intermediate_keys: the key hierarchy's intermediate keys, by chain
//     and version, each wrapped under a kek row of the deployment's KEK.
//   - encrypted_secrets: one envelope per (project id, name) in
//     encrypted_data, the nonce its header carries, and the data key id it
//     names.
//   - shredded_projects: a tombstone per shredded project (see Project
//     shredding).
//   - key_events: the audit trail of key management (kek.record, dek.create,
//     kek.rotate, kek.rewrap, dek.corrupt, kek.retire, kek.retire.provider,
//     dek.retire, dek.reencrypt, dek.destroy, migrate.plaintext, ik.create,
//     ik.rotate, ik.rewrap, project.shred, project.reopen) with counts
//     and Config.Actor. Each batch's event commits in the batch's own
//     transaction, so a killed run leaves exactly the events of what it
//     committed.
//
// # Key hierarchy
//
// By default a data key is wrapped not by Config.KEK but by an
// intermediate key (package pgstore/hierarchy) kept in the
// intermediate_keys table and wrapped by Config.KEK: each process calls
// the key service once per live intermediate key per CacheTTL, not once
// per project, and a cache miss costs a local unwrap (Get reads the
// wrapped data key in its one round trip). RotateKEK then changes the KEK
// of the intermediate keys only, and Rewrap rewraps them (one key-service
// call each) before any data key; RotateIntermediate makes a new
// intermediate key, to which Rewrap moves data keys locally. Intermediate
// key versions are kek rows (provider "intermediate"), so Status, Rewrap
// and RetireKEK treat them like KEK versions; RetireKEK also refuses a KEK
// version that still wraps an intermediate key. Config.DirectKEK opts a
// deployment out (docs/SECURITY.md states the trade-off); both kinds of
// data key stay readable in either mode, and Rewrap moves them to the
// configured one.
//
// # Fences
//
// The third migration puts the invariants a fleet relies on into the
// database, so they hold whatever any process has in memory:
//
//   - kek rows are created only by the SECURITY DEFINER function
//     record_kek (owned by the migrating role), which writes the kek.record
//     event in the same statement.
//   - A trigger on data_keys refuses (SQLSTATE KB001) a data key inserted
//     or rewrapped under a retired kek row, reading that row FOR SHARE
//     against RetireKEK's FOR UPDATE: a row trigger for INSERT and, since
//     migration 012, one statement-level trigger for UPDATE that checks
//     the rows whose kek_id or project_id changed set-based (transition
//     tables), locking each kek row they name once. A Store refused so
//     refreshes its keyring (provider.Keyring.Refresh) and wraps again
//     once; a second refusal is ErrRetiredVersion.
//   - Put, MigratePlaintext and Reencrypt store an envelope only if its
//     data key row exists, belongs to the project and is not retired when
//     the statement runs (read FOR KEY SHARE; Reencrypt locks the keys it
//     retires FOR UPDATE, so a racing write waits and sees the retirement). Otherwise the write is redone under a fresh reservation, up
//     to a bound, then fails with ErrNoActiveKey; nothing is written.
//
// Foreign keys are ON DELETE RESTRICT: a data key any secret needs, or a kek
// row any data key needs, cannot be deleted; a secret can only reference a
// data key of its own project (composite key).
//
// # Project shredding
//
// ShredProject (or the SQL function shred_project, or an application's
// projects table with shred_project_trigger attached) crypto-shreds a
// project in one transaction: every data key row of the project, in every
// state, and every secret in encrypted_secrets go, and one project.shred
// event records the counts. Values an application sealed in its own tables
// under those data keys can then never be opened from this database. The
// project id keeps a tombstone: a trigger on data_keys refuses a new data
// key for it (SQLSTATE KB002, ErrProjectShredded) until ReopenProject. The
// fence is in the database, not in any process: the trigger takes a shared
// transaction advisory lock on the project id that the shred holds
// exclusively, and the shred locks the project's data keys FOR UPDATE
// against writes naming them FOR KEY SHARE; a write racing a shred either
// commits first and is shredded with the rest, or fails with
// ErrProjectShredded. Tied to the application's ON DELETE CASCADE:
//
//	CREATE TRIGGER keybroker_shred AFTER DELETE ON projects FOR EACH ROW
//	    EXECUTE FUNCTION keybroker.shred_project_trigger('id');
//	GRANT EXECUTE ON FUNCTION keybroker.shred_project(text, text) TO app;
//
// The trigger function runs as the role deleting the row, which needs
// EXECUTE on shred_project (SECURITY DEFINER, owned by the migrating role;
// EXECUTE is revoked from PUBLIC): EXECUTE is the power to shred any
// project, so grant it only to the role that deletes projects. Old
// database backups still hold the wrapped data keys; docs/SECURITY.md says
// what they can decrypt and until when.
//
// # Connection poolers
//
// Through a transaction-mode pooler (PgBouncer with pool_mode=transaction,
// Supabase's Supavisor on port 6543) a client holds a server connection only
// for one transaction, so session state does not follow it. pgx's default
// query exec mode, cache_statement, keeps named prepared statements
// (stmtcache_<hash>) per session: through such a pooler most statements fail
// with "prepared statement ... already exists" (SQLSTATE 42P05) or "does not
// exist" (26000). PgBouncer 1.21 and later can track protocol-level prepared
// statements (max_prepared_statements > 0); Debian 12 ships 1.18, and
// Supavisor's transaction mode does not support them.
//
// ParseConfig and NewPool (pgx style: ParseConfig, adjust, NewWithConfig)
// detect a pooler when the pool opens its first connection: PostgreSQL
// announces its backend's process ID at startup, a pooler a key of its own,
// so they compare it with pg_backend_pid(). Direct, the pool keeps
// cache_statement (the fastest: one parse and plan per statement and
// connection); through a pooler it uses PoolerSafeMode (cache_describe: the
// unnamed statement, parsed with each execution, in the same round trip),
// which costs a parse and plan per statement. A default_query_exec_mode in
// the URL is used as given.
//
// New checks its pool (one of its connections, so a mode a BeforeConnect
// hook chose counts): it fails with ErrPooler when the pool reaches
// PostgreSQL through a pooler in cache_statement or describe_exec mode that
// the URL did not name (name it for PgBouncer 1.21+ with
// max_prepared_statements), and with ErrInvalidArgument in exec or
// simple_protocol mode, which type parameters by their Go type and would
// send the audit trail's JSON as bytea. Every Store call is one
// transaction or one implicit transaction (its set_config for row-level
// security travels in the same one), so a transaction pooler serves it
// whole. MigratePlaintext holds a transaction per worker and needs one more
// connection meanwhile to reserve budget: give the pooler more server
// connections than Workers (default_pool_size ≥ Workers+1; likewise the
// pool's MaxConns), or the workers wait for each other until
// query_wait_timeout.
//
// Migrate takes session advisory locks, which a transaction pooler cannot
// keep (the unlock may reach another server connection and leave the lock
// held): through a pooler it fails with ErrPooler before changing
// anything. Run it over a direct connection (Supabase: the direct
// connection string, port 5432 of db.<project>.supabase.co); a session-mode
// pooler is refused too, as pgstore cannot tell it from a transaction-mode
// one.
//
// # Read replicas and failover
//
// Config.ReadPool points Get and GetMany at a hot standby (PostgreSQL's
// streaming replication; a replica pool of Supabase's). Each read takes
// the secret and its data key's wrapped form in one statement, so one
// snapshot of the standby, which replays the primary's commits in order:
// a secret is never read there without the data key it names. What the
// standby does not have yet (a Put it has not replayed, a new project's
// data key), what does not open there (a data key it still has wrapped
// under a KEK version the primary has since rewrapped away from and
// retired) and any of its errors are read again from the primary, whose
// answer is returned. So a process reads back every secret it created;
// to read its own updates back at once, not the value before, its writes
// must wait for the standby's replay: synchronous_commit = remote_apply
// with the standby in synchronous_standby_names (for example the pool's
// RuntimeParams, or options=-c%20synchronous_commit%3Dremote_apply in its
// URL). Everything else runs on the primary pool.
//
// For failover, give the primary pool a multi-host URL with
// target_session_attrs=read-write: operations in flight when the primary
// dies fail with an error, and the next connections reach the promoted
// standby. Only a synchronous standby keeps every acknowledged write
// (docs/OPERATIONS.md, "High availability").
//
// # Security
//
// What the database holds: ciphertexts, nonces, wrapped data keys and KEK
// metadata (provider name, key id, version). Never plaintext values,
// unwrapped data keys or KEK material: a copy of the database (a backup, a
// replica, a leaked dump) is useless without the key service. Errors and
// logs carry project ids, secret names and counts, never values or keys.
//
// Associated data. Each secret is sealed by envelope.SealWithKeyID with
// associated data "keybroker/secret/v1", project id and name, each
// length-prefixed, so a ciphertext copied to another row, name or project
// fails to decrypt (envelope.ErrDecrypt), as does a row whose nonce or data
// key id columns disagree with its envelope header. Each data key is wrapped
// with associated data "keybroker/dek/v1", project id and data key id, so a
// wrapped key moved to another row or project fails to unwrap. The purpose
// strings keep the two uses, and future layouts, apart. docs/STORAGE.md
// specifies the tables and both associated data byte by byte, with a worked
// example.
//
// Errors. Get (and GetMany, for the whole call) returns one error, matching envelope.ErrDecrypt, for every
// row that does not decrypt, whether the ciphertext or the data key (its
// wrapped form, its kek row, its row missing) was altered; outages, access
// denied and disabled keys stay distinct (see Get).
//
// Data keys and nonces. Each project has one active data key (a random
// 256-bit AES-GCM key), reused for up to Config.Budget encryptions and then
// replaced. The budget is counted in data_keys.messages: processes reserve
// Config.ReserveChunk encryptions at a time with a conditional UPDATE ...
// RETURNING, so together they never exceed it (unused reservations are
// lost, never reused). Nonces are random 96-bit values made by envelope;
// the default budget of 2^24 keeps the chance of a nonce collision under
// one key below 2^-49. Unwrapped data keys are kept in an envelope.KeyCache
// (bounded by entries and TTL, destroyed on eviction and Close), keyed by
// project and data key id, so a data_keys row relabelled to another project
// is unwrapped again under that project, and fails.
//
// Rotation. RotateKEK makes a new KEK version and Rewrap rewraps data keys
// to it (or from another provider of a provider.Keyring to its primary),
// touching data_keys only: batches read without row locks and written
// back by one compare-and-swap UPDATE each (a row changed meanwhile is
// left to the next pass), RewrapOptions.Workers batches at a time. It
// reports data keys it skipped (locked by another transaction past
// RewrapOptions.LockWait) or found corrupt, and recounts what remains. RetireKEK refuses a version still in use, and
// commits the database side before the key service's. When
// a data key may be exposed, Reencrypt moves a project's secrets to a fresh
// data key, verifying each row, then deletes the old data key's row, which
// crypto-shreds whatever it encrypted; the foreign key makes that delete
// fail rather than orphan a secret written concurrently.
//
// # Per-project KEKs
//
// SetProjectKEK binds a project to a KEK of its own (bring your own key:
// a customer's KMS key), checked by CheckTenantKEKURL against
// Config.TenantKEKSchemes (never the local scheme, no parameter naming a
// file) and probed with a wrap and an unwrap. The project gets its own
// chain of intermediate keys (table tenant_chains) under that KEK: new
// data keys are wrapped under it, Rewrap moves the existing ones (no
// secret re-encrypted), and the fence (SQLSTATE KB006: the row trigger
// data_keys_tenant_fence for INSERT, data_keys_update_fence for UPDATE)
// refuses a data key under another project's chain or, for a bound
// project, under the deployment's. A disabled or revoked project KEK makes
// that project's reads fail with provider.ErrKeyDisabled or
// ErrAccessDenied, not envelope.ErrDecrypt; other projects are not
// affected, and Rewrap does them and then reports the project. Only the
// tables' owner writes bindings; UnsetProjectKEK, ProjectKEK,
// RotateProjectIntermediate and Status.ProjectKEKs complete the API.
//
// # Recovery wraps
//
// AddRecovery wraps each of the deployment's intermediate keys under a
// recovery key as well (table intermediate_key_recovery); Recover, given
// that key, rewraps every intermediate key the Store's KEK can no longer
// unwrap under its new primary. Both are resumable, audited and
// O(intermediate keys); Status.Recovery shows the coverage.
//
// # Row-level security
//
// The second migration enables row-level security on data_keys,
// encrypted_secrets and key_events with a policy admitting only rows whose
// project_id equals the setting keybroker.project_id. It binds roles that
// are neither superuser, BYPASSRLS, nor the tables' owner, so give each
// tenant-facing service such a role, with USAGE on the schema, SELECT on
// schema_version and kek, SELECT and INSERT on key_events, SELECT, INSERT,
// UPDATE, DELETE on data_keys and encrypted_secrets, SELECT on
// intermediate_keys, and EXECUTE on the functions record_kek(text, text,
// text, text) and add_intermediate_key(text, integer, bigint, bytea, text)
// (the only way a tenant creates an intermediate key: it cannot alter or
// delete one) — and no INSERT, UPDATE or
// DELETE on kek (the third migration revokes them from every role but the
// owner), so a tenant can neither forge a KEK version nor mark one retired:
//
//	GRANT USAGE ON SCHEMA keybroker TO tenant;
//	GRANT SELECT ON keybroker.schema_version, keybroker.kek, keybroker.project_keks, keybroker.tenant_chains TO tenant;
//	GRANT SELECT, INSERT ON keybroker.key_events TO tenant;
//	GRANT SELECT, INSERT, UPDATE, DELETE ON keybroker.data_keys, keybroker.encrypted_secrets TO tenant;
//	GRANT EXECUTE ON FUNCTION keybroker.record_kek(text, text, text, text) TO tenant;
//	GRANT SELECT ON keybroker.intermediate_keys TO tenant;
//	GRANT EXECUTE ON FUNCTION keybroker.add_intermediate_key(text, integer, bigint, bytea, text) TO tenant;
//	-- only for the role that deletes projects (see Project shredding):
//	GRANT EXECUTE ON FUNCTION keybroker.shred_project(text, text) TO tenant;
//
// The owner is
// exempt unless you also run ALTER TABLE ... FORCE ROW LEVEL SECURITY
// (optional, and then record_kek cannot write its event; the
// key-management calls Rewrap, RetireKEK, Status and MigratePlaintext span
// projects and need an exempt role, and RetireKEK updates kek, which only
// the owner may).
//
// New detects whether the policies bind its pool's role
// (row_security_active). If so, each Store call sets keybroker.project_id
// to its project for its own transaction only (set_config(..., true),
// sent in the same round trip). Application queries on these tables can do
// the same with WithProject, which resets the setting on its connection
// afterwards even if the function set it for the whole session. Status
// needs an exempt role: under a bound one it returns ErrRowSecurity rather
// than counts of nothing. The policies are a second line of defence
// against a query that forgets its WHERE project_id: the setting is chosen
// by the application, not authenticated by the database.
package pgstore
