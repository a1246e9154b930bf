package soak_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/localkms"
	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/internal/soak"
	"github.com/profullstack/keybroker/internal/testbin"
	"github.com/profullstack/keybroker/internal/vaultserver"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"

	_ "github.com/profullstack/keybroker/provider/local"
	_ "github.com/profullstack/keybroker/provider/vault"
)

var (
	flagDuration = flag.Duration("soak.duration", 0, "how long the writers run per backend unless they made -soak.ops Puts first (default $KEYBROKER_SOAK_DURATION, else 25s)")
	flagOps      = flag.Int64("soak.ops", 0, "Puts per writer goroutine after which the writers may stop before -soak.duration (default $KEYBROKER_SOAK_OPS, else 8000)")
	flagSeed     = flag.Uint64("soak.seed", 0, "random seed (default: a fresh one, printed)")
)

// The fleet's shape: the review's, scaled to a shared 2-core machine.
const (
	writers    = 4   // writer processes
	goroutines = 2   // per writer
	names      = 12  // per goroutine
	projects   = 40  // shared by all writers
	budget     = 100 // pgstore Config.Budget of the writers
	chunk      = 10  // pgstore Config.ReserveChunk of the writers
	minCycles  = 2   // operator rounds the writers wait for
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func duration(t *testing.T) time.Duration {
	if *flagDuration > 0 {
		return *flagDuration
	}
	if s := os.Getenv("KEYBROKER_SOAK_DURATION"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			t.Fatalf("KEYBROKER_SOAK_DURATION=%q: want a positive duration such as 5m", s)
		}
		return d
	}
	return 25 * time.Second
}

func ops(t *testing.T) int64 {
	if *flagOps > 0 {
		return *flagOps
	}
	if s := os.Getenv("KEYBROKER_SOAK_OPS"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n <= 0 {
			t.Fatalf("KEYBROKER_SOAK_OPS=%q: want a positive number", s)
		}
		return n
	}
	return 8000
}

// TestSoak runs the fleet against each backend in turn (never in
// parallel: the processes share the machine's cores).
func TestSoak(t *testing.T) {
	bins := build(t)
	t.Run("local", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "keyring.json")
		if c := runCLI(t, bins, nil, "keygen", path, "--id", "soak"); c.code != 0 {
			t.Fatalf("keybroker keygen: exit %d: %s", c.code, c.stderr)
		}
		soakRun(t, bins, "local://"+path)
	})
	t.Run("tenant", func(t *testing.T) {
		// The local keyring, and project 0 bound to a local-kms key of its
		// own and unbound again, round after round, under the writers.
		dir := t.TempDir()
		localkms.SetTestEnv(dir)
		kms, err := localkms.Start(dir, "", "")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(kms.Stop)
		arn, err := kms.CreateKey(t.Context(), "keybroker soak tenant")
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "keyring.json")
		if c := runCLI(t, bins, nil, "keygen", path, "--id", "soak"); c.code != 0 {
			t.Fatalf("keybroker keygen: exit %d: %s", c.code, c.stderr)
		}
		soakRun(t, bins, "local://"+path, "-tenant-kek", kms.URL(arn))
	})
	t.Run("vault", func(t *testing.T) {
		v, err := vaultserver.Start(t.Context(), vaultserver.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(v.Stop)
		if err := v.Root.Sys().Mount("transit", &api.MountInput{Type: "transit"}); err != nil {
			t.Fatalf("mount transit: %v", err)
		}
		if _, err := v.Root.Logical().Write("transit/keys/soak", nil); err != nil {
			t.Fatalf("create transit key: %v", err)
		}
		tokenFile := filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(tokenFile, []byte(v.Token), 0o600); err != nil {
			t.Fatal(err)
		}
		soakRun(t, bins, "vault://transit/keys/soak?addr="+v.Addr+"&token_file="+tokenFile)
	})
}

type binaries struct{ keybroker, worker string }

// build compiles the CLI and the worker into a temporary directory (without
// -race: the children are many and the machine small; pgstore's own tests
// run it under the race detector).
func build(t *testing.T) binaries {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go command: %v", err)
	}
	dir := t.TempDir()
	out, err := exec.Command(goBin, "build", "-o", dir+string(os.PathSeparator),
		"github.com/profullstack/keybroker/cmd/keybroker",
		"github.com/profullstack/keybroker/internal/soak/soakworker").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return binaries{keybroker: filepath.Join(dir, "keybroker"), worker: filepath.Join(dir, "soakworker")}
}

