// Package kmstest is an in-process, faithful stand-in for the Cloud KMS
// KeyManagementService, for tests. Google ships no KMS emulator; this
// server speaks the real gRPC API on a loopback listener with plaintext
// gRPC, so the real client library (kms.NewKeyManagementClient) talks to it
// unchanged, with only the endpoint and credentials options differing (see
// [Server.ClientOptions]).
//
// # What it implements
//
// CreateKeyRing, CreateCryptoKey (symmetric ENCRYPT_DECRYPT keys, with an
// initial primary version unless skip_initial_version_creation is set),
// GetCryptoKey, CreateCryptoKeyVersion, UpdateCryptoKeyPrimaryVersion,
// ListCryptoKeyVersions (paged, without filter or order_by),
// GetCryptoKeyVersion, UpdateCryptoKeyVersion (state ENABLED/DISABLED only),
// DestroyCryptoKeyVersion, Encrypt and Decrypt. Every other RPC answers
// Unimplemented.
//
// Each key version has its own random AES-256-GCM key. A ciphertext is the
// version id (4 bytes), a random 12-byte nonce and the GCM output; the
// version's full resource name is bound into the GCM associated data along
// with the caller's AAD, so a ciphertext whose version prefix is changed,
// or that is decrypted under another CryptoKey, fails with InvalidArgument.
// Encrypt and Decrypt verify request CRC32C checksums (InvalidArgument on
// mismatch), return response checksums and the Verified* flags, enforce the
// API's 64 KiB plaintext and AAD limits, answer FailedPrecondition for a
// disabled or destroyed version (or a key without a primary), NotFound for
// unknown resources, and report UsedPrimary on Decrypt.
//
// # Fault injection
//
// [Server.SetInterceptor] wraps every RPC, so a test can fail calls with a
// chosen status code or alter a response after the handler ran (for
// example corrupt a checksum) to exercise a client's error handling and
// integrity checks.
//
// # What it does not reproduce
//
//   - IAM, authentication and VPC Service Controls: every caller may do
//     everything; no PermissionDenied or Unauthenticated unless injected.
//   - Protection levels other than SOFTWARE (HSM, EXTERNAL, EXTERNAL_VPC),
//     other purposes and algorithms (asymmetric, MAC, raw encryption), key
//     import, Autokey, Key Access Justifications.
//   - The real ciphertext format: Cloud KMS ciphertexts are opaque and
//     differ from this server's; never persist this server's output.
//   - Scheduled destruction: destroying a version drops its key material
//     at once; there is no RestoreCryptoKeyVersion, and destroy_time is
//     only reported.
//   - Automatic rotation (rotation_period), List filters and ordering,
//     the other List RPCs, long-running operations, etags and update masks
//     other than "state".
//   - Real latency, quotas (ResourceExhausted), regional outages and the
//     eventual consistency of primary-version changes (up to a few hours
//     on the real service; here immediate).
//   - Persistence: state lives in memory and dies with the server.
package kmstest
