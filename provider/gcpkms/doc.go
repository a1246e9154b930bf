// Package gcpkms is the keybroker backend for Google Cloud KMS. Importing it
// registers the "gcpkms" URL scheme with package provider:
//
//	import _ "github.com/profullstack/keybroker/provider/gcpkms"
//	p, err := provider.Open(ctx, "gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K")
//
// The KEK is one symmetric CryptoKey (purpose ENCRYPT_DECRYPT). Credentials
// are Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS,
// gcloud's user credentials, the metadata server, workload identity),
// never the URL. A malformed resource name, or missing credentials, is a
// one-line error at open time; Open makes no RPC, so a key that does not
// exist or may not be used shows at the first operation (or call
// Describe). [Open] takes option.ClientOption values and [New] an existing
// *kms.KeyManagementClient, for callers (and tests) that configure the
// client themselves.
//
// # Emulators and URL parameters
//
// Google ships no KMS emulator. For a stand-in such as this module's
// kmstest server, the URL accepts endpoint=host:port (option.WithEndpoint)
// and insecure=true (plaintext gRPC, no credentials sent). insecure=true is
// refused unless the endpoint is a loopback address: DEKs travel in the
// requests, and plaintext gRPC must not leave the machine. No other
// parameter is accepted.
//
//	gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k?endpoint=127.0.0.1:9011&insecure=true
//
// A Provider opened from a URL owns its client; release it with Close
// (provider.Open returns it as a provider.KEKProvider that is an io.Closer).
//
// # Versions
//
// A WrappedKey's Version is the CryptoKeyVersion id (for example "3"), the
// last segment of the name Encrypt returns; KeyID already holds the
// CryptoKey name, so the full version name is KeyID + "/cryptoKeyVersions/"
// + Version. Decrypt takes the CryptoKey name and Cloud KMS finds the
// version from the ciphertext, so Unwrap only checks the Version's syntax.
// Rotate (Rotator) creates a CryptoKeyVersion and makes it primary; the
// real service propagates a primary change with some delay, and Wrap always
// records the version it was actually given. Describe (Describer) reads the
// primary version with GetCryptoKey and lists the ENABLED versions (those
// that can still unwrap) with ListCryptoKeyVersions. Retire (Retirer)
// disables a version (UpdateCryptoKeyVersion, state DISABLED), which is
// reversible; destroying it for good (DestroyCryptoKeyVersion, with Cloud
// KMS's scheduled-destruction window) is left to an operator. Retire
// refuses the primary. The provider caches no version state, so a rotation or
// retirement made by another client applies to its next call (subject to
// Cloud KMS's own propagation delay).
//
// # Rewrap
//
// Cloud KMS has no re-encrypt RPC, so Rewrap (Rewrapper) decrypts and
// encrypts again; the DEK is held in memory only between the two calls and
// cleared. Decrypt reports whether the primary version decrypted
// (UsedPrimary): in that case the wrapped key is already current and Rewrap
// returns a copy of it unchanged without calling Encrypt, which makes a
// rewrap pass over rows that are mostly current cheap.
//
// # Integrity
//
// Following Google's data-integrity guidance, every Encrypt and Decrypt
// sends CRC32C (Castagnoli) checksums of the plaintext or ciphertext and of
// the AAD, and every response is checked: on Encrypt the
// VerifiedPlaintextCrc32C flag (and VerifiedAdditionalAuthenticatedDataCrc32C
// when AAD was sent), the ciphertext checksum, and that the version named
// belongs to this key; on Decrypt the plaintext checksum. A response that
// fails is discarded (any plaintext cleared) and the call reissued, at most
// three times in all, as Google asks for "a limited number of retries". If
// every attempt fails, the error wraps [ErrIntegrity] and is of kind
// provider.ErrUnavailable: corruption in transit is transient, and the
// caller's retry policy applies. A request checksum the service finds wrong
// comes back as InvalidArgument and is not retried.
//
// # Errors, timeouts and retries
//
// gRPC codes map to the portable kinds: NotFound to ErrKeyNotFound;
// PermissionDenied and Unauthenticated to ErrAccessDenied;
// FailedPrecondition (version disabled or scheduled for destruction, key
// without a primary) to ErrKeyDisabled; InvalidArgument on Decrypt (wrong
// key, wrong AAD, altered ciphertext) to ErrInvalidCiphertext; Unavailable,
// ResourceExhausted and DeadlineExceeded from the service to
// ErrUnavailable. Other codes (Internal, InvalidArgument on Encrypt) carry
// no kind. The gRPC status stays reachable: status.Code(err), or errors.As
// with *apierror.APIError (github.com/googleapis/gax-go/v2/apierror).
//
// Idempotent RPCs (Encrypt, Decrypt, GetCryptoKey, GetCryptoKeyVersion,
// ListCryptoKeyVersions, UpdateCryptoKeyPrimaryVersion,
// UpdateCryptoKeyVersion) are retried by the client library's gax call
// options on Unavailable, ResourceExhausted and DeadlineExceeded, with jittered exponential backoff from 100 ms doubling
// to 5 s; CreateCryptoKeyVersion is not retried, as a retry could create a
// second version. Retries continue until the caller's context ends (or
// gax's 60 s per-call default when the context has no deadline). A
// canceled or expired caller context always wins: the error matches
// context.Canceled or context.DeadlineExceeded, has no portable kind, and
// is never retryable.
//
// # Secrets
//
// DEKs travel to Cloud KMS inside TLS gRPC requests the client library
// builds; keybroker cannot clear the library's copies. Plaintexts this
// package rejects or discards are cleared. Errors carry resource names and
// Cloud KMS's messages, never key material and never the URL's query.
//
// # Testing
//
// The tests run the conformance suite and this package's own tests against
// kmstest, an in-process gRPC KeyManagementService on loopback that the
// real client library talks to; see that package for what it does not
// reproduce of Cloud KMS (IAM, HSM and EKM protection levels, real latency
// and quotas, key import, the real ciphertext format, scheduled
// destruction). Nothing in the tests reaches Google.
package gcpkms