// childEnv is the environment of every child: this one without Vault or
// keybroker settings, plus the database and KEK.
func childEnv(dbURL, kekURL string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); !strings.HasPrefix(k, "VAULT_") && !strings.HasPrefix(k, "KEYBROKER_") {
			env = append(env, kv)
		}
	}
	// The operator's CLI runs with the fleet's budget, as docs/OPERATIONS.md
	// tells operators to; a data key keeps its creator's budget either way.
	return append(env, "KEYBROKER_DATABASE_URL="+dbURL, "KEYBROKER_KEK="+kekURL, "KEYBROKER_LOG_LEVEL=warn",
		"KEYBROKER_BUDGET="+strconv.Itoa(budget))
}

type cliResult struct {
	code           int
	stdout, stderr string
}

func runCLI(t *testing.T, bins binaries, env []string, args ...string) cliResult {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bins.keybroker, args...)
	cmd.Env, cmd.Stdout, cmd.Stderr = env, &stdout, &stderr
	testbin.KillWithParent(cmd)
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("keybroker %s: %v", strings.Join(args, " "), err)
	}
	return cliResult{code: cmd.ProcessState.ExitCode(), stdout: stdout.String(), stderr: strings.TrimSpace(stderr.String())}
}

// child is a started worker process.
type child struct {
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser // the operator's: closing it ends its loop
	stdout bytes.Buffer
	errLog string
}

func startChild(t *testing.T, ctx context.Context, bins binaries, env []string, name string, args ...string) *child {
	t.Helper()
	c := &child{name: name, errLog: filepath.Join(t.TempDir(), name+".stderr")}
	f, err := os.Create(c.errLog)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c.cmd = exec.CommandContext(ctx, bins.worker, args...)
	c.cmd.Env, c.cmd.Stdout, c.cmd.Stderr = env, &c.stdout, f
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	testbin.KillWithParent(c.cmd)
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	return c
}

// wait waits for the child and decodes its JSON summary into out.
func (c *child) wait(t *testing.T, out any) {
	t.Helper()
	err := c.cmd.Wait()
	tail, _ := os.ReadFile(c.errLog)
	if err == nil {
		err = json.Unmarshal(c.stdout.Bytes(), out)
	}
	if err != nil {
		t.Fatalf("%s: %v; stderr: %s", c.name, err, tail)
	}
}

// soakRun runs the fleet against the KEK at kekURL, then checks every
// invariant from a fresh process.
func soakRun(t *testing.T, bins binaries, kekURL string, operatorArgs ...string) {
	seed := *flagSeed
	if seed == 0 {
		seed = rand.Uint64()
	}
	d, n := duration(t), ops(t)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("replay: go test ./internal/soak -run 'TestSoak/%s' -soak.seed=%d -soak.duration=%v -soak.ops=%d", filepath.Base(t.Name()), seed, d, n)
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dbURL := pgtest.NewDatabase(t)
	pool := pgtest.PoolFor(t, dbURL)
	// The writers stop by themselves within 3d and the operator's last
	// round takes seconds; children still running 45s after that are
	// stuck: show what their sessions wait for, then kill them
	// (exec.CommandContext), which fails the test.
	stuck := time.AfterFunc(3*d+45*time.Second, func() {
		logSessions(t, pool)
		cancel()
	})
	defer stuck.Stop()
	if err := pgstore.Migrate(ctx, pool, pgstore.DefaultSchema); err != nil {
		t.Fatal(err)
	}
	installHistory(t, pool)
	env := childEnv(dbURL, kekURL)

	start := time.Now()
	op := startChild(t, ctx, bins, env, "operator", append([]string{"-role", "operator", "-keybroker", bins.keybroker,
		"-projects", strconv.Itoa(projects), "-seed", strconv.FormatUint(seed, 10)}, operatorArgs...)...)
	ws := make([]*child, writers)
	for i := range ws {
		ws[i] = startChild(t, ctx, bins, env, fmt.Sprintf("writer%d", i), "-role", "writer",
			"-worker", strconv.Itoa(i), "-goroutines", strconv.Itoa(goroutines), "-names", strconv.Itoa(names),
			"-projects", strconv.Itoa(projects), "-budget", strconv.Itoa(budget), "-chunk", strconv.Itoa(chunk),
			"-ops", strconv.FormatInt(n, 10), "-duration", d.String(), "-limit", (3 * d).String(), "-min-cycles", strconv.Itoa(minCycles),
			"-seed", strconv.FormatUint(seed, 10))
	}
	sums := make([]soak.WriterSummary, writers)
	for i, w := range ws {
		w.wait(t, &sums[i])
	}
	writing := time.Since(start)
	// Every writer has exited: the operator's last round runs alone.
	op.stdin.Close()
	var opSum soak.OperatorSummary
	op.wait(t, &opSum)
	stuck.Stop()
	t.Logf("seed %d: writers ran %v, operator %d rounds, whole fleet %v; exit codes %v",
		seed, writing.Round(time.Millisecond), opSum.Cycles, time.Since(start).Round(time.Millisecond), opSum.Codes)

	checkWriters(t, sums)
	checkOperator(t, opSum)
	checkFresh(t, ctx, dbURL, kekURL, sums)
	checkCLI(t, bins, env)
	checkDatabase(t, ctx, pool, sums)
}

