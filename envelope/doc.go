// Package envelope encrypts payloads in process with AES-256-GCM under
// data keys (DEKs) that a [provider.KEKProvider] wraps, and defines the
// binary envelope format that carries them (docs/FORMAT.md).
//
// Two ways to use it:
//
//   - Self-contained: [New] returns an [Envelope] whose Encrypt output
//     carries the wrapped DEK inline; Decrypt needs only the KEK provider.
//   - External DEK: a store keeps wrapped DEKs in its own table. It makes a
//     key with [NewDataKey], seals with [SealWithKeyID] (the envelope names
//     the store's key id), finds the id again with [ParseHeader], loads the
//     key with [UnwrapDataKey] (through a [KeyCache]) and opens with
//     [OpenWithKey].
//
// # Format
//
// An envelope is magic "KBEN", version, algorithm, a key reference (inline
// wrapped DEK: provider, key id, key version, wrapped bytes; or an external
// key id), the 96-bit nonce, the ciphertext length, then ciphertext and
// tag. Every length has a hard bound checked before anything is allocated
// (MaxPlaintextLen, MaxAADLen, MaxKeyIDLen and the provider.Max* bounds).
// Parsing is strict: unknown versions, algorithms and reference kinds,
// truncation and trailing bytes are rejected, so each envelope has exactly
// one encoding and Parse followed by MarshalBinary returns the same bytes.
//
// # Associated data
//
// The GCM associated data is the whole header followed by the caller's aad
// prefixed with its 32-bit length: header || len(aad) || aad. The header
// is self-delimiting and the aad length-prefixed, so no two (header, aad)
// pairs give the same bytes. A blob moved to another record or tenant (other
// aad), or whose header was edited (another key reference or nonce), does
// not decrypt. Because the wrapped DEK is authenticated too, a self-contained
// envelope is re-keyed by decrypting and encrypting again; stores that need
// cheap KEK rotation use external DEKs and rewrap those in their own table.
//
// # Errors
//
// Every failed decryption returns [ErrDecrypt] and no plaintext: malformed
// or truncated input, an altered byte anywhere, wrong aad, a DEK that does
// not unwrap. Parse and ParseHeader return errors that match ErrDecrypt and
// name the malformed field (never its contents). Envelope.Decrypt returns
// something else only for failures that say nothing about the blob: a ctx
// error, [ErrClosed], or a provider outage, access denial or disabled key
// (errors.Is with provider.ErrUnavailable, ErrAccessDenied, ErrKeyDisabled),
// so callers can retry or alert instead of treating data as corrupt. The tag
// comparison is crypto/cipher's constant-time one; the package compares no
// other secret.
//
// # Nonces
//
// Nonces are 96 bits from crypto/rand, drawn inside the package for every
// message; no exported function accepts a nonce ([NewNonce] exposes the
// same source). They are read from the kernel per message, never buffered
// in the process, so a restored VM snapshot or a copied process image does
// not replay them. With q random nonces under one key, the probability that
// any two are equal is at most q(q-1)/2 / 2^96 < q^2 / 2^97. NIST SP
// 800-38D (section 8.3) requires this to stay below 2^-32, which allows
// q = 2^32 messages per key. Each DEK here has a message budget,
// [DefaultMaxMessages] = 2^24 (at most [MaxMessagesLimit] = 2^32 when set
// with [WithMaxMessages]), and an age limit, [DefaultMaxAge]. With 2^24
// messages the collision probability is below 2^48 / 2^97 = 2^-49, 2^17
// times under the NIST bound; with 2^20 it is below 2^-57. The budget is
// counted with one atomic increment per message and is never exceeded: a
// DataKey refuses the message that would exceed it (SealWithKeyID returns
// [ErrKeyExhausted]) and an Envelope makes and wraps a fresh DEK. At 2^24
// the cost is one KEK call per 16.7 million messages. The age limit is set
// by a timer when the key is made (so no message pays for reading the
// clock); a message sealed within the timer's latency of the deadline may
// still use the old DEK, which is harmless: age limits bound exposure, the
// count bounds nonce reuse.
//
// The budget counts messages sealed by one DataKey value in this process. A
// store that reloads a DEK with UnwrapDataKey and keeps sealing under it must
// carry the count across processes itself.
//
// # Concurrency
//
// Envelope and DataKey are safe for concurrent use with no lock on the
// encrypt or decrypt path: the active DEK sits behind an atomic pointer,
// the budget is an atomic counter, and a KeyCache hit takes a read lock.
// Cache entries expire by timer, so a hit does not read the clock either.
// When a DEK must be made, one caller wraps it and the others wait for it
// (or for their ctx): a burst of first uses is one provider call. Cache
// misses for one DEK are coalesced the same way. Failed unwraps are not
// cached, so each Decrypt of a forged inline envelope costs one Unwrap
// call: callers that decrypt untrusted blobs should rate-limit them.
//
// # Key material in memory
//
// A raw DEK exists in a []byte only between its generation (or the
// provider's Unwrap) and key expansion; the package clears it with
// provider.Clear right after, and keeps no other copy. What remains is the
// AES key schedule and GHASH key inside the crypto/cipher AEAD value, which
// Go does not let a caller zero. Destroy, cache eviction, Remove and Close
// therefore drop the package's only reference to that value, so no further
// operation can use it, and the garbage collector frees (without zeroing)
// its memory later. A memory dump taken before that can still contain the
// expanded key. The Go runtime may also have copied the slice the provider
// returned (providers clear what they control). Callers who need stronger
// guarantees need process isolation, not this package.
package envelope
