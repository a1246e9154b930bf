// Package soak is the fleet soak test: several OS processes share one
// PostgreSQL database and one KEK while an operator process rotates,
// rewraps, re-encrypts and retires keys underneath them, as MeshHook runs
// keybroker. It runs in `make test` (go test ./...) on the local keyring
// file, on a real dev-mode Vault (internal/vaultserver), and on the local
// keyring with project p00 bound to a local-kms key of its own
// (internal/localkms) and unbound again round after round by the operator
// (`keybroker project set-kek` / `unset-kek`, TestSoak/tenant), against the
// PostgreSQL server internal/pgtest provides.
//
// # The fleet
//
// TestSoak builds cmd/keybroker and soakworker (this package's worker
// command) with go build, then per backend starts, as separate processes:
//
//   - 4 writers (soakworker -role writer), each with 2 goroutines, each
//     goroutine owning 12 secret names spread over 40 shared projects, and a
//     pgstore.Store with Budget 100 and ReserveChunk 10 so that data keys
//     turn over constantly. A goroutine writes seq 1, 2, ... of a random
//     name (Value makes each value from worker, name and seq, so the checker
//     can recompute it) and counts a write as acknowledged only when Put
//     returned nil; after each write it reads back one of its names and
//     checks it holds the last acknowledged value. Each writer prints a
//     WriterSummary.
//   - 1 operator (soakworker -role operator) looping the real CLI: rotate
//     (or rotate --retire on odd rounds), rewrap, reencrypt of a random
//     project, retire of every older version with `keybroker retire
//     VERSION` when the build has it, and status. Exit 5 (work remains) is
//     rerun, up to MaxReruns times; any other non-zero exit code is a
//     failure. It counts its rounds in the soak.progress row.
//
// Each writer goroutine runs until it has made -soak.ops Puts (default
// 8000, or $KEYBROKER_SOAK_OPS) or -soak.duration has passed (default 25s,
// or $KEYBROKER_SOAK_DURATION), whichever comes first, and in any case
// until the operator has completed 2 rounds under them (read from
// soak.progress), but never longer than 3 times the duration; a run that
// hits that cap fails. Once every writer has exited, the test closes the operator's
// stdin and it runs one final round alone, whose re-encryption is the
// last one.
//
// # Invariants
//
// Checked after every child has exited, from a fresh process: a new Store
// in the test process, the real `keybroker verify` and `keybroker status`
// (both must exit 0), and SQL on the database:
//
//   - every acknowledged last write reads back byte for byte (a write whose
//     Put failed may have committed: the stored value must then be that of
//     a seq between the last acknowledged and the last attempted one);
//   - no writer saw a Put or read-back fail, and no read-back returned
//     another value;
//   - no envelope committed under a retired (or missing) data key, or
//     under a data key whose KEK version was retired, as a deferred
//     constraint trigger on encrypted_secrets sees the data key when the
//     writing transaction commits (table soak.envelopes, which also records
//     every (data key, nonce) ever written);
//   - no data key created or rewrapped under a retired KEK version at
//     commit (a deferred trigger on data_keys, table soak.data_keys), and
//     none left under one at the end;
//   - all nonces distinct over every envelope ever committed;
//   - no data key over its budget: data_keys.messages <= 100, and no data
//     key sealed more than 100 envelopes in the history (which also covers
//     destroyed data keys);
//   - no retired data key left once the last reencrypt finished;
//   - the operator completed its rounds and every command exited 0 or 5.
//
// The history triggers and tables are created in the test's throwaway
// database only, after pgstore.Migrate; nothing of them is part of
// keybroker's schema.
//
// # Running it
//
//	go test -race -count=1 -run TestSoak ./internal/soak/
//	go test -count=1 -run TestSoak/vault ./internal/soak/ -soak.duration=10m
//	go test -count=1 -run TestSoak/local ./internal/soak/ -soak.seed=N
//
// The seed (printed with every run and, on failure, with the command that
// replays it) drives the projects the operator re-encrypts and the order in
// which writers pick names; process scheduling is not replayable, so a
// seed reproduces the workload, not the interleaving.
package soak