// logSessions logs the database sessions that are not idle: their state,
// what they wait for and their statement (SQL text with $n placeholders:
// pgstore sends values as parameters, so no secret appears).
func logSessions(t *testing.T, pool *pgxpool.Pool) {
	rows, err := pool.Query(context.Background(), `SELECT pid, state, coalesce(wait_event_type || ':' || wait_event, ''),
  pg_blocking_pids(pid)::text, now() - xact_start, left(query, 300)
FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'`)
	if err != nil {
		t.Logf("stuck children: sessions: %v", err)
		return
	}
	defer rows.Close()
	for rows.Next() {
		var (
			pid             int
			state, wait     string
			blockers, query string
			age             *time.Duration
		)
		if err := rows.Scan(&pid, &state, &wait, &blockers, &age, &query); err != nil {
			t.Logf("stuck children: sessions: %v", err)
			return
		}
		t.Logf("stuck children: session %d %s wait %s blocked by %s xact age %v: %s", pid, state, wait, blockers, age, query)
	}
}

// installHistory records, at each commit, every envelope written to
// encrypted_secrets (its data key and nonce) and every data key created or
// rewrapped, with the data key's state and its KEK version's retirement as
// a deferred constraint trigger sees them when the writing transaction
// commits. The progress row is the operator's round counter.
func installHistory(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	_, err := pool.Exec(context.Background(), `
CREATE SCHEMA soak;
CREATE TABLE soak.progress (cycles int NOT NULL);
INSERT INTO soak.progress VALUES (0);
CREATE TABLE soak.envelopes (
    project_id text NOT NULL, name text NOT NULL, data_key_id uuid NOT NULL, nonce bytea NOT NULL,
    dek_state text, -- NULL: no such data key at commit
    kek_retired boolean);
CREATE TABLE soak.data_keys (
    data_key_id uuid NOT NULL, project_id text NOT NULL, kek_id bigint NOT NULL, kek_retired boolean NOT NULL);
CREATE FUNCTION soak.record_envelope() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO soak.envelopes
    SELECT NEW.project_id, NEW.name, NEW.data_key_id, NEW.nonce, d.state, k.retired_at IS NOT NULL
    FROM (SELECT) one
    LEFT JOIN keybroker.data_keys d ON d.id = NEW.data_key_id AND d.project_id = NEW.project_id
    LEFT JOIN keybroker.kek k ON k.id = d.kek_id;
    RETURN NULL;
END $$;
CREATE FUNCTION soak.record_data_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO soak.data_keys
    SELECT NEW.id, NEW.project_id, NEW.kek_id, k.retired_at IS NOT NULL FROM keybroker.kek k WHERE k.id = NEW.kek_id;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER soak_insert AFTER INSERT ON keybroker.encrypted_secrets
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION soak.record_envelope();
-- An update that leaves the envelope as it was seals nothing.
CREATE CONSTRAINT TRIGGER soak_update AFTER UPDATE ON keybroker.encrypted_secrets
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.nonce IS DISTINCT FROM NEW.nonce OR OLD.encrypted_data IS DISTINCT FROM NEW.encrypted_data)
    EXECUTE FUNCTION soak.record_envelope();
CREATE CONSTRAINT TRIGGER soak_data_keys AFTER INSERT OR UPDATE OF kek_id ON keybroker.data_keys
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION soak.record_data_key();
`)
	if err != nil {
		t.Fatalf("install history triggers: %v", err)
	}
}

