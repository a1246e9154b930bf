package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	tcnetwork "github.com/testcontainers/testcontainers-go/network"

	"github.com/profullstack/keybroker/internal/soak"
	"github.com/profullstack/keybroker/internal/testbin"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	_ "github.com/profullstack/keybroker/provider/local" // local:// for the fresh reader
)

// The failover fleet: writer processes (internal/soak's soakworker) and one import-plaintext.
const (
	foWriters    = 3
	foGoroutines = 2
	foNames      = 8 // per goroutine
	foProjects   = 12
	foLegacyRows = 5_000 // 50 batches: the import is still running at the fault (after 5)
	foBatch      = 100
	standbyName  = "standby1"
)

// TestFailover: a primary and a synchronous standby (docs/OPERATIONS.md, "High availability"),
// writer processes and an import-plaintext running through a multi-host URL with
// target_session_attrs=read-write; the primary fails, the standby is promoted, the import is
// rerun to completion. Every acknowledged write reads back, from the moment of the promotion
// on, and every secret verifies.
func TestFailover(t *testing.T) {
	bins := buildFleet(t)
	t.Run("KillPrimary", func(t *testing.T) { testFailover(t, bins, false) })
	t.Run("PartitionPrimary", func(t *testing.T) { testFailover(t, bins, true) })
}

// fleetBins are the binaries the failover scenarios run as separate processes.
type fleetBins struct{ keybroker, writer string }

// buildFleet builds the CLI and the soak writer (without -race: the race detector is for the
// library's own tests; these are many processes on a small machine).
func buildFleet(t *testing.T) fleetBins {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("e2e: go command: %v", err)
	}
	dir := t.TempDir()
	// Built in the library's module (the parent directory, as go.mod's replace says), whose
	// go.mod has the CLI's dependencies; this module has only the tests'.
	cmd := exec.Command(goBin, "build", "-o", dir+string(os.PathSeparator), "./cmd/keybroker", "./internal/soak/soakworker")
	cmd.Dir = ".."
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("e2e: go build: %v\n%s", err, out)
	}
	return fleetBins{keybroker: filepath.Join(dir, "keybroker"), writer: filepath.Join(dir, "soakworker")}
}

// replicated is a primary and a synchronous standby. The two share a private network for
// replication; clients reach each through its published port (the default bridge), so the
// primary can be cut from its standby while clients still reach it.
type replicated struct {
	repl             *testcontainers.DockerNetwork
	primary, standby testcontainers.Container
	primaryURL       string // direct to the primary
	standbyURL       string // direct to the standby
	clientURL        string // both, read-write one wanted: what applications and the CLI use
}

