// Command keybroker is the operator's tool for keybroker: it applies the
// schema, stores and reads secrets, rotates key-encryption keys (KEKs),
// rewraps and re-encrypts data keys, imports plaintext columns, verifies
// every secret and reports key status. `keybroker help` is the reference
// for configuration, provider URLs and exit codes; `keybroker demo` runs
// the whole job on a throwaway database.
//
// # Commands
//
//	demo              the main job end to end, with counts and timings
//	migrate           create or upgrade the schema
//	put/get/delete    one secret (put reads the value from stdin or a file)
//	list              a project's secret names
//	project delete    crypto-shred a project (all its data keys and secrets); project reopen
//	rotate            new KEK version, then rewrap (--retire: retire the old one)
//	rewrap            rewrap data keys not under the primary KEK version
//	reencrypt         fresh data key for a project
//	import-plaintext  encrypt an existing table's column into the store
//	status            data keys and secrets per provider and KEK version
//	verify            decrypt every secret, report failures by project/name
//	keygen            new local keyring file (0600, never overwrites)
//	version           the build: module version, VCS revision, Go version
//
// # Configuration
//
// Flags override environment variables (KEYBROKER_KEK,
// KEYBROKER_KEK_DECRYPT_ONLY, KEYBROKER_DATABASE_URL, KEYBROKER_SCHEMA, KEYBROKER_BUDGET,
// KEYBROKER_LOG_LEVEL, KEYBROKER_LOG_FORMAT), which override the JSON
// config file named by --config or KEYBROKER_CONFIG. JSON keeps the
// dependency list short; unknown keys are rejected so a misspelt key is not
// silently ignored.
//
// # Exit codes
//
// 0 success; 1 error (nothing partially written, a rerun continues);
// 2 usage (flags, arguments, configuration from any source, a provider URL
// or keyring its backend refuses to open); 3 status found a retired or
// missing KEK version still wrapping data keys; 4 verify found secrets that
// do not decrypt; 5 work remains (rewrap left data keys on older versions,
// reencrypt left an old data key in use, a retire is half done, or rotate
// --retire committed part of its work): the message says what committed
// and what to run; 130 interrupted.
//
// # Logs
//
// On stderr through log/slog: level warn by default when stderr is a
// terminal (the per-data-key and per-batch info lines would bury the
// progress bar), info otherwise, where they are the record.
//
// # Security
//
// Secret values never appear in argv (put reads stdin or --from-file), in
// logs, in errors or in progress output; get writes the value to stdout
// only. Errors are one line, "keybroker: <problem>", built from the
// libraries' errors, which name the problem but not key material; provider
// URLs are never echoed (their query may carry credentials) and database
// URL parse errors are replaced by a fixed message because pgx may quote
// the URL. keygen creates the keyring with mode 0600 through
// provider/local's Save, which refuses to overwrite. Every write takes
// --dry-run. Rotation, rewrap, retirement, re-encryption and imports are
// recorded by pgstore in key_events and logged here, without secrets.
//
// # The demo's PostgreSQL
//
// With KEYBROKER_DATABASE_URL set, demo works in a fresh schema
// kb_demo_<random> and drops it at the end. Otherwise it runs initdb and
// pg_ctl from /usr/lib/postgresql/*/bin (newest first) or beside postgres
// on $PATH, in a temporary directory, listening only on a Unix socket
// inside it (no TCP port, nothing else can connect). initdb refuses root,
// so as root the server runs as the SUDO_UID user, else as the postgres
// user, with the directory chowned to it (under /tmp when $TMPDIR is not
// reachable by that user). The server runs in its own process group so a
// terminal Ctrl-C reaches keybroker, which stops it and removes the
// directory before exiting 130. With no binaries installed it tries
// embedded-postgres (which needs its cached download), then says to
// install PostgreSQL (apt-get install postgresql).
//
// # Tests
//
// The tests run the real binary: testscript.Main makes the test binary
// double as keybroker, and testdata/script/*.txtar run against a fresh
// database per script from internal/pgtest, with the commands `sql` (raw
// SQL, to inspect or corrupt rows) and `exits N` (exit status). One test
// drives keybroker in a tmux pane to check the progress bar, the default
// log level and Ctrl-C. The man pages in docs/man are generated from the
// command tree (`go generate ./cmd/keybroker`, the hidden `keybroker man
// DIR`); TestManPages fails when they are out of date.
package main