func checkWriters(t *testing.T, sums []soak.WriterSummary) {
	t.Helper()
	for _, s := range sums {
		t.Logf("writer %d: %d puts acknowledged, %d failed; %d read-backs, %d failed, %d wrong value",
			s.Worker, s.Puts, s.PutErrors, s.Gets, s.GetErrors, s.BadValues)
		if s.PutErrors+s.GetErrors+s.BadValues > 0 {
			var kinds []string
			for msg, n := range s.Errors {
				kinds = append(kinds, fmt.Sprintf("%dx %s", n, msg))
			}
			slices.Sort(kinds)
			t.Errorf("writer %d: %d Puts failed, %d read-backs failed, %d read back another value; by message:\n  %s",
				s.Worker, s.PutErrors, s.GetErrors, s.BadValues, strings.Join(kinds, "\n  "))
		}
		if !s.OperatorOK {
			t.Errorf("writer %d stopped at its time limit before the operator completed %d rounds", s.Worker, minCycles)
		}
	}
}

func checkOperator(t *testing.T, s soak.OperatorSummary) {
	t.Helper()
	if s.Cycles < minCycles {
		t.Errorf("operator: %d rounds while the writers ran, want at least %d", s.Cycles, minCycles)
	}
	// One line per command and exit code, with the first error.
	type kind struct {
		n     int
		first string
	}
	kinds := map[string]*kind{}
	var order []string
	for _, c := range s.Failures {
		k := fmt.Sprintf("keybroker %s: exit %d", strings.Join(c.Args, " "), c.Code)
		if c.Args[0] == "reencrypt" || c.Args[0] == "retire" {
			k = fmt.Sprintf("keybroker %s: exit %d", c.Args[0], c.Code)
		}
		if kinds[k] == nil {
			kinds[k] = &kind{first: c.Stderr}
			order = append(order, k)
		}
		kinds[k].n++
	}
	for _, k := range order {
		t.Errorf("operator: %dx %s; first: %s", kinds[k].n, k, kinds[k].first)
	}
}

// checkFresh reads every writer's names through a new Store: each holds
// its last acknowledged value, byte for byte.
func checkFresh(t *testing.T, ctx context.Context, dbURL, kekURL string, sums []soak.WriterSummary) {
	t.Helper()
	kek, err := provider.Open(ctx, kekURL)
	if err != nil {
		t.Fatal(err)
	}
	store, err := pgstore.New(ctx, pgtest.PoolFor(t, dbURL), pgstore.Config{KEK: kek, Budget: budget, ReserveChunk: chunk})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	var checked, lost, unreadable, wrong int
	var first []string
	note := func(format string, args ...any) {
		if len(first) < 10 {
			first = append(first, fmt.Sprintf(format, args...))
		}
	}
	for _, s := range sums {
		for _, n := range s.Names {
			if n.Attempted == 0 {
				continue
			}
			checked++
			got, err := store.Get(ctx, n.Project, n.Name)
			switch {
			case errors.Is(err, pgstore.ErrNotFound) && n.Acked == 0:
				continue // never acknowledged, never committed
			case errors.Is(err, pgstore.ErrNotFound):
				lost++
				note("%s/%s: acknowledged seq %d is gone", n.Project, n.Name, n.Acked)
				continue
			case err != nil:
				unreadable++
				note("%s/%s: %v", n.Project, n.Name, err)
				continue
			}
			if !holdsSeq(got, s.Worker, n) {
				wrong++
				note("%s/%s: not the value of seq %d..%d", n.Project, n.Name, max(n.Acked, 1), n.Attempted)
			}
		}
	}
	t.Logf("fresh Store: %d names checked: %d lost, %d unreadable, %d another value", checked, lost, unreadable, wrong)
	if lost+unreadable+wrong > 0 {
		t.Errorf("fresh Store: of %d names, %d lost an acknowledged write, %d do not decrypt, %d hold another value:\n  %s",
			checked, lost, unreadable, wrong, strings.Join(first, "\n  "))
	}
}

func holdsSeq(got []byte, worker int, n soak.Name) bool {
	for seq := max(n.Acked, 1); seq <= n.Attempted; seq++ {
		if bytes.Equal(got, soak.Value(worker, n.Name, seq)) {
			return true
		}
	}
	return false
}