func startReplicated(t *testing.T) *replicated {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	repl, err := tcnetwork.New(ctx, tcnetwork.WithLabels(map[string]string{ownerLabel: owner()}))
	if err != nil {
		t.Fatalf("e2e: create network: %v", err)
	}
	t.Cleanup(func() { // after the containers' cleanups (registered later, run earlier)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := repl.Remove(ctx); err != nil {
			t.Errorf("e2e: remove network: %v", err)
		}
	})
	// What commit waits for is the point of the scenario: the standby's flush of the commit
	// record (synchronous_commit=on), for the standby named standby1. fsync=off and tmpfs are
	// safe here only because no server's operating system crashes: a killed PostgreSQL
	// loses nothing its kernel has.
	pgCmd := func(extra ...string) testcontainers.ContainerCustomizer {
		return testcontainers.WithCmd(append([]string{"postgres", "-c", "fsync=off", "-c", "max_connections=100"}, extra...)...)
	}
	common := func(alias string) []testcontainers.ContainerCustomizer {
		// A fixed host port: the engine maps the port again when a network is disconnected,
		// and would pick a new ephemeral port, which the clients' URL does not name.
		hostPort := freePort(t)
		return []testcontainers.ContainerCustomizer{
			testcontainers.WithExposedPorts("5432/tcp"),
			testcontainers.WithHostConfigModifier(func(hc *container.HostConfig) {
				hc.PortBindings = network.PortMap{network.MustParsePort("5432/tcp"): {{HostPort: strconv.Itoa(hostPort)}}}
			}),
			testcontainers.WithTmpfs(map[string]string{"/var/lib/postgresql/data": "rw"}),
			// The default bridge as well as the private network: once repl is cut, clients still
			// reach the primary's published port through the bridge.
			tcnetwork.WithBridgeNetwork(),
			tcnetwork.WithNetwork([]string{alias}, repl),
			waitForPostgres(),
		}
	}
	r := &replicated{repl: repl}
	r.primary = startContainer(t, postgresImage, append(common("primary"),
		testcontainers.WithEnv(map[string]string{
			"POSTGRES_USER": pgUser, "POSTGRES_PASSWORD": pgPassword, "POSTGRES_DB": pgDatabase,
			"POSTGRES_INITDB_ARGS": "--no-sync",
		}),
		pgCmd("-c", "synchronous_commit=on", "-c", "synchronous_standby_names=FIRST 1 ("+standbyName+")"))...)
	// The standby has no synchronous_standby_names: once promoted it commits alone until a new
	// standby is attached (docs/OPERATIONS.md says what that trades).
	r.standby = startContainer(t, postgresImage, append(common("standby"),
		testcontainers.WithEnv(map[string]string{
			"POSTGRES_USER": pgUser, "POSTGRES_PASSWORD": pgPassword,
			"POSTGRES_REPLICATE_FROM": "primary:5432", "POSTGRES_STANDBY_NAME": standbyName,
		}),
		pgCmd())...)
	p, s := hostPort(t, r.primary), hostPort(t, r.standby)
	r.primaryURL, r.standbyURL = pgURL(p), pgURL(s)
	r.clientURL = pgURL(p+","+s, "target_session_attrs=read-write", "connect_timeout=10")

	// Ready once the primary reports the standby streaming and synchronous.
	primary := connect(t, r.primaryURL)
	waitUntil(ctx, t, "standby streaming and synchronous", func(ctx context.Context) (bool, error) {
		var n int
		err := primary.QueryRow(ctx, `SELECT count(*) FROM pg_stat_replication
WHERE application_name = $1 AND state = 'streaming' AND sync_state = 'sync'`, standbyName).Scan(&n)
		return n == 1, err
	})
	primary.Close()
	return r
}

// connect opens a small pool, closed when t ends (or earlier by the caller).
func connect(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatalf("e2e: parse URL: %v", err)
	}
	cfg.MaxConns = 4
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("e2e: connect: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

// waitUntil polls cond every 50ms until it returns true, failing t when ctx ends first, with
// the last error cond returned.
func waitUntil(ctx context.Context, t *testing.T, what string, cond func(context.Context) (bool, error)) {
	t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ok, err := cond(qctx)
		cancel()
		if ok && err == nil {
			return
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			t.Fatalf("e2e: waiting for %s: %v (last error: %v)", what, ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// proc is a started child process; done is closed once it has exited.
type proc struct {
	name   string
	cmd    *exec.Cmd
	stdout bytes.Buffer
	stderr bytes.Buffer
	done   chan struct{}
	err    error
}

func startProc(t *testing.T, env []string, name, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...), done: make(chan struct{})}
	p.cmd.Env, p.cmd.Stdout, p.cmd.Stderr = env, &p.stdout, &p.stderr
	testbin.KillWithParent(p.cmd)
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("e2e: start %s: %v", name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait waits for the process to exit, at most until ctx ends, and returns its exit code.
func (p *proc) wait(ctx context.Context, t *testing.T) int {
	t.Helper()
	select {
	case <-p.done:
	case <-ctx.Done():
		t.Fatalf("e2e: %s did not exit: %v", p.name, ctx.Err())
	}
	var ee *exec.ExitError
	if p.err != nil && !errors.As(p.err, &ee) {
		t.Fatalf("e2e: %s: %v", p.name, p.err)
	}
	return p.cmd.ProcessState.ExitCode()
}

func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("e2e: signal %v to %s: %v", sig, p.name, err)
	}
}

// childEnv is the environment of the fleet's processes: this one without keybroker's
// settings, plus the database and KEK.
func childEnv(dbURL, kekURL string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); !strings.HasPrefix(k, "KEYBROKER_") && !strings.HasPrefix(k, "VAULT_") {
			env = append(env, kv)
		}
	}
	return append(env, "KEYBROKER_DATABASE_URL="+dbURL, "KEYBROKER_KEK="+kekURL, "KEYBROKER_LOG_LEVEL=warn")
}

