// Package hierarchy is the key hierarchy of pgstore: intermediate keys
// (IKs) stored in the database, wrapped under the deployment's KEK, that
// wrap the projects' data keys locally. A process then calls the key
// service once per live IK per cache lifetime, whatever the number of
// projects, and a data key cache miss costs a local AES-GCM open instead of
// a key-service round trip. pgstore.New uses it unless Config.DirectKEK;
// most programs never touch this package directly.
//
// # Keys and layout
//
// An IK is 32 bytes from crypto/rand, version n of a chain (Config.KeyID,
// DefaultKeyID for the deployment's), stored in pgstore's
// intermediate_keys table wrapped by the KEK with the associated data
//
//	u32(15) "keybroker/ik/v1" u32(len(chain)) chain u32(4) u32(n)
//
// A data key wrapped under it is 01 || 12-byte random nonce ||
// AES-256-GCM(dek) || tag, with the additional data
//
//	u32(19) "keybroker/ik-dek/v1" u32(len(chain)) chain u32(4) u32(n) u32(len(aad)) aad
//
// and its provider.WrappedKey names provider Scheme, key id the chain and
// version n in decimal, so pgstore's kek table records IK versions like
// any KEK version. docs/STORAGE.md specifies both byte by byte, with a
// worked example that pgstore's tests decrypt by hand.
//
// # Versions, rotation and fences
//
// Versions are 1, 2, … with no gaps; the highest is current. A new version
// is made by the first Wrap on an empty chain, by the first Wrap after the
// current version is Config.RotateAfter old (by the database's clock), and
// by Rotate. The database is the fence: add_intermediate_key inserts
// version n+1 only if n exists and n+1 does not, so however many processes
// race, each version is made once and every process converges on the same
// current version (each rereads after losing). Rotate in several processes
// at once therefore makes at least one new version, not one per caller.
//
// Every version stays usable for Unwrap until Retire deletes it
// (pgstore.Store.RetireKEK does, after checking that no data key still
// needs it and marking its kek row retired, which the data_keys trigger
// then enforces against every process). The current version cannot be
// retired.
//
// # Key-service calls
//
// Wrap calls the KEK only to wrap a new IK; Unwrap and Rewrap call it only
// to unwrap an IK this process does not hold (once per version per
// Config.CacheTTL). Rewrap from one IK to another is local: pgstore.Rewrap
// moves every data key to a new IK without a key-service call per data
// key. RewrapKEK rewraps the IK rows after a KEK rotation or a move between
// backends: one call per IK, whatever the number of data keys.
//
// # Errors
//
// Errors are *provider.Error values of provider Scheme: a tampered or
// relabelled wrapped key is ErrInvalidCiphertext; a version the table lacks
// is ErrKeyNotFound; the KEK's own errors unwrapping an IK are returned
// within (errors.Is finds their kind); a database failure is
// ErrUnavailable, or ErrAccessDenied when the role lacks the grants
// pgstore's doc lists. No error carries key material.
//
// # Memory
//
// Unwrapped IKs are held as AES-GCM key schedules for Config.CacheTTL; the
// raw bytes are cleared once the schedule is built. A memory dump of the
// process can expose them, and with them every data key of the chain:
// docs/SECURITY.md ("The key hierarchy") states the trade-off and how to
// opt out.
package hierarchy