// checkCLI runs the real verify (decrypts every secret) and status (no
// retired version in use), both of which must exit 0.
func checkCLI(t *testing.T, bins binaries, env []string) {
	t.Helper()
	var verify struct {
		Total    int64             `json:"total"`
		Failures []json.RawMessage `json:"failures"`
	}
	c := runCLI(t, bins, env, "verify", "--json")
	_ = json.Unmarshal([]byte(c.stdout), &verify)
	t.Logf("keybroker verify: exit %d, %d secrets, %d failed", c.code, verify.Total, len(verify.Failures))
	if c.code != 0 {
		t.Errorf("keybroker verify: exit %d: %d of %d secrets do not decrypt: %s", c.code, len(verify.Failures), verify.Total, lastLine(c.stderr))
	}
	var status struct {
		RetiredInUse int64 `json:"retired_in_use"`
	}
	c = runCLI(t, bins, env, "status", "--json")
	_ = json.Unmarshal([]byte(c.stdout), &status)
	t.Logf("keybroker status: exit %d, %d data keys under retired versions", c.code, status.RetiredInUse)
	if c.code != 0 {
		t.Errorf("keybroker status: exit %d: %s", c.code, lastLine(c.stderr))
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	return s[strings.LastIndexByte(s, '\n')+1:]
}

// dbCheck is one count the history and the final state give; want0: an
// invariant, which must count zero.
type dbCheck struct {
	what  string
	query string
	want0 bool
}

const historyRows = "envelopes written (history)"

var dbChecks = []dbCheck{
	{historyRows, `SELECT count(*) FROM soak.envelopes`, false},
	{"envelopes committed under a retired data key", `SELECT count(*) FROM soak.envelopes WHERE dek_state = 'retired'`, true},
	{"envelopes committed under a missing data key", `SELECT count(*) FROM soak.envelopes WHERE dek_state IS NULL`, true},
	{"envelopes committed under a data key of a retired KEK version", `SELECT count(*) FROM soak.envelopes WHERE kek_retired`, true},
	{"envelopes committed under a spent data key (reserved before it was spent)", `SELECT count(*) FROM soak.envelopes WHERE dek_state = 'spent'`, false},
	{"data keys created or rewrapped under a retired KEK version", `SELECT count(*) FROM soak.data_keys WHERE kek_retired`, true},
	{"nonces used more than once", `SELECT count(*) FROM (SELECT nonce FROM soak.envelopes GROUP BY nonce HAVING count(*) > 1) n`, true},
	{"data keys that sealed more than the budget", `SELECT count(*) FROM (SELECT data_key_id FROM soak.envelopes GROUP BY data_key_id HAVING count(*) > ` + strconv.Itoa(budget) + `) n`, true},
	{"data keys with messages over the budget", `SELECT count(*) FROM keybroker.data_keys WHERE messages > least(budget, ` + strconv.Itoa(budget) + `)`, true},
	{"data keys under a retired KEK version at the end", `SELECT count(*) FROM keybroker.data_keys d JOIN keybroker.kek k ON k.id = d.kek_id WHERE k.retired_at IS NOT NULL`, true},
	{"retired data keys left after the last reencrypt", `SELECT count(*) FROM keybroker.data_keys WHERE state = 'retired'`, true},
	{"KEK versions retired", `SELECT count(*) FROM keybroker.kek WHERE retired_at IS NOT NULL`, false},
	{"data keys at the end", `SELECT count(*) FROM keybroker.data_keys`, false},
	{"highest data_keys.messages at the end", `SELECT coalesce(max(messages), 0) FROM keybroker.data_keys`, false},
}

// measure runs every dbCheck.
func measure(t *testing.T, ctx context.Context, pool *pgxpool.Pool) map[string]int64 {
	t.Helper()
	got := map[string]int64{}
	for _, c := range dbChecks {
		var n int64
		if err := pool.QueryRow(ctx, c.query).Scan(&n); err != nil {
			t.Fatalf("%s: %v", c.what, err)
		}
		got[c.what] = n
	}
	return got
}

// checkDatabase checks the invariants the history and the final state
// show.
func checkDatabase(t *testing.T, ctx context.Context, pool *pgxpool.Pool, sums []soak.WriterSummary) {
	t.Helper()
	var acked int64
	for _, s := range sums {
		acked += s.Puts
	}
	got := measure(t, ctx, pool)
	var report []string
	for _, c := range dbChecks {
		n := got[c.what]
		report = append(report, fmt.Sprintf("%s: %d", c.what, n))
		if c.want0 && n != 0 {
			t.Errorf("%s: %d, want 0", c.what, n)
		}
	}
	if got["data keys with messages over the budget"] > 0 {
		// Which keys, and how far over: a reservation of another size
		// than the writers' chunk points at a process with another budget.
		rows, err := pool.Query(ctx, `SELECT project_id, messages FROM keybroker.data_keys WHERE messages > $1 ORDER BY messages DESC LIMIT 5`, budget)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var project string
			var messages int64
			if err := rows.Scan(&project, &messages); err != nil {
				t.Fatal(err)
			}
			t.Logf("over budget: a data key of %s has messages = %d (budget %d, writers reserve %d at a time)", project, messages, budget, chunk)
		}
		rows.Close()
	}
	if got[historyRows] < acked {
		t.Errorf("history holds %d envelopes, fewer than the %d acknowledged Puts: the triggers missed writes", got[historyRows], acked)
	}
	t.Logf("database:\n  %s", strings.Join(report, "\n  "))
}

