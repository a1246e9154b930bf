//go:build linux

package crashtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	_ "github.com/profullstack/keybroker/provider/local" // local:// keyring files
)

const (
	schema    = "keybroker"
	keyringID = "crash"
	// waitLimit bounds every wait for a child to reach a state or for a
	// dead child's sessions to go: past it the run hangs, which is a
	// failure, not a slow machine.
	waitLimit = 2 * time.Minute
)

// env is one test's world: a fresh database, a keyring file in a directory
// of its own, the test's seeded generator and its bookkeeping.
type env struct {
	t       *testing.T
	ctx     context.Context
	rng     *rand.Rand
	dbURL   string
	pool    *pgxpool.Pool
	dir     string // the keyring's directory: nothing else lives there
	keyring string
	runs    int
	kills   map[string]int           // by command and kill point
	spent   map[string]time.Duration // wall time by activity, for the summary
	checks  *checks
	// keys holds the base64 key of every keyring version seen live, to
	// search for once the version is retired.
	keys map[uint32]string
	// incompleteOK lets a run that ends before its kill exit 5 (work
	// remains) as well as 0: `column migrate` while an application still
	// writes legacy values behind it.
	incompleteOK bool
	// extraEnv is added to every child's environment (keys that must
	// never be on a command line).
	extraEnv []string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	seed := seedFor(t)
	e := &env{
		t:      t,
		ctx:    context.Background(),
		rng:    rand.New(rand.NewPCG(seed, seed>>1|1)),
		dbURL:  pgtest.NewDatabase(t),
		dir:    filepath.Join(t.TempDir(), "keys"),
		kills:  map[string]int{},
		spent:  map[string]time.Duration{},
		checks: &checks{t: t, fails: map[string]int{}, total: map[string]int{}},
		keys:   map[uint32]string{},
	}
	e.keyring = filepath.Join(e.dir, "keyring.json")
	// Room for the read-back workers beside the test's lock transactions.
	e.pool = pgtest.PoolFor(t, e.dbURL+urlSep(e.dbURL)+"pool_max_conns=12")
	if err := os.Mkdir(e.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.summary)
	e.must("keygen", e.keyring, "--id", keyringID)
	e.must("migrate")
	e.installHistory()
	e.readKeyring()
	return e
}

// timed adds the time until the returned function is called to activity.
func (e *env) timed(activity string) func() {
	start := time.Now()
	return func() { e.spent[activity] += time.Since(start) }
}

// summary logs the kills, where the time went and the checks that failed.
func (e *env) summary() {
	var kills []string
	total := 0
	for k, n := range e.kills {
		kills = append(kills, fmt.Sprintf("%s=%d", k, n))
		total += n
	}
	slices.Sort(kills)
	e.t.Logf("%d kills: %s", total, strings.Join(kills, " "))
	var spent []string
	for k, d := range e.spent {
		spent = append(spent, fmt.Sprintf("%s=%.1fs", k, d.Seconds()))
	}
	slices.Sort(spent)
	e.t.Logf("time: %s", strings.Join(spent, " "))
	e.checks.summary()
}

// checks counts assertions by name, so a run reports how often each failed.
type checks struct {
	t     *testing.T
	mu    sync.Mutex
	fails map[string]int
	total map[string]int
	order []string
}

// ok records one evaluation of check name; a failure is reported (the
// first three times per name) and counted, and the test goes on.
func (c *checks) ok(name string, cond bool, format string, args ...any) bool {
	c.t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.total[name] == 0 {
		c.order = append(c.order, name)
	}
	c.total[name]++
	if !cond {
		c.fails[name]++
		if c.fails[name] <= 3 {
			c.t.Errorf("check %s: %s", name, fmt.Sprintf(format, args...))
		}
	}
	return cond
}

func (c *checks) summary() {
	var failed, all []string
	for _, name := range c.order {
		all = append(all, fmt.Sprintf("%s=%d", name, c.total[name]))
		if n := c.fails[name]; n > 0 {
			failed = append(failed, fmt.Sprintf("%s %d/%d", name, n, c.total[name]))
		}
	}
	c.t.Logf("checks evaluated: %s", strings.Join(all, " "))
	if len(failed) == 0 {
		c.t.Logf("all %d checks passed every time", len(c.order))
		return
	}
	c.t.Logf("failed checks (failures/evaluations): %s", strings.Join(failed, ", "))
}

