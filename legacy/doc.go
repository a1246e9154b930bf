// Package legacy decodes secret values stored before keybroker, so a store
// can read them while a migration reseals them in keybroker's format. It
// does one job: stored bytes in, plaintext (or a reason) out. It never
// encrypts, and it imports no database driver or cloud SDK.
//
// A [Decoder] has one method, Decode(stored) (plaintext, ok, err), with
// three outcomes: "mine, here is the plaintext" (ok), "not mine" (neither
// ok nor err; try the next decoder) and "mine but broken" (err). A [Chain]
// tries decoders in order and stops at the first that claims the value,
// with its plaintext or its error. Decoders provided:
//
//   - [Plaintext]: claims everything; the stored bytes are the plaintext.
//     It must be last in a chain ([NewChain] enforces this).
//   - [MeshHookV1]: MeshHook's "v1:<iv>:<tag>:<ct>" values, AES-256-GCM
//     under the key in SECRETS_ENCRYPTION_KEY ([ParseMeshHookKey],
//     [MeshHookV1FromEnv]).
//   - [Func]: any Go function with Decode's signature.
//
// [Open] makes a decoder from a URL, meshhook-v1://env/VARNAME or
// plaintext://, so configuration names decoders as it names KEK providers;
// the key itself is read only from the environment, never from the URL.
//
// # Look-alike plaintexts
//
// MeshHook's table holds plaintexts that begin with "v1:" but are not
// ciphertexts, so "starts with v1:" cannot decide. MeshHookV1 claims a
// value exactly when it has a well-formed header: "v1:", 16 characters of
// canonical standard base64 decoding to the 12-byte IV, ":", 24 characters
// decoding to the 16-byte tag, ":". A value without that header is not
// claimed, and a chain ending in Plaintext returns it unchanged: "v1:",
// "v1:abc:def:ghi", an API token with colons, a header with an unpadded,
// URL-alphabet, non-canonical or wrong-length field.
//
// A value with the header is claimed, and from then on every failure is an
// error, never plaintext: a ciphertext field that is not canonical base64
// or is over the bound, or a tag that does not verify. The argument:
//
//   - A real plaintext has that header only if someone built it to look
//     exactly like a v1 ciphertext (for example pasted a ciphertext from
//     another deployment as a secret). That is rare and deserves an
//     operator's eye.
//   - A tag that fails on a real ciphertext means the value was altered or
//     truncated, or the key is wrong. The wrong key is the likely case (a
//     mistyped SECRETS_ENCRYPTION_KEY, a key read in the wrong form), and
//     there treating failures as plaintext would hand the v1 text itself to
//     the application as the secret, and a migration would seal it,
//     silently replacing every encrypted secret with its own ciphertext.
//
// So the uncertain case fails loudly and stops: nothing is decoded wrongly
// and nothing is written. The decision depends only on the stored bytes,
// never on the key or a decryption attempt, so it is the same for every key
// and is no oracle. Exact parsing also means each accepted value has one
// encoding: encoding/base64 skips CR and LF even in strict mode, so each
// field's length is checked against its decoded length as well.
//
// # Errors
//
// Every claimed value that does not decode fails with an error matching
// [ErrDecrypt], which matches envelope.ErrDecrypt: readers treat a broken
// legacy value as they treat a broken envelope. The error may name the
// malformed field or a length, which say nothing the stored value does not;
// no plaintext is returned with it. [ErrClosed] (a decoder used after
// Close) is distinct. Errors start with "legacy:" and never contain key
// bytes, key text, stored values or plaintext; key-parsing errors name the
// environment variable, never its value.
//
// # Cryptography
//
// Decryption is crypto/cipher's AES-GCM with the standard 12-byte nonce and
// 16-byte tag and no associated data, as MeshHook's node:crypto code
// encrypts; the tag comparison is its constant-time one. The only other
// secret-dependent work is parsing the key, done once at start-up from the
// environment, not on input an attacker chooses. MeshHook values carry no
// associated data, so a v1 value moved to another row still decrypts; that
// is MeshHook's format, and the reason to migrate.
//
// # Key
//
// [ParseMeshHookKey] accepts exactly three forms, in this order: 64 hex
// digits; 44 characters of canonical padded standard base64 of 32 bytes; a
// passphrase of at least 32 characters (UTF-16 code units, JavaScript's
// String.length), hashed with SHA-256 over its UTF-8 bytes. Earlier forms
// win (a 64-hex passphrase is hex). Unpadded or URL-alphabet base64 is a
// passphrase. Leading or trailing white space and invalid UTF-8 are errors,
// never trimmed. A key read the wrong way shows as ErrDecrypt on every v1
// value, never as wrong plaintext.
//
// [MeshHookV1] takes ownership of the 32 key bytes: it expands them into
// the AES key schedule and clears them before returning. Close drops the
// schedule (Decode then returns ErrClosed); crypto/aes offers no way to
// zero it, so it is left to the garbage collector, as in package envelope.
// The key text stays in the process environment; unset the variable after
// opening if nothing else reads it.
//
// # Bounds
//
// A v1 ciphertext field longer than the base64 of MaxMeshHookPlaintextLen
// (envelope.MaxPlaintextLen, so every decoded value can be sealed again) is
// refused before it is decoded. Decode makes one buffer of the
// decoded length and opens in place; it never modifies stored, and the
// plaintext never aliases it.
package legacy
