// Package crashtest holds tests, and no code: they SIGKILL the real
// keybroker binary (syscall.Kill(pid, SIGKILL), not a cut connection) in
// the middle of the operator's long commands and check that a plain rerun
// finishes the job with nothing lost, nothing left half done and an exact
// audit trail.
//
// The test builds ./cmd/keybroker with `go build` once per test binary and
// runs it against a fresh database on the server internal/pgtest provides,
// with a local keyring file (local:///…/keyring.json) made by `keybroker
// keygen`. Six tests, one per command:
//
//   - TestCrashImport: `import-plaintext --clear-plaintext --batch 40` of
//     a 20,000-row text table (values of 1-120 characters of 1- to 4-byte
//     UTF-8), in four rounds that add 5,000 rows each, three kills a round;
//   - TestCrashRewrap: `rotate` (killed once per round), then `rewrap
//     --batch 10` of 600 data keys, killed two or three times, four rounds;
//   - TestCrashReencrypt: `reencrypt PROJECT --batch 20` of a 1,500-secret
//     project beside one it must not touch, three kills in each of four
//     rounds;
//   - TestCrashRotateRetire: `rotate --retire --batch 25` over 300 data
//     keys, eight rounds, finished with `rewrap` and `retire VERSION` when
//     the kill landed after the rotation (a rerun of `rotate --retire`
//     would rotate again), and in half of those the `retire` is killed too.
//   - TestCrashColumnReencrypt: `column reencrypt PROJECT --batch 20` of
//     1,000 values in MeshHook's own secrets table (pgcolumn) beside a
//     project it must not touch, three kills in each of four rounds; the
//     values are read back through pgcolumn, the audit checked against the
//     column's retirements;
//   - TestCrashColumnMigrate: `column migrate --legacy
//     meshhook-v1://env/SECRETS_ENCRYPTION_KEY --batch 200` of issue 13's
//     20,000 Node-made MeshHook rows in place, killed four times while two
//     application writers (internal/meshhook's appwriter, separate
//     processes: v1 and sealed) write; after the v1 writer stops, a rerun
//     exits 0 and every value opens without a legacy decoder to the
//     fixture's or the writers' acknowledged value; then `column finish`,
//     a project deleted through MeshHook's cascade and the shred trigger,
//     and the application flow (Write in a transaction, a rollback, a
//     run's 10 secrets in one OpenMany).
//
// # Where the kill lands
//
// Each kill point is drawn from a seeded generator and defined by what the
// child has done, never by elapsed time, so every assertion holds wherever
// the kill lands:
//
//   - line: when the N-th line appears on the child's stderr (it runs with
//     --log-level debug; pgstore logs each committed batch), after a
//     seeded delay of a few milliseconds that moves the kill into the
//     next batch;
//   - events-locked: after N lines the test takes LOCK TABLE key_events IN
//     SHARE MODE and kills the child once PostgreSQL reports it waiting
//     for that lock (pg_blocking_pids): inside a transaction that has
//     written its rows but not its audit event or commit; with N = 0 in
//     `rotate` that is after the keyring file was rewritten and before the
//     new version's kek.record event;
//   - retire-events-locked: the test holds the retiring version's kek row
//     FOR SHARE, waits until the child's RetireKEK waits for it, locks
//     key_events instead and releases the row, and kills once the child
//     waits again: before the database side of the retire commits (or,
//     on a rerun that finds it committed, after the provider retired and
//     before kek.retire.provider); when RetireKEK retired the keyring
//     first, this was the review's half state "keyring retired,
//     kek.retired_at NULL";
//   - retire-keyring-locked: the same, with the keyring's lock file
//     (flock) as the second lock, which the local provider takes to
//     rewrite the file: after the database side committed and before the
//     provider retires (/proc/locks shows the child waiting);
//   - tmp-created: when the child creates its N-th keyring temporary file
//     (inotify on the keyring's directory): during the keyring write.
//
// A run that ends before its kill point exits by itself and must exit 0; it
// is not counted as a kill. After a kill the test waits until the killed
// process's database sessions are gone (application_name is unique per run)
// and releases its locks, so a rerun never skips rows a dead process still
// holds.
//
// # What is checked
//
// After each round (one or more kills, then a rerun that must exit 0):
// every secret reads back byte-exact through a fresh pgstore.Store compared
// with the values the test generated, and the set of stored secrets is
// exactly the expected one; `keybroker verify` and `keybroker status` exit
// 0; audit counts are exact against test-only triggers that count committed
// row changes in a history table (sum of migrate.plaintext counts = secrets
// inserted, kek.rewrap = data keys whose kek_id changed, dek.reencrypt =
// secrets moved to another data key, dek.retire = data keys retired,
// dek.destroy = data keys deleted); every kek version has a kek.record or
// kek.rotate event and every retired one exactly one kek.retire event; the
// keyring file holds exactly one new version per round (no extra rotation
// from a rerun) and, after a retire, only the primary live; kek.retired_at
// agrees with the keyring; no data key is under an old version; no file in
// the keyring's directory contains a retired version's key (its base64 or
// raw bytes); no keyring temporary file remains after the next open. After
// every import kill: cleared source values = stored secrets = audited
// count. Right after a kill that left the keyring and the database
// disagreeing about a retirement, `keybroker status` must exit non-zero.
//
// A failing check is reported once with its details and counted; each test
// ends with a line giving the kills per kill point and the failure counts
// per check.
//
// # Running
//
//	go test -race -count=1 ./internal/crashtest/
//
// The tests are Linux only (inotify, /proc/locks, flock). The tests run
// four at once (TestMain sets -test.parallel=4 unless given).
// The seed is printed by every test; KEYBROKER_CRASHTEST_SEED=N replays its
// sequence of kill points and values (where exactly inside a batch a line
// kill lands still depends on the machine). -crashtest.scale=K (or
// KEYBROKER_CRASHTEST_SCALE=K) runs K times as many rounds; the default
// kills about 57 times.
package crashtest