// childEnv is the environment of a keybroker run named app (its
// application_name in PostgreSQL): only the test's configuration.
func (e *env) childEnv(app string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "KEYBROKER_") {
			out = append(out, kv)
		}
	}
	return append(append(out,
		"KEYBROKER_DATABASE_URL="+e.dbURL+urlSep(e.dbURL)+"application_name="+app,
		"KEYBROKER_KEK=local://"+e.keyring,
	), e.extraEnv...)
}

// urlSep is what joins another query parameter to the URL u.
func urlSep(u string) string {
	if strings.Contains(u, "?") {
		return "&"
	}
	return "?"
}

// run runs keybroker to completion and returns its exit code and output.
func (e *env) run(args ...string) (code int, stdout, stderr string) {
	e.t.Helper()
	defer e.timed("run " + args[0])()
	e.runs++
	app := fmt.Sprintf("crashtest-%d", e.runs)
	ctx, cancel := context.WithTimeout(e.ctx, waitLimit)
	defer cancel()
	cmd := exec.CommandContext(ctx, keybrokerBin, args...)
	cmd.Env = e.childEnv(app)
	var o, s bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &s
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.Exited():
		code = ee.ExitCode()
	default:
		e.t.Fatalf("keybroker %s: %v (stderr: %s)", strings.Join(args, " "), err, lastLines(s.String(), 5))
	}
	return code, o.String(), s.String()
}

// must runs keybroker and fails the test unless it exits 0.
func (e *env) must(args ...string) string {
	e.t.Helper()
	code, out, errOut := e.run(args...)
	if code != 0 {
		e.t.Fatalf("keybroker %s: exit %d: %s", strings.Join(args, " "), code, lastLines(errOut, 5))
	}
	return out
}

// finish runs keybroker as the plain rerun after a kill: it must exit 0.
func (e *env) finish(args ...string) bool {
	e.t.Helper()
	code, _, errOut := e.run(args...)
	return e.checks.ok("rerun-exit-0", code == 0, "keybroker %s: exit %d, want 0: %s", strings.Join(args, " "), code, lastLines(errOut, 3))
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// kind is where a kill lands; see the package documentation.
type kind int

const (
	atLine kind = iota
	eventsLocked
	retireEventsLocked
	retireKeyringLocked
	tmpCreated
)

func (k kind) String() string {
	return [...]string{"line", "events-locked", "retire-events-locked", "retire-keyring-locked", "tmp-created"}[k]
}

// plan is one kill point.
type plan struct {
	kind    kind
	n       int           // line: kill at the n-th stderr line; events-locked: lock after n lines; tmp-created: the n-th temporary file
	delay   time.Duration // line: wait this long after the line
	version uint32        // retire kinds: the keyring version being retired
}

func (p plan) String() string {
	switch p.kind {
	case atLine:
		return fmt.Sprintf("%s %d +%v", p.kind, p.n, p.delay)
	case retireEventsLocked, retireKeyringLocked:
		return fmt.Sprintf("%s v%d", p.kind, p.version)
	}
	return fmt.Sprintf("%s %d", p.kind, p.n)
}

// linePlan draws a line or events-locked plan within the first 70% of
// about lines stderr lines, so that most runs are killed.
func (e *env) linePlan(lines int) plan {
	n := 1 + e.rng.IntN(max(lines*7/10, 1))
	if e.rng.IntN(3) == 0 {
		return plan{kind: eventsLocked, n: n - 1}
	}
	return plan{kind: atLine, n: n, delay: time.Duration(e.rng.IntN(8000)) * time.Microsecond}
}

// stderrLines collects a child's stderr lines and lets the test wait for
// the n-th or for the end.
type stderrLines struct {
	mu     sync.Mutex
	lines  []string
	notify chan struct{} // a line arrived (capacity 1)
	eof    chan struct{} // closed when stderr ends: the child exited
}

func readLines(f *os.File) *stderrLines {
	l := &stderrLines{notify: make(chan struct{}, 1), eof: make(chan struct{})}
	go func() {
		defer close(l.eof)
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			l.mu.Lock()
			l.lines = append(l.lines, sc.Text())
			l.mu.Unlock()
			select {
			case l.notify <- struct{}{}:
			default:
			}
		}
	}()
	return l
}

