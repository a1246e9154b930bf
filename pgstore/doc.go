// Package pgstore keeps secrets envelope-encrypted in PostgreSQL, with
// per-project data keys wrapped by a KEK provider, KEK rotation and rewrap,
// data-key rotation (re-encryption), migration of plaintext secrets, status
// reporting and row-level security for multi-tenant deployments.
//
// # Schema
//
// Migrate creates a schema (default "keybroker") holding four tables,
// versioned with jackc/tern migrations embedded in the binary and recorded
// in <schema>.schema_version:
//
//   - kek: one row per KEK provider, key id and key version that has wrapped
//     a data key, with when it was first seen and retired. Metadata only.
//   - data_keys: each project's data keys in wrapped form, the kek row that
//     wrapped them, their budget use and state.
//   - encrypted_secrets: one envelope blob per (project id, name), the nonce
//     and data key id its header carries.
//   - key_events: an audit trail of key management; never secret material.
//
// Foreign keys are ON DELETE RESTRICT: a data key any secret needs, or a kek
// row any data key needs, cannot be deleted.
package pgstore
