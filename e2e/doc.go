// Package e2e is keybroker's end-to-end suite: the library against real PostgreSQL, Vault
// and AWS KMS (local-kms) servers in containers, and GCP KMS through provider/gcpkms's
// in-process server, run with testcontainers-go. It has only tests; this module is separate
// so that the library's own module does not depend on testcontainers.
package e2e
