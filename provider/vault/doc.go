// Package vault is a keybroker KEK provider backed by a HashiCorp Vault
// Transit key. Importing it registers the "vault" URL scheme:
//
//	vault://<mount>/keys/<name>?addr=https://vault.internal:8200
//
// <mount> is the path the transit engine is mounted at (it may contain
// slashes, "team/transit"); <name> the transit key. Query parameters:
//
//	addr=URL            Vault address (default: $VAULT_ADDR; one is required)
//	auth=token          (default) the token in token_file=PATH, else $VAULT_TOKEN
//	auth=approle        role_id=ID, role_id_file=PATH or $VAULT_ROLE_ID, and
//	                    secret_id_file=PATH or $VAULT_SECRET_ID
//	auth=kubernetes     role=NAME, jwt_file=PATH (default: the pod's service
//	                    account token, re-read at every login)
//	auth_mount=PATH     the approle or kubernetes auth mount (default: its name)
//	timeout=DURATION    bound on each operation, retries included (default 30s)
//	max_retries=N       retries of retryable failures, 0..10 (default 2)
//
// Unknown parameters are errors. Secrets (token, secret_id, jwt) are refused
// in the URL, which ends up in configuration files and logs; errors name
// the bad part of a URL, never a value. TLS is configured with the vault
// CLI's environment variables (VAULT_CACERT, VAULT_CLIENT_CERT, ...; note
// that VAULT_SKIP_VERIFY is honoured too: never set it in production).
// [New] takes a [Config] for programmatic use.
//
// # Checks at open
//
// Open logs in (AppRole, Kubernetes) or checks a static token with
// auth/token/lookup-self, then reads <mount>/keys/<name>. So a malformed
// URL, an unreachable address (ErrUnavailable), a rejected token
// (ErrAccessDenied) or a missing key (ErrKeyNotFound) fails at open, not at
// the first Wrap. The key must be aes256-gcm96 (Transit's default),
// aes128-gcm96 or chacha20-poly1305, without key derivation: only these
// bind associated data.
//
// # Policy
//
// The token needs update on <mount>/encrypt/<name> and
// <mount>/decrypt/<name>, read on <mount>/keys/<name> (open, Describe,
// Retire), update on <mount>/keys/<name>/rotate (Rotate) and
// <mount>/keys/<name>/config (Retire), and the default policy's
// auth/token/lookup-self and renew-self. Do not grant create on
// <mount>/encrypt/<name>: Transit's encrypt creates a missing key when
// allowed to, so a deleted key would silently come back empty.
//
// # Wrapped keys
//
// Wrap calls transit/encrypt with the DEK as plaintext and the caller's aad
// as associated_data, so Vault's AES-GCM binds the aad: a wrapped key only
// unwraps with the same aad. The WrappedKey holds the version N parsed
// strictly from Vault's "vault:vN:" prefix (a canonical positive decimal
// below 2^31) and the raw ciphertext bytes, not Vault's base64 text: Go's
// base64 decoder ignores the unused bits of the last character, so a
// flipped bit in the text could go unnoticed. Unwrap rebuilds the
// "vault:vN:" string, so a changed version tries the wrong key and fails
// authentication. Request and response bodies holding a DEK are built and
// read in buffers that are cleared afterwards; copies inside net/http's
// buffers cannot be.
//
// # Identity
//
// Ref is {Provider: "vault", KeyID: "<mount>/keys/<name>"}. The address is
// not part of it: the same key reached through another address (a load
// balancer, a performance standby, a DR name) is the same key, and moving
// Vault behind a new name must not orphan wrapped keys. Two distinct Vault
// clusters with equal mount and key names are therefore not told apart by
// Ref; the ciphertext still only decrypts under the key that made it.
//
// # Rotation, retirement and rewrapping
//
// Rotate calls keys/<name>/rotate; Describe reads keys/<name> (latest_version
// is the primary, Versions runs from min_decryption_version to latest).
// Retire(v) sets min_decryption_version to v+1 through keys/<name>/config:
// Vault's floor retires v and every earlier version together. Unwrapping a
// retired version yields ErrKeyNotFound (Vault's "too old"), not
// ErrInvalidCiphertext: the ciphertext is intact, its key is gone. Vault
// keeps the material until keys/<name>/trim, so retirement can be undone by
// an operator lowering the floor.
//
// The provider keeps no version state: Transit encrypts under the latest
// version and enforces min_decryption_version on every call, so a rotation
// or retirement made by another client (another process, the vault CLI)
// applies to this provider's next call.
//
// The provider does not implement provider.Rewrapper. Transit's rewrap
// endpoint ignores associated_data (Vault 1.21: the field is declared but
// never passed to decryption or encryption), so it cannot rewrap a DEK
// bound to aad; a test asserts this against the real server.
// provider.Keyring.Rewrap falls back to Unwrap then Wrap, which briefly
// holds the DEK in this process.
//
// # Errors
//
// Errors are *provider.Error; errors.As reaches *api.ResponseError. 403 is
// ErrAccessDenied (bad token or missing policy); 404 and Transit's "key not
// found" are ErrKeyNotFound; a 400 from decrypt is ErrInvalidCiphertext
// (authentication failure, malformed ciphertext: deliberately one kind),
// except a version above latest or below min_decryption_version, which is
// ErrKeyNotFound. 412, 429, 5xx other than 501 (503 when sealed),
// connection failures and the provider's own timeout are ErrUnavailable.
// Those are retried inside an operation with exponential backoff (200ms
// doubling to 5s, honouring Retry-After) up to max_retries; nothing else
// is. A caller's context always wins: a canceled or expired ctx stops
// retries at once and its error matches errors.Is(err, context.Canceled)
// or context.DeadlineExceeded, never ErrUnavailable. Tokens never appear
// in errors: Vault's messages are reduced to method, path, status and
// message text.
//
// # Tokens
//
// A token that expires is renewed by an api.LifetimeWatcher (first at
// once, then at about two thirds of its TTL). When it can no longer be
// renewed (max TTL, revocation), AppRole and Kubernetes log in again,
// retrying with backoff; a static token just expires. [Config.OnTokenEvent]
// reports each step. Close stops renewal; a renewal request already in
// flight finishes in the background within the timeout.
//
// # Testing
//
// Tests run a real Vault (built by `make deps`, started by
// internal/vaultserver, the launcher the soak test and bench/ share) in
// dev mode on a loopback port, with transit and approle enabled; two tests
// start their own server, one with -dev-tls (a throwaway CA, given through
// VAULT_CACERT) and one that they seal. Dev mode does not reproduce: high availability,
// standbys and request forwarding; unsealing with key shares, auto-unseal
// and HSMs; persistent storage (dev mode is in memory); namespaces,
// performance replication and other Enterprise features; client
// certificates and production PKI; a real Kubernetes cluster (Vault's
// Kubernetes auth method is real, but the TokenReview endpoint it calls is
// a small in-test server that authenticates JWTs signed by a test key);
// and network faults other than a refused connection, a silent server and
// a sealed one (no 429s, no latency). Policies are exercised only as far
// as the tests' narrow per-key policy.
package vault
