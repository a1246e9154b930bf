// Package meshhook is test support for keybroker's MeshHook integration:
// MeshHook's own tables verbatim, a fixture of legacy values made by
// Node's node:crypto as MeshHook makes them, a checker comparing every
// row with what was written, and an application writer (RunWriter, and
// the appwriter command for a separate OS process) that writes secrets
// rows the way MeshHook does. It is internal: tests import it, users never
// do.
//
// # Schema
//
// SchemaSQL is MeshHook's migration text for the projects and secrets
// tables, unchanged; CreateSchema runs it in a schema of the caller's
// choosing (search_path set for its own transaction only).
//
// # Fixture
//
// Generate runs fixture.mjs (embedded; Node 20+ found by
// testbin.Find("node"), node:crypto only) under a fresh random
// SECRETS_ENCRYPTION_KEY, passed to Node in its environment only. Standard
// is issue 13's data set: 20,000 rows over 50 projects (400 each), 8,000
// MeshHook v1 values (AES-256-GCM, random 12-byte IV, 16-byte tag, no
// associated data, "v1:<iv>:<tag>:<ct>" in standard base64), 10,800
// plaintexts and 1,200 plaintexts that start with "v1:" but have no
// well-formed v1 header (KindLookalike). Options can add KindForged rows:
// a well-formed header whose tag does not verify, which legacy's v1 decoder
// refuses by design (a migration must stop on them, not guess), so the
// standard set has none. Every row carries its plaintext; Load copies the
// projects and rows in with COPY.
//
// # Checking
//
// Expected holds, per (project, key), the SHA-256 of each value a row may
// hold: the fixture's, replaced by a writer's acknowledged write
// (ApplyLog), plus writes whose outcome is unknown (attempted after the
// last acknowledgement: cut by SIGKILL). Check opens every row of the
// secrets table with an Opener (LegacyOpener reads as MeshHook does
// today; a test after a migration passes one that opens sealed values)
// and reports counts and up to ten row names, never bytes.
//
// # Writer
//
// RunWriter upserts secrets rows as MeshHook does, one transaction per
// write, with a pluggable Encoder (the bytes that go into
// value_encrypted; it runs inside the write's transaction). Encoders are
// registered by name (RegisterEncoder) and built by NewEncoder: "v1" (the
// application before keybroker), "plaintext" (the oldest one) and
// "keybroker-store" (values in keybroker's own table through pgstore).
// An encoder for values sealed into the column itself registers under a
// name of its own, and appwriter's -mode takes it. Writers split the rows
// between them (Worker of Workers), so each log is the full history of its
// rows. Each log line is one write(2), so a SIGKILL never loses an
// acknowledged one.
package meshhook