func (l *stderrLines) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.lines)
}

// waitFor reports whether n lines arrived before the child exited.
func (l *stderrLines) waitFor(n int) bool {
	for l.count() < n {
		select {
		case <-l.notify:
		case <-l.eof:
			return l.count() >= n
		}
	}
	return true
}

func (l *stderrLines) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

func (l *stderrLines) exited() bool {
	select {
	case <-l.eof:
		return true
	default:
		return false
	}
}

// outcome is what a run under a kill plan did.
type outcome struct {
	killed bool   // the child died of the SIGKILL
	code   int    // its exit code when it was not killed
	where  string // what the child was doing when killed
	stderr string
}

// lockTx is a transaction of the test's holding a lock, with its backend's pid.
type lockTx struct {
	tx  pgx.Tx
	pid int32
}

func (e *env) begin() *lockTx {
	e.t.Helper()
	tx, err := e.pool.Begin(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	l := &lockTx{tx: tx}
	if err := tx.QueryRow(e.ctx, "SELECT pg_backend_pid()").Scan(&l.pid); err != nil {
		e.t.Fatal(err)
	}
	return l
}

func (l *lockTx) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	if _, err := l.tx.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func (l *lockTx) end() { _ = l.tx.Rollback(context.Background()) }

// lockEvents takes the lock every key_events insert waits for.
func (e *env) lockEvents() *lockTx {
	l := e.begin()
	l.exec(e.t, "LOCK TABLE "+schema+".key_events IN SHARE MODE")
	return l
}

// waitBlocked waits until the run app waits for a lock held by backend pid
// (true) or the child exits (false).
func (e *env) waitBlocked(out *stderrLines, app string, pid int32) bool {
	e.t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !out.exited() {
		var blocked bool
		if err := e.pool.QueryRow(e.ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
WHERE application_name = $1 AND $2::int = ANY (pg_blocking_pids(pid)))`, app, pid).Scan(&blocked); err != nil {
			e.t.Fatal(err)
		}
		if blocked {
			return true
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("run %s neither waited for the test's lock nor exited within %v", app, waitLimit)
		}
		time.Sleep(2 * time.Millisecond) // poll interval, not synchronisation: the condition decides
	}
	return false
}

// keyringLockPath is the file the local provider flocks to rewrite the keyring.
func (e *env) keyringLockPath() string {
	return filepath.Join(e.dir, "."+filepath.Base(e.keyring)+".lock")
}

// flockKeyring takes the keyring's write lock, as another keybroker would.
func (e *env) flockKeyring() (release func()) {
	e.t.Helper()
	f, err := os.OpenFile(e.keyringLockPath(), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		e.t.Fatal(err)
	}
	return func() { f.Close() }
}

// waitFlocked waits until process pid waits for a flock (true) or the
// child exits (false), from /proc/locks.
func (e *env) waitFlocked(out *stderrLines, pid int) bool {
	e.t.Helper()
	deadline := time.Now().Add(waitLimit)
	want := strconv.Itoa(pid)
	for !out.exited() {
		data, err := os.ReadFile("/proc/locks")
		if err != nil {
			e.t.Fatal(err)
		}
		for _, line := range strings.Split(string(data), "\n") {
			// "1: -> FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" is a waiter.
			f := strings.Fields(line)
			if len(f) > 5 && f[1] == "->" && f[2] == "FLOCK" && f[5] == want {
				return true
			}
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("keybroker pid %d neither waited for the keyring lock nor exited within %v", pid, waitLimit)
		}
		time.Sleep(2 * time.Millisecond) // poll interval, not synchronisation: the condition decides
	}
	return false
}

// watchTmp SIGKILLs pid as soon as the n-th keyring temporary file is
// created in the keyring's directory. It returns a stop function that
// reports whether it fired.
func (e *env) watchTmp(n int) (start func(pid int), stop func() bool) {
	e.t.Helper()
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := syscall.InotifyAddWatch(fd, e.dir, syscall.IN_CREATE); err != nil {
		e.t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "inotify") // non-blocking: Close ends a pending Read
	prefix := "." + filepath.Base(e.keyring) + ".tmp-"
	var fired bool
	done := make(chan struct{})
	start = func(pid int) {
		go func() {
			defer close(done)
			buf := make([]byte, 64<<10)
			seen := 0
			for {
				m, err := f.Read(buf)
				if err != nil {
					return
				}
				for off := 0; off+syscall.SizeofInotifyEvent <= m; {
					nameLen := int(binary.NativeEndian.Uint32(buf[off+12:]))
					name := strings.TrimRight(string(buf[off+syscall.SizeofInotifyEvent:off+syscall.SizeofInotifyEvent+nameLen]), "\x00")
					off += syscall.SizeofInotifyEvent + nameLen
					if strings.HasPrefix(name, prefix) {
						if seen++; seen == n {
							_ = syscall.Kill(pid, syscall.SIGKILL)
							fired = true
							return
						}
					}
				}
			}
		}()
	}
	stop = func() bool {
		f.Close()
		<-done
		return fired
	}
	return start, stop
}

// runKilled runs keybroker under plan p and returns what happened. A run
// that ends before its kill point must exit 0. Once the child is gone, the
// test's locks are released and it waits until the child's database
// sessions have ended.
func (e *env) runKilled(p plan, args ...string) outcome {
	e.t.Helper()
	defer e.timed("kill " + args[0])()
	e.runs++
	app := fmt.Sprintf("crashtest-%d", e.runs)
	args = append(args, "--log-level", "debug")
	cmd := exec.Command(keybrokerBin, args...)
	cmd.Env = e.childEnv(app)
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	r, w, err := os.Pipe()
	if err != nil {
		e.t.Fatal(err)
	}
	cmd.Stderr = w

	var held []func()
	release := func() {
		for _, f := range held {
			f()
		}
		held = nil
	}
	defer release()
	var rowLock, evLock *lockTx
	switch {
	case p.kind == eventsLocked && p.n == 0:
		evLock = e.lockEvents()
		held = append(held, evLock.end)
	case p.kind == retireEventsLocked || p.kind == retireKeyringLocked:
		rowLock = e.begin()
		rowLock.exec(e.t, "SELECT 1 FROM "+schema+".kek WHERE provider = 'local' AND key_id = $1 AND key_version = $2 FOR SHARE",
			keyringID, strconv.FormatUint(uint64(p.version), 10))
		held = append(held, rowLock.end)
	}
	var tmpStart func(int)
	var tmpStop func() bool
	if p.kind == tmpCreated {
		tmpStart, tmpStop = e.watchTmp(p.n)
	}

	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	w.Close()
	out := readLines(r)
	pid := cmd.Process.Pid
	kill := func() { _ = syscall.Kill(pid, syscall.SIGKILL) }
	var where string
	switch p.kind {
	case atLine:
		if out.waitFor(p.n) {
			time.Sleep(p.delay) // moves the kill into the work after the line; any position is valid
			kill()
			where = fmt.Sprintf("after stderr line %d", p.n)
		}
	case eventsLocked:
		if evLock == nil && out.waitFor(p.n) {
			evLock = e.lockEvents()
			held = append(held, evLock.end)
		}
		if evLock != nil && e.waitBlocked(out, app, evLock.pid) {
			kill()
			where = "waiting to write an audit event"
		}
	case retireEventsLocked, retireKeyringLocked:
		if e.waitBlocked(out, app, rowLock.pid) {
			if p.kind == retireEventsLocked {
				l := e.lockEvents()
				held = append(held, l.end)
				_ = rowLock.tx.Commit(e.ctx)
				if e.waitBlocked(out, app, l.pid) {
					kill()
					where = "retiring, waiting to write an audit event"
				}
			} else {
				unlock := e.flockKeyring()
				held = append(held, unlock)
				_ = rowLock.tx.Commit(e.ctx)
				if e.waitFlocked(out, pid) {
					kill()
					where = "retiring, waiting for the keyring lock"
				}
			}
		}
	case tmpCreated:
		tmpStart(pid)
	}
	<-out.eof
	r.Close()
	err = cmd.Wait()
	if tmpStop != nil && tmpStop() {
		where = fmt.Sprintf("writing keyring temporary file %d", p.n)
		if len(e.tmpFiles()) > 0 {
			where += " (left behind)"
		}
	}
	release()
	o := outcome{stderr: out.text()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			o.killed, o.where = true, where
		} else {
			o.code = ee.ExitCode()
		}
	default:
		e.t.Fatalf("keybroker %s: %v", strings.Join(args, " "), err)
	}
	e.waitSessionsGone(app)
	if o.killed {
		name := args[0]
		if slices.Contains(args, "--retire") {
			name += "--retire"
		}
		e.kills[name+"/"+p.kind.String()]++
		e.t.Logf("killed keybroker %s at %v: %s", args[0], p, o.where)
	} else {
		e.checks.ok("unkilled-run-exit-0", o.code == 0 || o.code == 5 && e.incompleteOK, "keybroker %s (plan %v) ended by itself with exit %d: %s",
			strings.Join(args, " "), p, o.code, lastLines(o.stderr, 3))
	}
	e.readKeyring()
	return o
}

// waitSessionsGone waits until no database session of run app is left, so
// no lock of a dead child survives into the rerun.
func (e *env) waitSessionsGone(app string) {
	e.t.Helper()
	deadline := time.Now().Add(waitLimit)
	for {
		var n int
		if err := e.pool.QueryRow(e.ctx, "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app).Scan(&n); err != nil {
			e.t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%d database sessions of killed run %s still open after %v", n, app, waitLimit)
		}
		time.Sleep(5 * time.Millisecond) // poll interval, not synchronisation: the condition decides
	}
}

// keyringFile is the part of the keyring file format the test reads.
type keyringFile struct {
	ID      string `json:"id"`
	Primary uint32 `json:"primary"`
	Keys    []struct {
		Version uint32 `json:"version"`
		Key     string `json:"key"`
		Retired bool   `json:"retired"`
	} `json:"keys"`
}

// readKeyring parses the keyring file and remembers every live key.
func (e *env) readKeyring() keyringFile {
	e.t.Helper()
	data, err := os.ReadFile(e.keyring)
	if err != nil {
		e.t.Fatal(err)
	}
	var kf keyringFile
	if err := json.Unmarshal(data, &kf); err != nil {
		e.t.Fatalf("keyring file: %v", err)
	}
	for _, k := range kf.Keys {
		if k.Key != "" {
			e.keys[k.Version] = k.Key
		}
	}
	return kf
}

// live returns the keyring's live versions, ascending, and whether v is retired there.
func (kf keyringFile) live() []uint32 {
	var out []uint32
	for _, k := range kf.Keys {
		if !k.Retired {
			out = append(out, k.Version)
		}
	}
	slices.Sort(out)
	return out
}

func (kf keyringFile) versions() []uint32 {
	var out []uint32
	for _, k := range kf.Keys {
		out = append(out, k.Version)
	}
	slices.Sort(out)
	return out
}

func (kf keyringFile) retired(v uint32) bool {
	for _, k := range kf.Keys {
		if k.Version == v {
			return k.Retired
		}
	}
	return false
}

// tmpFiles lists the keyring temporary files in the keyring's directory.
func (e *env) tmpFiles() []string {
	e.t.Helper()
	ents, err := os.ReadDir(e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, de := range ents {
		if strings.HasPrefix(de.Name(), "."+filepath.Base(e.keyring)+".tmp-") {
			out = append(out, de.Name())
		}
	}
	return out
}

// checkKeyFiles checks that no file in the keyring's directory holds the
// key of a retired version (base64 or raw) and that no temporary file is
// left (the last run opened the keyring).
func (e *env) checkKeyFiles(kf keyringFile) {
	e.t.Helper()
	tmp := e.tmpFiles()
	e.checks.ok("no-tmp-after-open", len(tmp) == 0, "keyring temporary files left after the next open: %v", tmp)
	ents, err := os.ReadDir(e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, de := range ents {
		data, err := os.ReadFile(filepath.Join(e.dir, de.Name()))
		if err != nil {
			e.t.Fatal(err)
		}
		for v, b64 := range e.keys {
			if !kf.retired(v) {
				continue
			}
			raw, _ := base64.StdEncoding.DecodeString(b64)
			e.checks.ok("no-retired-key-in-files", !bytes.Contains(data, []byte(b64)) && !bytes.Contains(data, raw),
				"file %s holds the key of retired version %d", de.Name(), v)
		}
	}
}

// installHistory adds test-only triggers that count committed row changes,
// the reference for the audit counts.
func (e *env) installHistory() {
	e.t.Helper()
	s := schema
	for _, stmt := range []string{
		`CREATE TABLE public.crash_history (op text NOT NULL)`,
		`CREATE FUNCTION public.crash_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.crash_history (op) VALUES (TG_ARGV[0]); RETURN NULL; END $$`,
		`CREATE TRIGGER crash_secret_insert AFTER INSERT ON ` + s + `.encrypted_secrets FOR EACH ROW EXECUTE FUNCTION public.crash_record('secret.insert')`,
		`CREATE TRIGGER crash_secret_rekey AFTER UPDATE ON ` + s + `.encrypted_secrets FOR EACH ROW
WHEN (OLD.data_key_id IS DISTINCT FROM NEW.data_key_id) EXECUTE FUNCTION public.crash_record('secret.rekey')`,
		`CREATE TRIGGER crash_dk_rewrap AFTER UPDATE ON ` + s + `.data_keys FOR EACH ROW
WHEN (OLD.kek_id IS DISTINCT FROM NEW.kek_id) EXECUTE FUNCTION public.crash_record('dk.rewrap')`,
		`CREATE TRIGGER crash_dk_retire AFTER UPDATE ON ` + s + `.data_keys FOR EACH ROW
WHEN (OLD.state <> 'retired' AND NEW.state = 'retired') EXECUTE FUNCTION public.crash_record('dk.retire')`,
		`CREATE TRIGGER crash_dk_delete AFTER DELETE ON ` + s + `.data_keys FOR EACH ROW EXECUTE FUNCTION public.crash_record('dk.delete')`,
	} {
		if _, err := e.pool.Exec(e.ctx, stmt); err != nil {
			e.t.Fatalf("%s: %v", stmt, err)
		}
	}
}

func (e *env) count(sql string, args ...any) int64 {
	e.t.Helper()
	var n int64
	if err := e.pool.QueryRow(e.ctx, sql, args...).Scan(&n); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// eventSum is the sum of the counts of audit events named event.
func (e *env) eventSum(event string) int64 {
	return e.count("SELECT coalesce(sum(count), 0)::bigint FROM "+schema+".key_events WHERE event = $1", event)
}

// changed is how many committed row changes of kind op the triggers saw.
func (e *env) changed(op string) int64 {
	return e.count("SELECT count(*) FROM public.crash_history WHERE op = $1", op)
}

// checkAudit compares each audit sum with the row changes it accounts for.
func (e *env) checkAudit() {
	e.t.Helper()
	for _, c := range []struct{ event, op string }{
		{"migrate.plaintext", "secret.insert"},
		{"kek.rewrap", "dk.rewrap"},
		{"dek.reencrypt", "secret.rekey"},
		{"dek.retire", "dk.retire"},
		{"dek.destroy", "dk.delete"},
	} {
		got, want := e.eventSum(c.event), e.changed(c.op)
		e.checks.ok("audit-"+c.event, got == want, "sum of %s counts %d, rows changed %d", c.event, got, want)
	}
}

// kekRow is one recorded KEK version of the keyring.
type kekRow struct {
	id       int64
	version  uint32
	retired  bool
	recorded int64 // kek.record and kek.rotate events
	retires  int64 // kek.retire events
}

func (e *env) kekRows() map[uint32]kekRow {
	e.t.Helper()
	rows, err := e.pool.Query(e.ctx, `SELECT k.id, k.key_version, k.retired_at IS NOT NULL,
  (SELECT count(*) FROM `+schema+`.key_events v WHERE v.kek_id = k.id AND v.event IN ('kek.record', 'kek.rotate')),
  (SELECT count(*) FROM `+schema+`.key_events v WHERE v.kek_id = k.id AND v.event = 'kek.retire')
FROM `+schema+`.kek k WHERE k.provider = 'local' AND k.key_id = $1`, keyringID)
	if err != nil {
		e.t.Fatal(err)
	}
	out := map[uint32]kekRow{}
	var r kekRow
	var ver string
	if _, err := pgx.ForEachRow(rows, []any{&r.id, &ver, &r.retired, &r.recorded, &r.retires}, func() error {
		n, err := strconv.ParseUint(ver, 10, 32)
		if err != nil {
			return fmt.Errorf("kek version %q: %v", ver, err)
		}
		r.version = uint32(n)
		out[r.version] = r
		return nil
	}); err != nil {
		e.t.Fatal(err)
	}
	return out
}

// checkKeys checks the keyring file and the kek table after a finished
// round: versions 1..wantPrimary, wantPrimary primary, retired exactly
// those below retiredBelow (in the file and in the database, each with one
// kek.retire event), every version recorded with an event, and no data key
// under any version but the primary.
func (e *env) checkKeys(wantPrimary, retiredBelow uint32) keyringFile {
	e.t.Helper()
	kf := e.readKeyring()
	var want []uint32
	for v := uint32(1); v <= wantPrimary; v++ {
		want = append(want, v)
	}
	e.checks.ok("keyring-one-rotation-per-round", kf.Primary == wantPrimary && slices.Equal(kf.versions(), want),
		"keyring primary %d, versions %v; want primary %d, versions %v", kf.Primary, kf.versions(), wantPrimary, want)
	var wantLive []uint32
	for v := max(retiredBelow, 1); v <= wantPrimary; v++ {
		wantLive = append(wantLive, v)
	}
	e.checks.ok("keyring-live-versions", slices.Equal(kf.live(), wantLive), "keyring live versions %v, want %v", kf.live(), wantLive)
	rows := e.kekRows()
	for v := uint32(1); v <= kf.Primary; v++ {
		r, ok := rows[v]
		if !e.checks.ok("kek-row-per-version", ok, "keyring version %d has no kek row", v) {
			continue
		}
		e.checks.ok("kek-version-audited", r.recorded >= 1, "kek version %d has no kek.record or kek.rotate event", v)
		e.checks.ok("kek-retired-matches-keyring", r.retired == kf.retired(v), "version %d: kek.retired_at set %t, keyring retired %t", v, r.retired, kf.retired(v))
		if r.retired {
			e.checks.ok("kek-retire-event", r.retires == 1, "retired version %d has %d kek.retire events, want 1", v, r.retires)
		}
	}
	for v := range rows {
		e.checks.ok("kek-row-in-keyring", v >= 1 && v <= kf.Primary, "kek row for version %d that the keyring never had", v)
	}
	off := e.count(`SELECT count(*) FROM `+schema+`.data_keys d JOIN `+schema+`.kek k ON k.id = d.kek_id
WHERE NOT (k.provider = 'local' AND k.key_id = $1 AND k.key_version = $2)`, keyringID, strconv.FormatUint(uint64(kf.Primary), 10))
	e.checks.ok("data-keys-on-primary", off == 0, "%d data keys not under the primary version %d", off, kf.Primary)
	e.checkKeyFiles(kf)
	return kf
}

// secretID names one secret.
type secretID struct{ project, name string }

// checkSecrets checks that the stored secrets are exactly the keys of want
// (when all is set) and that those in check read back byte-exact through a
// fresh Store.
func (e *env) checkSecrets(want map[secretID][]byte, check []secretID, all bool) {
	e.t.Helper()
	defer e.timed("read back")()
	if all {
		rows, err := e.pool.Query(e.ctx, "SELECT project_id, name FROM "+schema+".encrypted_secrets")
		if err != nil {
			e.t.Fatal(err)
		}
		ids, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (id secretID, err error) {
			err = r.Scan(&id.project, &id.name)
			return id, err
		})
		if err != nil {
			e.t.Fatal(err)
		}
		var extra int
		for _, id := range ids {
			if _, ok := want[id]; !ok {
				extra++
			}
		}
		e.checks.ok("secret-set-exact", extra == 0 && len(ids) == len(want), "%d secrets stored, %d expected, %d unexpected", len(ids), len(want), extra)
	}
	kek, err := provider.Open(e.ctx, "local://"+e.keyring)
	if err != nil {
		e.t.Fatal(err)
	}
	st, err := pgstore.New(e.ctx, e.pool, pgstore.Config{KEK: kek, Actor: "crashtest"})
	if err != nil {
		e.t.Fatal(err)
	}
	defer st.Close()
	var mu sync.Mutex
	var bad []string
	jobs := make(chan secretID)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range jobs {
				got, err := st.Get(e.ctx, id.project, id.name)
				if err != nil || !bytes.Equal(got, want[id]) {
					mu.Lock()
					bad = append(bad, fmt.Sprintf("%s/%s (%v)", id.project, id.name, err))
					mu.Unlock()
				}
			}
		}()
	}
	for _, id := range check {
		jobs <- id
	}
	close(jobs)
	wg.Wait()
	slices.Sort(bad)
	e.checks.ok("secrets-read-back", len(bad) == 0, "%d of %d secrets do not read back byte-exact, first: %v", len(bad), len(check), bad[:min(len(bad), 3)])
}

// checkCLI runs `keybroker status` and, with verify, `keybroker verify`:
// each must exit 0.
func (e *env) checkCLI(verify bool) {
	e.t.Helper()
	if verify {
		code, out, errOut := e.run("verify")
		e.checks.ok("verify-exit-0", code == 0, "keybroker verify: exit %d: %s %s", code, lastLines(out, 2), lastLines(errOut, 2))
	}
	code, out, errOut := e.run("status")
	e.checks.ok("status-exit-0", code == 0, "keybroker status: exit %d: %s %s", code, lastLines(out, 3), lastLines(errOut, 2))
}

// source is a plaintext table the test fills and keybroker imports.
type source struct {
	table  string
	values map[secretID][]byte // what each imported secret must read back as
	ids    map[int64]secretID
}

func newSource(e *env, table string) *source {
	e.t.Helper()
	if _, err := e.pool.Exec(e.ctx, "CREATE TABLE "+table+" (id bigint PRIMARY KEY, project_id text NOT NULL, name text NOT NULL, secret text)"); err != nil {
		e.t.Fatal(err)
	}
	return &source{table: table, values: map[secretID][]byte{}, ids: map[int64]secretID{}}
}

// alphabet has one-, two-, three- and four-byte UTF-8 characters.
var alphabet = []rune("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+=/ é€𝄞")

// add inserts rows ids [from, to) with a seeded value each, in the project
// project(id), and returns their secrets.
func (s *source) add(e *env, from, to int64, project func(int64) string) []secretID {
	e.t.Helper()
	var ids []int64
	var projects, names, values []string
	var out []secretID
	for id := from; id < to; id++ {
		n := 1 + e.rng.IntN(120)
		v := make([]rune, n)
		for i := range v {
			v[i] = alphabet[e.rng.IntN(len(alphabet))]
		}
		sid := secretID{project(id), fmt.Sprintf("secret-%06d", id)}
		ids, projects, names, values = append(ids, id), append(projects, sid.project), append(names, sid.name), append(values, string(v))
		s.values[sid] = []byte(string(v))
		s.ids[id] = sid
		out = append(out, sid)
	}
	if _, err := e.pool.Exec(e.ctx, "INSERT INTO "+s.table+" SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])",
		ids, projects, names, values); err != nil {
		e.t.Fatal(err)
	}
	return out
}

// importArgs is the import-plaintext command line for s.
func (s *source) importArgs(extra ...string) []string {
	return append([]string{"import-plaintext", s.table, "secret", "--key-column", "id", "--project-column", "project_id", "--name-column", "name"}, extra...)
}

// sample returns up to n of ids, drawn with the test's generator.
func (e *env) sample(ids []secretID, n int) []secretID {
	slices.SortFunc(ids, func(a, b secretID) int { return strings.Compare(a.project+"/"+a.name, b.project+"/"+b.name) })
	e.rng.Shuffle(len(ids), func(i, j int) { ids[i], ids[j] = ids[j], ids[i] })
	return ids[:min(n, len(ids))]
}

func (s *source) all() []secretID {
	out := make([]secretID, 0, len(s.values))
	for id := range s.values {
		out = append(out, id)
	}
	return out
}