// TestHistory shows that the history triggers and dbChecks see what the
// soak looks for: a nonce written twice, an envelope committed under a data
// key that its own transaction retired after the write and a data key
// committed under a KEK version retired the same way (the triggers run at
// commit), and a data key over its budget; an update that changes no
// envelope is not counted.
func TestHistory(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.Pool(t)
	if err := pgstore.Migrate(ctx, pool, pgstore.DefaultSchema); err != nil {
		t.Fatal(err)
	}
	installHistory(t, pool)
	sql := func(q string, args ...any) {
		t.Helper()
		if _, err := pool.Exec(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	const (
		dk1 = "00000000-0000-0000-0000-000000000001"
		dk2 = "00000000-0000-0000-0000-000000000002"
		dk3 = "00000000-0000-0000-0000-000000000003"
	)
	sql(`INSERT INTO keybroker.kek (provider, key_id, key_version) VALUES ('local', 'k', '1'), ('local', 'k', '2')`)
	sql(`INSERT INTO keybroker.data_keys (id, project_id, kek_id, wrapped_dek, messages, state)
SELECT $1::uuid, 'p', id, '\x01', $2, 'spent' FROM keybroker.kek WHERE key_version = '1'`, dk1, budget+1)
	sql(`INSERT INTO keybroker.data_keys (id, project_id, kek_id, wrapped_dek) SELECT $1::uuid, 'p', id, '\x01' FROM keybroker.kek WHERE key_version = '1'`, dk2)
	// Two envelopes with one nonce.
	sql(`INSERT INTO keybroker.encrypted_secrets (project_id, name, encrypted_data, nonce, data_key_id) VALUES
('p', 'a', '\x01', '\x0a', $1), ('p', 'b', '\x02', '\x0a', $1)`, dk1)
	// An envelope whose data key is retired, and a data key whose KEK
	// version is retired, each after the write but before its transaction
	// commits (keybroker's own fences check at the write).
	inTx := func(arg any, qs ...string) {
		t.Helper()
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(ctx)
		for _, q := range qs {
			if _, err := tx.Exec(ctx, q, arg); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
	inTx(dk2, `INSERT INTO keybroker.encrypted_secrets (project_id, name, encrypted_data, nonce, data_key_id) VALUES ('p', 'c', '\x03', '\x0c', $1)`,
		`UPDATE keybroker.data_keys SET state = 'retired' WHERE id = $1`)
	inTx(dk3, `INSERT INTO keybroker.data_keys (id, project_id, kek_id, wrapped_dek) SELECT $1::uuid, 'p', id, '\x01' FROM keybroker.kek WHERE key_version = '2'`,
		`UPDATE keybroker.kek SET retired_at = now() WHERE key_version = '2' AND $1::uuid IS NOT NULL`)
	// An update that changes no envelope is not a new one.
	sql(`UPDATE keybroker.encrypted_secrets SET updated_at = now() WHERE name = 'a'`)

	got := measure(t, ctx, pool)
	for what, want := range map[string]int64{
		historyRows:                  3,
		"nonces used more than once": 1,
		"envelopes committed under a retired data key":                              1,
		"envelopes committed under a spent data key (reserved before it was spent)": 2,
		"data keys created or rewrapped under a retired KEK version":                1,
		"data keys with messages over the budget":                                   1,
		"data keys under a retired KEK version at the end":                          1,
		"retired data keys left after the last reencrypt":                           1,
		"envelopes committed under a data key of a retired KEK version":             0,
	} {
		if got[what] != want {
			t.Errorf("%s: %d, want %d", what, got[what], want)
		}
	}
}
