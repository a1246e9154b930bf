// Package provider defines how keybroker talks to key services: the small
// [KEKProvider] interface that wraps and unwraps data keys (DEKs) under a
// key-encryption key (KEK), the optional capabilities a backend may add, the
// portable errors every backend maps its native errors to, a URL registry
// that opens a backend from configuration, and a [Keyring] that lets a
// deployment wrap under one provider while still unwrapping under others.
//
// # Backends
//
// Each backend lives in its own package and registers a URL scheme when it
// is imported:
//
//	local://   github.com/profullstack/keybroker/provider/local
//	awskms://  github.com/profullstack/keybroker/provider/awskms
//	gcpkms://  github.com/profullstack/keybroker/provider/gcpkms
//	vault://   github.com/profullstack/keybroker/provider/vault
//
// Importing only provider/local keeps the cloud SDKs out of the build.
//
// # Capabilities
//
// A backend always implements [KEKProvider]. It may also implement
// [Rotator] (make a new primary key version), [Rewrapper] (re-encrypt a
// wrapped key to the primary version without the DEK leaving the key
// service), [Describer] (report the primary version and reachability) and
// [Retirer] (stop a version from unwrapping). Callers find these by type
// assertion, as with io.WriterTo.
//
// # Errors
//
// Backends return errors of type [*Error] whose Kind is one of
// [ErrKeyNotFound], [ErrAccessDenied], [ErrKeyDisabled], [ErrUnavailable] or
// [ErrInvalidCiphertext], so callers can use errors.Is across backends while
// errors.As still reaches the SDK's own error type. Error strings never
// contain key material, DEKs, plaintext or credentials.
//
// # Associated data
//
// Wrap and Unwrap take associated data (AAD) that the key service binds to
// the wrapped key: a wrapped DEK only unwraps with the same AAD. keybroker
// uses it to bind a DEK to its tenant, so a wrapped key copied to another
// tenant's row does not unwrap.
package provider
