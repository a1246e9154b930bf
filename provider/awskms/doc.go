// Package awskms is the keybroker backend for AWS Key Management Service.
// Importing it registers the "awskms" URL scheme with package provider:
//
//	import _ "github.com/profullstack/keybroker/provider/awskms"
//	p, err := provider.Open(ctx, "awskms://alias/meshhook?region=eu-west-1")
//
// A key ARN contains ':' in what net/url takes for the host, so through
// provider.Open it is written after three slashes, as in gocloud.dev:
// awskms:///arn:aws:kms:eu-west-1:111122223333:key/1234abcd-... [Open] in
// this package also accepts it after two. Credentials come from the SDK's
// default chain (environment, shared config, web identity, container and
// instance roles), never from the URL.
//
// The credentials need kms:DescribeKey (at open, and about once a minute to
// read the current key material), kms:Encrypt, kms:Decrypt,
// kms:ReEncryptFrom and kms:ReEncryptTo on the key, and kms:RotateKeyOnDemand
// for Rotate.
//
// # Keys and versions
//
// The KEK is one symmetric encryption KMS key (SYMMETRIC_DEFAULT,
// ENCRYPT_DECRYPT), resolved at open time with DescribeKey: an alias is
// replaced by the key ARN it names, so wrapped keys record the key itself
// and keep unwrapping when the alias is pointed elsewhere.
//
// A version is the identifier of the key material AWS KMS reports current
// (KeyMetadata.CurrentKeyMaterialId, the KeyMaterialId of ListKeyRotations,
// ReEncrypt's DestinationKeyMaterialId): automatic and on-demand rotation
// change it, and earlier material keeps decrypting. Encrypt does not say
// which material it used and the ciphertext blob's format is undocumented,
// so Wrap labels a wrapped key with the material read before the call
// (cached for a minute; Describe, Rotate and Rewrap refresh it). A wrapped
// key may thus name older material than it was made with, which costs at
// most one needless Rewrap, never newer material, which would hide it from
// Keyring.NeedsRewrap. Rewrap uses ReEncrypt, so the DEK never leaves KMS.
// Rotate uses RotateKeyOnDemand and waits until the new material is current.
// A rotation made by another client applies to this provider's next Wrap,
// since KMS encrypts under the current material; only the label lags, by
// at most the minute it is cached.
// There is no Retirer: AWS KMS cannot withdraw one key material of a key.
//
// # Associated data
//
// The associated data is bound through the encryption context, as the
// single pair {EncryptionContextKey: base64url(SHA-256(aad))}. A digest
// rather than the data itself because AWS KMS bounds the encryption context
// in size and requires UTF-8 strings, while the associated data is any bytes
// of any length, and because CloudTrail logs the encryption context in the
// clear: tenant identifiers stay out of audit logs, yet an auditor who knows
// the tenant can still compute and match the digest. SHA-256's collision
// resistance keeps the binding as strong as the data itself.
//
// # Key pinning
//
// Decrypt and ReEncrypt name the expected key (KeyId, SourceKeyId and
// DestinationKeyId), so a ciphertext made under another key is refused by
// KMS (IncorrectKeyException) rather than decrypted with whatever key it
// names; a response naming another key is rejected too, and any plaintext
// in it cleared. Both yield provider.ErrInvalidCiphertext.
//
// # Errors, timeouts and retries
//
// KMS errors map to the portable kinds: NotFoundException to
// ErrKeyNotFound; DisabledException and KMSInvalidStateException (pending
// deletion or import) to ErrKeyDisabled; InvalidCiphertextException and
// IncorrectKeyException to ErrInvalidCiphertext; AccessDeniedException and
// credential errors to ErrAccessDenied; throttling, LimitExceededException,
// KMSInternalException, 5xx responses, timeouts and network errors to
// ErrUnavailable. The SDK error stays reachable with errors.As (for
// example smithy.APIError). The SDK's standard retryer retries retryable
// errors only, with jittered exponential backoff capped at two seconds, at
// most max_attempts times in all; every operation is bounded by the timeout
// parameter and by the caller's context, whichever ends first. A canceled
// or expired caller context yields an error matching it and no portable
// kind, so it is never reported as retryable.
//
// # Secrets
//
// The DEK travels to KMS inside a TLS request the SDK builds; keybroker
// cannot clear the SDK's copies of it. Plaintexts this package rejects are
// cleared. Error messages carry key ARNs and KMS's messages, never key
// material, and never the URL's query.
//
// # Testing against local-kms
//
// The tests run the conformance suite against local-kms
// (github.com/nsmithuk/local-kms), built by scripts/deps.sh with
// testdata/local-kms.patch, which adds RotateKeyOnDemand,
// CurrentKeyMaterialId in DescribeKey, IncorrectKeyException when Decrypt's
// KeyId is not the ciphertext's key (unpatched, local-kms decrypts with the
// named key and ignores the key the blob records, so a blob whose key field
// was altered still decrypted), and InvalidCiphertextException instead of a
// crash for a too-short ciphertext. local-kms does not reproduce: IAM and
// key policies (every request is allowed; AccessDeniedException only for
// Decrypt of an unknown key), grants, SigV4 verification (any credentials
// work), multi-Region keys, custom key stores, the HSM-backed blob format
// (local-kms's blob is ARN, material index and AES-GCM output), request
// quotas and throttling, asynchronous rotation and its per-key limit,
// ListKeyRotations and the KeyMaterialId fields of Decrypt and ReEncrypt,
// and the seven-day minimum before a key scheduled for deletion is gone.
package awskms