// lastAcks reads an ack log (soakworker -ack-log): the highest acknowledged seq per secret.
// A line being written as the file is read may be cut short: only whole lines count.
func lastAcks(t *testing.T, path string) map[secretKey]int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("e2e: ack log: %v", err)
	}
	b = b[:bytes.LastIndexByte(b, '\n')+1]
	m := map[secretKey]int64{}
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) != 3 {
			t.Fatalf("e2e: ack log %s: bad line %q", path, line)
		}
		seq, err := strconv.ParseInt(f[2], 10, 64)
		if err != nil {
			t.Fatalf("e2e: ack log %s: bad line %q", path, line)
		}
		k := secretKey{f[0], f[1]}
		m[k] = max(m[k], seq)
	}
	return m
}

// storedSeq returns the seq of the soak.Value got holds for name, or -1 if got is no value
// of name's writer.
func storedSeq(name string, got []byte) int64 {
	// soak.Value is "soak|w<worker>|<name>|<seq>|<padding>".
	f := strings.SplitN(string(got), "|", 5)
	if len(f) != 5 || f[0] != "soak" || f[2] != name {
		return -1
	}
	w, err1 := strconv.Atoi(strings.TrimPrefix(f[1], "w"))
	seq, err2 := strconv.ParseInt(f[3], 10, 64)
	if err1 != nil || err2 != nil || !bytes.Equal(got, soak.Value(w, name, seq)) {
		return -1
	}
	return seq
}

// checkAcked fails unless every secret in acks holds, through st, the value of its last
// acknowledged seq or of a later one (a later write may have committed without its
// acknowledgement arriving).
func checkAcked(ctx context.Context, t *testing.T, st *pgstore.Store, acks map[secretKey]int64, when string) {
	t.Helper()
	var lost, failed int
	var firstErr error
	for k, seq := range acks {
		got, err := st.Get(ctx, k.project, k.name)
		if err != nil {
			if failed++; firstErr == nil {
				firstErr = err
			}
			continue
		}
		if storedSeq(k.name, got) < seq {
			lost++
		}
	}
	if lost > 0 || failed > 0 {
		t.Fatalf("%s: of %d acknowledged secrets, %d hold an older or other value (an acknowledged write lost) and %d failed to read (first error: %v)",
			when, len(acks), lost, failed, firstErr)
	}
	t.Logf("%s: %d acknowledged secrets read back", when, len(acks))
}

