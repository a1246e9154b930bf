// Package meshhook is test support for keybroker's MeshHook integration:
// MeshHook's own tables verbatim, a fixture of legacy values made by
// Node's node:crypto as MeshHook makes them, a checker comparing every
// row with what was written, and an application writer (cmd appwriter)
// that writes secrets rows the way MeshHook does from a separate OS
// process. It is internal: tests and benchmarks import it, users never do.
//
// # Schema
//
// SchemaSQL is MeshHook's migration text for the projects and secrets
// tables, unchanged; CreateSchema runs it in a schema of the caller's
// choosing.
package meshhook
