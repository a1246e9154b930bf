// Package bench measures keybroker against the envelope-encryption
// libraries a user might already run, on the same payloads, in one process,
// and reports every figure as a ratio to raw crypto/cipher AES-256-GCM
// measured in the same run. `go run ./cmd/kbbench` runs it all and writes
// docs/BENCHMARKS.md and docs/benchmarks.svg; the Benchmark functions in
// bench_test.go run the same contenders under `go test -bench`.
//
// # Contenders
//
// In process, each with an in-process key: raw AES-256-GCM (the baseline),
// keybroker's envelope with the local provider (one cached DEK), Tink's KMS
// envelope AEAD, HashiCorp go-kms-wrapping's AEAD wrapper used directly (no
// envelope), go-kms-wrapping's envelope (EnvelopeEncrypt with the AEAD
// wrapper wrapping each message's DEK, as Vault's KMS seals do) and
// gocloud.dev's localsecrets. Against a key service: keybroker through Vault Transit and
// through AWS KMS (local-kms) with a cached DEK, against calling the key
// service for every secret. In the database: pgstore against pgcrypto's
// pgp_sym_encrypt_bytea/pgp_sym_decrypt_bytea and a plain bytea column.
//
// # Fairness
//
// Every contender produces bytes a caller can store and turns them back into
// the plaintext: go-kms-wrapping's BlobInfos are protobuf-marshalled, as Vault
// stores them. Associated data is passed where the contender supports it
// (localsecrets has none). Contenders are interleaved and repeated in rounds
// and the median of the rounds is reported, so a burst of noise on a shared
// machine hits one round of one contender, not a whole column.
//
// # Key-service calls
//
// Calls are counted, not inferred: keybroker's KEK provider is wrapped in
// a [CountingProvider], and the per-secret contenders count each API
// request they send.
package bench