// testFailover runs one failover: the primary SIGKILLed, or (partition) cut from its standby
// and later from its clients too, while it keeps running.
func testFailover(t *testing.T, bins fleetBins, partition bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	began := time.Now()
	r := startReplicated(t)
	primary := connect(t, r.primaryURL)
	if err := pgstore.Migrate(ctx, primary, "keybroker"); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	// soakworker's writers stop once soak.progress says so.
	if _, err := primary.Exec(ctx, `CREATE SCHEMA soak; CREATE TABLE soak.progress (cycles int NOT NULL); INSERT INTO soak.progress VALUES (0)`); err != nil {
		t.Fatalf("progress table: %v", err)
	}
	legacy := legacyTable(ctx, t, primary, "legacy", foLegacyRows, 20)
	primary.Close()

	dir := t.TempDir()
	keyring := filepath.Join(dir, "keyring.json")
	kekURL := "local://" + keyring
	env := childEnv(r.clientURL, kekURL)
	if code := startProc(t, env, "keybroker keygen", bins.keybroker, "keygen", keyring, "--id", "failover").wait(ctx, t); code != 0 {
		t.Fatalf("keybroker keygen: exit %d", code)
	}

	// The writers: separate processes, each appending every acknowledged Put to its log.
	writers := make([]*proc, foWriters)
	logs := make([]string, foWriters)
	for i := range writers {
		logs[i] = filepath.Join(dir, fmt.Sprintf("acks-%d.log", i))
		writers[i] = startProc(t, env, fmt.Sprintf("writer %d", i), bins.writer, "-role", "writer",
			"-worker", strconv.Itoa(i), "-goroutines", strconv.Itoa(foGoroutines), "-names", strconv.Itoa(foNames),
			"-projects", strconv.Itoa(foProjects), "-seed", "16", "-ack-log", logs[i],
			// A write to a server that stopped answering fails after 3s instead of waiting for TCP.
			"-op-timeout", "3s",
			// Run until soak.progress.cycles = 1, which the test sets at the end; -limit is a backstop.
			"-duration", "0s", "-min-cycles", "1", "-limit", "8m")
	}
	acks := func() map[secretKey]int64 {
		all := map[secretKey]int64{}
		for _, l := range logs {
			for k, v := range lastAcks(t, l) {
				all[k] = v
			}
		}
		return all
	}
	alive := func() {
		for _, w := range writers {
			if w.exited() {
				t.Fatalf("%s exited early: %v: %s", w.name, w.err, w.stderr.String())
			}
		}
	}
	waitUntil(ctx, t, "every writer's names written", func(context.Context) (bool, error) {
		alive()
		return len(acks()) == foWriters*foGoroutines*foNames, nil
	})

	imp := startProc(t, env, "keybroker import-plaintext", bins.keybroker, "import-plaintext", "legacy.secrets", "value",
		"--project-column", "project", "--name-column", "name", "--batch", strconv.Itoa(foBatch))
	rw := connect(t, r.clientURL)
	imported := func(ctx context.Context) (int64, error) {
		var n int64
		err := rw.QueryRow(ctx, `SELECT count(*) FROM keybroker.encrypted_secrets WHERE project_id LIKE 'legacy-%'`).Scan(&n)
		return n, err
	}
	waitUntil(ctx, t, "import-plaintext under way", func(ctx context.Context) (bool, error) {
		if imp.exited() {
			t.Fatalf("import-plaintext ended before the fault (%v): raise foLegacyRows; stderr: %s", imp.err, imp.stderr.String())
		}
		n, err := imported(ctx)
		return n >= 5*foBatch, err
	})
	rw.Close()

	faultAt := time.Now()
	if partition {
		// Cut the primary from its standby; clients still reach it. Its commits now wait for a
		// standby flush that never comes: nothing is acknowledged while it is cut off.
		disconnect(ctx, t, r.repl.ID, r.primary)
		old := connect(t, r.primaryURL)
		waitUntil(ctx, t, "commits on the cut-off primary waiting for the standby", func(ctx context.Context) (bool, error) {
			var n int
			err := old.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'`).Scan(&n)
			return n >= foWriters, err
		})
		old.Close()
	} else if _, err := docker.ContainerKill(ctx, r.primary.GetContainerID(), client.ContainerKillOptions{Signal: "KILL"}); err != nil {
		t.Fatalf("SIGKILL the primary: %v", err)
	}
	// From the fault to the promotion nothing can be acknowledged (the primary is gone or
	// waits for its standby; the standby is read-only). The writers are frozen meanwhile, so
	// that the check below sees every acknowledgement they will ever have had from the old
	// primary, and none from the new one.
	for _, w := range writers {
		w.signal(t, syscall.SIGSTOP)
	}
	standby := connect(t, r.standbyURL)
	var promoted bool
	if err := standby.QueryRow(ctx, `SELECT pg_promote(true, 60)`).Scan(&promoted); err != nil || !promoted {
		t.Fatalf("pg_promote: %v (promoted: %v)", err, promoted)
	}
	waitUntil(ctx, t, "standby out of recovery", func(ctx context.Context) (bool, error) {
		var rec bool
		err := standby.QueryRow(ctx, `SELECT pg_is_in_recovery()`).Scan(&rec)
		return !rec, err
	})
	promotedAt := time.Now()
	kek, err := provider.Open(ctx, kekURL)
	if err != nil {
		t.Fatal(err)
	}
	st, err := pgstore.New(ctx, standby, pgstore.Config{KEK: kek, Actor: "e2e-failover"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	atFault := acks()
	checkAcked(ctx, t, st, atFault, "at the promotion")

	if partition {
		// Fence the old primary: it is cut from its clients too (a real deployment would also
		// STONITH it); it keeps running, with commits that nobody acknowledged.
		disconnect(ctx, t, "bridge", r.primary)
	}
	lines := make([]int, len(logs))
	for i, l := range logs {
		lines[i] = countLines(t, l)
	}
	for _, w := range writers {
		w.signal(t, syscall.SIGCONT)
	}

	// The interrupted import: it failed with the connection, or hangs on a commit that waits for
	// the cut-off standby and is interrupted by the operator. Rerun to completion.
	if !imp.exited() && partition {
		imp.signal(t, syscall.SIGINT)
	}
	codes := []int{imp.wait(ctx, t)}
	t.Logf("import-plaintext interrupted by the failover: exit %d: %s", codes[0], firstLine(imp.stderr.String()))
	for codes[len(codes)-1] != 0 {
		if len(codes) > 3 {
			t.Fatalf("import-plaintext reruns: exit codes %v", codes)
		}
		rerun := startProc(t, env, "keybroker import-plaintext (rerun)", bins.keybroker, "import-plaintext", "legacy.secrets", "value",
			"--project-column", "project", "--name-column", "name", "--batch", strconv.Itoa(foBatch))
		codes = append(codes, rerun.wait(ctx, t))
		if c := codes[len(codes)-1]; c != 0 {
			t.Logf("import-plaintext rerun: exit %d: %s", c, firstLine(rerun.stderr.String()))
		}
	}

	// Every writer acknowledges writes on the new primary, then all stop.
	waitUntil(ctx, t, "every writer acknowledging writes on the new primary", func(context.Context) (bool, error) {
		alive()
		for i, l := range logs {
			if countLines(t, l) < lines[i]+20 {
				return false, nil
			}
		}
		return true, nil
	})
	if _, err := standby.Exec(ctx, `UPDATE soak.progress SET cycles = 1`); err != nil {
		t.Fatal(err)
	}
	final := map[secretKey]soak.Name{}
	var puts, putErrors int64
	for i, w := range writers {
		if code := w.wait(ctx, t); code != 0 {
			t.Fatalf("%s: exit %d: %s", w.name, code, w.stderr.String())
		}
		var sum soak.WriterSummary
		if err := json.Unmarshal(w.stdout.Bytes(), &sum); err != nil {
			t.Fatalf("%s: summary: %v", w.name, err)
		}
		if sum.BadValues > 0 {
			t.Fatalf("%s: %d read-backs returned neither the last acknowledged value nor a later one (errors: %v)", w.name, sum.BadValues, sum.Errors)
		}
		logged := lastAcks(t, logs[i])
		for _, n := range sum.Names {
			k := secretKey{n.Project, n.Name}
			if logged[k] != n.Acked {
				t.Fatalf("%s: %s/%s acknowledged up to seq %d, its log says %d", w.name, n.Project, n.Name, n.Acked, logged[k])
			}
			final[k] = n
		}
		puts, putErrors = puts+sum.Puts, putErrors+sum.PutErrors
		t.Logf("%s: %d puts acknowledged, %d failed, %d read-backs (%d failed), %d kinds of error", w.name, sum.Puts, sum.PutErrors, sum.Gets, sum.GetErrors, len(sum.Errors))
	}
	last := map[secretKey]int64{}
	for k, n := range final {
		last[k] = n.Acked
		got, err := st.Get(ctx, k.project, k.name)
		if err != nil {
			t.Fatalf("final read: %v", err)
		}
		if seq := storedSeq(k.name, got); seq > n.Attempted {
			t.Fatalf("%s/%s holds seq %d, never attempted (last attempted %d)", k.project, k.name, seq, n.Attempted)
		}
	}
	checkAcked(ctx, t, st, last, "at the end")
	verifyAll(ctx, t, st, legacy)

	// The real CLI, through the multi-host URL, from fresh processes.
	for _, args := range [][]string{{"verify"}, {"status"}} {
		p := startProc(t, env, "keybroker "+args[0], bins.keybroker, args...)
		if code := p.wait(ctx, t); code != 0 {
			t.Fatalf("keybroker %s after the failover: exit %d: %s", args[0], code, p.stderr.String())
		}
	}
	t.Logf("failover: %d puts acknowledged (%d failed) by %d writers; import exit codes %v; fault to promotion %v; scenario %v",
		puts, putErrors, foWriters, codes, promotedAt.Sub(faultAt).Round(time.Millisecond), time.Since(began).Round(time.Second))
}

// disconnect cuts c from a network (by id or name).
func disconnect(ctx context.Context, t *testing.T, network string, c testcontainers.Container) {
	t.Helper()
	if _, err := docker.NetworkDisconnect(ctx, network, client.NetworkDisconnectOptions{Container: c.GetContainerID(), Force: true}); err != nil {
		t.Fatalf("e2e: disconnect from network %s: %v", network, err)
	}
}

// countLines counts the whole lines of a file (0 if it does not exist yet).
func countLines(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return bytes.Count(b, []byte("\n"))
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}
