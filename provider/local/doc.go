// Package local is a keybroker KEK provider whose key-encryption keys live
// in the process: loaded from a keyring file or an environment variable, or
// generated. It wraps DEKs with AES-256-GCM from the standard library.
// Importing it registers the URL scheme "local" with provider.Register:
//
//	local:///etc/keybroker/keyring.json   keyring file (absolute path), see OpenFile
//	local://env/KEYBROKER_KEYRING         environment variable, see FromEnv
//
// It suits development, tests, single-host deployments and air-gapped
// installations. Where a cloud KMS or Vault is available, prefer it: there
// the KEK never enters the application's memory.
//
// # Keyring format
//
// A keyring is one JSON object:
//
//	{
//	  "id": "meshhook",
//	  "primary": 2,
//	  "keys": [
//	    {"version": 1, "created": "2026-01-02T03:04:05Z", "retired": true},
//	    {"version": 2, "key": "<standard base64 of 32 bytes>", "created": "2026-06-01T00:00:00Z", "retired": false}
//	  ]
//	}
//
// id is the KeyID in Ref and in every WrappedKey: 1-128 characters from
// [A-Za-z0-9._-], starting with a letter or digit. Each entry of keys has a
// distinct version (1 to 2^32-1), an optional RFC 3339 created time and
// either a key of exactly 32 bytes in standard base64 or "retired": true
// with no key. primary names the one live version that Wrap uses. Unknown
// fields, duplicate field names (two "primary" members, say), trailing
// data and input over MaxKeyringSize are refused, each with a one-line
// error that names the problem and the version but never quotes a key.
//
// An environment variable holds the same JSON, either as is or in standard
// base64 (line breaks allowed), for platforms that mangle JSON in variables.
//
// # Versions
//
// WrappedKey.Version is the key version in decimal ("1", "2", ...). Rotate
// adds the next version and makes it primary; older versions keep
// unwrapping. Only Retire stops a version from unwrapping; it destroys the
// version's key but keeps its number in the keyring, so numbers are never
// reused. The primary cannot be retired.
//
// A keyring opened from a file persists Rotate and Retire to that file
// before the change takes effect in memory: the new file is written beside
// the old, synced and renamed over it, so a crash leaves either the old or
// the new keyring. If the file changed since this process read it (another
// process rotated, say), the change is refused with ErrKeyringChanged
// rather than overwriting the other process's keys. Two processes changing
// the same file at the same instant are not excluded: run rotations from
// one place. A keyring from an environment variable is read-only
// (ErrReadOnly). A generated keyring changes in memory only; Save writes it
// to a new file.
//
// # Wire format
//
// Wrap returns the ciphertext
//
//	0x01 || nonce (12 bytes, random) || AES-256-GCM(dek) || tag (16 bytes)
//
// with GCM additional data
//
//	"keybroker/local/v1" 0x00 || len(id) (1 byte) || id || version (4 bytes, big endian) || aad
//
// so a ciphertext relabelled with another keyring id or version, or given
// other aad, fails authentication. The leading 0x01 (the format version)
// is not part of the additional data; Unwrap refuses any other value, so
// changing it fails all the same. docs/STORAGE.md works an example. Nonces come from crypto/rand inside
// crypto/cipher (NewGCMWithRandomNonce). With random 96-bit nonces one key
// version must not wrap more than 2^32 DEKs; rotate well before that.
//
// # Errors
//
// Every error is a *provider.Error with Provider "local". A version the
// keyring never had, or has retired, matches provider.ErrKeyNotFound; a
// ciphertext that fails authentication for any reason matches
// provider.ErrInvalidCiphertext and says nothing more. A missing keyring
// file or unset environment variable matches provider.ErrKeyNotFound. A
// canceled context is returned as ctx.Err() before any work.
//
// # Security
//
// A keyring file must have mode 0600 or stricter (mode & 0o077 == 0); the
// check does not look at the owner or at ACLs. Files this package writes
// are created with mode 0600.
//
// Key bytes are cleared (provider.Clear) when a version is retired, when
// loading fails, and from the buffers used to read and write keyring files.
// This narrows exposure; it cannot close it: the Go runtime and
// encoding/json keep internal copies (the JSON decoder's buffer, the AES
// key schedule inside crypto/cipher), the environment variable's value
// stays in the process environment, and the garbage collector may have
// moved bytes before they were cleared. An attacker who can read the
// process's memory, core dumps or swap can read the keys. Disable core
// dumps and swap for processes that hold a local keyring.
//
// Errors never contain key bytes, DEKs or the contents of the keyring.
package local
