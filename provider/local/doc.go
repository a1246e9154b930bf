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
// with no key. primary names the one live version that Wrap uses. Field
// names are case-sensitive. Unknown fields, duplicate field names (two
// "primary" members, say, or "id" and "ID"), a field spelled in another
// case, trailing data and input over MaxKeyringSize are refused, each with a one-line
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
// the new keyring. A keyring from an environment variable is read-only
// (ErrReadOnly). A generated keyring changes in memory only; Save writes it
// to a new file.
//
// # Following the file
//
// Many processes may share one keyring file while an operator rotates and
// retires in another. A Provider from OpenFile follows the file: every
// Wrap, Unwrap, Rewrap and Describe first stats the file (one system call)
// and compares device, inode, mode, size, mtime and ctime with the file it
// last read or wrote; if any differs it re-reads the file, and if the bytes
// changed it takes the file's versions and primary as they are now. The
// staleness bound is therefore zero: a call sees every change that was on
// disk when its stat ran and that altered one of those fields. keybroker's
// own writes replace the file by rename, which gives it a new inode and a
// new ctime. A change that alters none of them (an in-place edit keeping
// the size within one timestamp tick) is seen at the next change or
// Refresh, except that an Unwrap of a version the keyring does not have
// re-reads the file whatever the stat says, so no change can hide a new
// version from Unwrap. Wrap never uses a version the file marks retired,
// and Unwrap refuses it. Refresh re-reads the file at once. Calls follow
// the path as it was given, through symbolic links, so a link re-pointed
// to a new file (as a Kubernetes Secret volume update does) is followed;
// Rotate and Retire write the file the path resolved to at OpenFile and
// refuse once it resolves elsewhere.
//
// If a re-read fails (the file is gone, malformed, loosened to mode 0644, or
// names another keyring id), the Provider keeps serving the keyring it last
// read and Describe and Refresh return the reason, matching
// provider.ErrUnavailable, until a re-read succeeds; the failure is not
// retried by calls until the file changes again (Refresh always retries).
//
// # Locking and temporary files
//
// Rotate, Retire and Save take an exclusive flock on the lock file
// ".<name>.lock" beside the keyring (created empty with mode 0600; never
// remove it), re-read the keyring under the lock and build their change on
// what it holds now, so two processes rotating at once both succeed and
// neither loses the other's version. Under the lock a change is also
// refused with ErrKeyringChanged if the file changed between that re-read
// and the write, which only a writer that ignores the lock (a hand edit)
// can cause. A write goes through ".<name>.tmp-*" in the same directory;
// a writer killed mid-write leaves that file, with every live key in it.
// OpenFile (when it can create the lock file) and every write remove such
// leftovers under the lock, so after Retire no file this package wrote in
// the directory holds the retired key. Locking needs a Unix system; on
// others Rotate, Retire and Save of a file refuse.
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
