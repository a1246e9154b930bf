// Package e2e is keybroker's end-to-end suite: pgstore and the KEK providers against real
// servers, PostgreSQL, Vault and AWS KMS (local-kms) in containers run with
// testcontainers-go, and GCP KMS through provider/gcpkms/kmstest in process. It holds only
// tests; it is a module of its own so that the library's module does not depend on
// testcontainers.
//
// # Running
//
//	bash scripts/images.sh          # once per machine without registry access
//	cd e2e && go test -race -count=1 -timeout 40m ./...
//
// scripts/test.sh (`make test`) does both. Without a Docker engine the suite prints one
// line naming what is missing and passes; with CI set it fails instead.
//
// # Images
//
// The images are named by KEYBROKER_E2E_VAULT_IMAGE (default hashicorp/vault:1.21.0),
// KEYBROKER_E2E_LOCALKMS_IMAGE (nsmithuk/local-kms:3) and KEYBROKER_E2E_POSTGRES_IMAGE
// (postgres:15). A missing image is pulled where a registry is reachable; scripts/images.sh builds local images
// under the same names from the binaries scripts/deps.sh builds and from Debian's
// packages. The suite runs either kind the same way: Vault with an explicit entrypoint and
// a file-storage configuration, PostgreSQL through the official image's POSTGRES_*
// variables on port 5432.
//
// # Scenarios
//
// On each backend (local, Vault, AWS, GCP): the key lifecycle over 10,000 secrets in 50
// projects (rotate, rewrap, retire); moving from the local provider to the backend; two
// rewrap workers sharing the work; 100,000 legacy plaintext rows migrated under concurrent
// writers. Faults: Vault stopped in the middle of a rewrap batch and restarted; the
// migrating process's database connection cut at 20 random statements; PostgreSQL paused.
// Failover (TestFailover): a primary and a synchronous standby on a private network, three
// writer processes (internal/soak's soakworker, logging every acknowledged write) and a
// `keybroker import-plaintext` reaching them through a multi-host URL with
// target_session_attrs=read-write; the primary SIGKILLed, or cut from its standby and then
// from its clients; the standby promoted; the import rerun to completion; every acknowledged
// write read back at the promotion and at the end, `keybroker verify` and `status` exit 0.
// Every scenario checks counts and the bytes of every secret, never just the absence of an
// error.
//
// # Security choices
//
// Containers publish their ports on the engine's host; Vault runs with a root token and
// PostgreSQL with a fixed password, both throwaway and never reused outside the test
// process. Failures report counts of mismatched secrets, never their bytes. The reaper
// container (Ryuk) is disabled, since it would have to be pulled: every container is
// terminated by its test's cleanup, and a run killed before its cleanups has its
// containers removed by the next run (see ownerLabel).
//
// # What the servers do not reproduce
//
// local-kms is built with provider/awskms/testdata/local-kms.patch (RotateKeyOnDemand and
// key material ids, which the real service has): the public nsmithuk/local-kms image lacks
// them, so the AWS rotation scenarios need the patched image. Vault runs unsealed with one
// key share, without TLS. The GCP server's limits are listed in provider/gcpkms/kmstest.
package e2e
