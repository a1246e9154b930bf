package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/profullstack/keybroker/internal/pgtest"
)

// TestTerminal drives keybroker in a real terminal (a tmux pane): a long
// operation shows the progress bar with its count and rate and no info log
// lines, and Ctrl-C in
// the middle of demo exits 130 with one line and leaves no temporary
// directory or server behind.
func TestTerminal(t *testing.T) {
	tmux, err := exec.LookPath("tmux")
	if err != nil {
		t.Fatal("tmux not found: run `make deps` (scripts/deps.sh installs it)")
	}
	kb, err := exec.LookPath("keybroker") // testscript.Main put it on $PATH
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	dbURL := pgtest.NewDatabase(t)
	env := append(os.Environ(),
		"KEYBROKER_DATABASE_URL="+dbURL,
		"KEYBROKER_KEK=local://"+filepath.Join(dir, "keyring.json"),
		"KEYBROKER_KEK_DECRYPT_ONLY=", "KEYBROKER_SCHEMA=", "KEYBROKER_CONFIG=",
		"KEYBROKER_LOG_LEVEL=", "KEYBROKER_LOG_FORMAT=")
	runKB := func(args ...string) {
		t.Helper()
		cmd := exec.Command(kb, args...)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("keybroker %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	runKB("keygen", filepath.Join(dir, "keyring.json"))
	runKB("migrate")
	const rows = 3000
	pool := pgtest.PoolFor(t, dbURL)
	loadLegacy(t, pool, rows)

	sock := filepath.Join(dir, "tmux.sock")
	tm := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(tmux, append([]string{"-S", sock}, args...)...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("tmux %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	// A private server (-S) so the pane gets this test's environment.
	tm("-f", "/dev/null", "new-session", "-d", "-x", "120", "-y", "30", "-s", "kb", "sh")
	t.Cleanup(func() { _ = exec.Command(tmux, "-S", sock, "kill-server").Run() })
	tm("send-keys", "-t", "kb", kb+` import-plaintext public.legacy_webhooks secret; echo "KB""-EXIT=$?"`, "Enter")

	// waitFor polls the pane until it shows want (bounded).
	waitFor := func(want string) string {
		t.Helper()
		var pane string
		deadline := time.Now().Add(2 * time.Minute)
		for !strings.Contains(pane, want) {
			if time.Now().After(deadline) {
				t.Fatalf("no %q in the pane within 2 minutes; pane:\n%s", want, pane)
			}
			time.Sleep(100 * time.Millisecond) // polling interval, not synchronisation
			pane = tm("capture-pane", "-p", "-J", "-t", "kb")
		}
		return pane
	}
	pane := waitFor("KB-EXIT=")
	if !strings.Contains(pane, "KB-EXIT=0") {
		t.Fatalf("keybroker failed; pane:\n%s", pane)
	}
	// The final frame: description, full bar, 100%, count and rate.
	bar := regexp.MustCompile(fmt.Sprintf(`import.* 100%% \|█+\| \(%d/%d, [0-9.]+ secrets/s\)`, rows, rows))
	if !bar.MatchString(pane) {
		t.Errorf("no finished progress bar in the pane:\n%s", pane)
	}
	if strings.Contains(pane, "whsec_") {
		t.Errorf("plaintext secret on the terminal:\n%s", pane)
	}
	// On a terminal the default log level is warn: no per-data-key or
	// per-batch info lines bury the bar.
	if strings.Contains(pane, "level=INFO") {
		t.Errorf("info log lines on the terminal:\n%s", pane)
	}

	// Ctrl-C during demo's import, once its bar shows. As root the demo's
	// server runs as another user, who must be able to reach $TMPDIR.
	tmp := filepath.Join(dir, "tmp")
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	tm("send-keys", "-t", "kb", "clear; tmux -S "+sock+` clear-history; echo "KB""-CLEARED"`, "Enter")
	waitFor("KB-CLEARED")
	tm("send-keys", "-t", "kb", "env -u KEYBROKER_DATABASE_URL TMPDIR="+tmp+" "+kb+` demo --rows 300000; echo "KB""-DEMO=$?"`, "Enter")
	waitFor("import ")
	tm("send-keys", "-t", "kb", "C-c")
	pane = waitFor("KB-DEMO=")
	if !strings.Contains(pane, "KB-DEMO=130") || !strings.Contains(pane, "keybroker: interrupted; nothing was partially written, rerun to continue") {
		t.Errorf("want exit 130 and the interrupted line; pane:\n%s", pane)
	}
	if left, _ := os.ReadDir(tmp); len(left) != 0 {
		t.Errorf("demo left %d entries in $TMPDIR, first %s", len(left), left[0].Name())
	}
	if pids := processesMentioning(t, tmp); len(pids) != 0 {
		t.Errorf("processes still running from demo's directory: %v", pids)
	}
}

// processesMentioning lists the processes whose command line contains s.
func processesMentioning(t *testing.T, s string) []string {
	t.Helper()
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	var pids []string
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), s) {
			pids = append(pids, filepath.Base(filepath.Dir(p)))
		}
	}
	return pids
}

// loadLegacy creates public.legacy_webhooks with n rows, as the demo does.
func loadLegacy(t *testing.T, pool *pgxpool.Pool, n int) []legacyRow {
	t.Helper()
	rows, err := demoRows(n, 10)
	if err != nil {
		t.Fatal(err)
	}
	if err := createLegacyTable(context.Background(), pool, "public", rows); err != nil {
		t.Fatal(err)
	}
	return rows
}
