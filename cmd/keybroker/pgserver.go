package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// pgServer is a throwaway PostgreSQL server in a temporary directory. It
// listens only on a Unix socket inside that directory, so it needs no free
// TCP port and nothing else can reach it.
type pgServer struct {
	dir    string
	bindir string
	cred   *syscall.Credential // nil: run as ourselves
	stopFn func() error        // embedded-postgres fallback
	URL    string
}

const installHint = "no PostgreSQL server binaries found (initdb, pg_ctl): install them (apt-get install postgresql) or set KEYBROKER_DATABASE_URL"

// pgBinGlob is where Debian and Ubuntu install PostgreSQL's server binaries.
var pgBinGlob = "/usr/lib/postgresql/*/bin"

// findPGBinDir returns the directory holding initdb and pg_ctl: the newest
// pgBinGlob match, else the directory of postgres on $PATH.
func findPGBinDir() (string, bool) {
	dirs, _ := filepath.Glob(pgBinGlob)
	sort.Slice(dirs, func(i, j int) bool { return pgMajor(dirs[i]) > pgMajor(dirs[j]) })
	if p, err := exec.LookPath("postgres"); err == nil {
		dirs = append(dirs, filepath.Dir(p))
	}
	for _, d := range dirs {
		if isExec(filepath.Join(d, "initdb")) && isExec(filepath.Join(d, "pg_ctl")) {
			return d, true
		}
	}
	return "", false
}

func pgMajor(bindir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(bindir)))
	return n
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

// serverUser picks who runs the server. initdb refuses to run as root, so
// as root it is the user who ran sudo (SUDO_UID), else the postgres user.
func serverUser() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	if uid, err := strconv.Atoi(os.Getenv("SUDO_UID")); err == nil && uid != 0 {
		gid, _ := strconv.Atoi(os.Getenv("SUDO_GID"))
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, errors.New("running as root, and initdb refuses root: create a postgres user, run via sudo as another user, or set KEYBROKER_DATABASE_URL")
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
}

// startPGServer initialises and starts a server from the machine's
// PostgreSQL binaries, or, where there are none, from embedded-postgres.
// The caller must call stop, which also removes the directory.
func startPGServer(ctx context.Context, log *slog.Logger) (*pgServer, error) {
	bindir, ok := findPGBinDir()
	if !ok {
		s, err := startEmbeddedPG(ctx, log)
		if err != nil {
			log.Debug("embedded-postgres failed", "err", err)
			return nil, errors.New(installHint)
		}
		return s, nil
	}
	cred, err := serverUser()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(baseDir(cred), "keybroker-pg-")
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	s := &pgServer{dir: dir, bindir: bindir, cred: cred}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("postgres: %w", err)
		}
	}
	data := filepath.Join(dir, "data")
	log.Info("starting throwaway PostgreSQL", "bindir", bindir, "dir", dir)
	if out, err := s.run(ctx, "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("postgres: initdb: %v: %s", err, lastLine(out))
	}
	// pg_ctl runs the server through the shell: quote the directory.
	opts := "-c listen_addresses='' -k '" + dir + "' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
	if out, err := s.run(ctx, "pg_ctl", "-D", data, "-l", filepath.Join(dir, "server.log"), "-w", "-t", "60", "-o", opts, "start"); err != nil {
		log0, _ := os.ReadFile(filepath.Join(dir, "server.log"))
		s.stop()
		return nil, fmt.Errorf("postgres: pg_ctl start: %v: %s %s", err, lastLine(out), lastLine(log0))
	}
	q := url.Values{"host": {dir}, "sslmode": {"disable"}}
	// pgx reads "+" in a query literally: spell spaces %20.
	s.URL = "postgres://postgres@/postgres?" + strings.ReplaceAll(q.Encode(), "+", "%20")
	return s, nil
}

// run runs a PostgreSQL binary as the server user and returns its output.
// It runs in its own process group so that a Ctrl-C at the terminal
// reaches keybroker, which then stops the server in order, rather than the
// server directly. Output goes through a file, not a pipe: the server
// pg_ctl starts inherits the descriptors and would hold a pipe open.
func (s *pgServer) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	out, err := os.CreateTemp("", "keybroker-pg-out-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(out.Name())
	defer out.Close()
	c := exec.CommandContext(ctx, filepath.Join(s.bindir, name), args...)
	c.Dir = s.dir
	c.Stdout, c.Stderr = out, out
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: s.cred}
	c.Env = append(os.Environ(), "LC_ALL=C")
	err = c.Run()
	b, _ := os.ReadFile(out.Name())
	return b, err
}

// stop stops the server immediately and removes its directory. It uses a
// fresh context: it runs after the command's context was cancelled.
func (s *pgServer) stop() error {
	if s.stopFn != nil {
		return s.stopFn()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var err error
	if _, statErr := os.Stat(filepath.Join(s.dir, "data", "postmaster.pid")); statErr == nil {
		if out, e := s.run(ctx, "pg_ctl", "-D", filepath.Join(s.dir, "data"), "-m", "immediate", "-w", "stop"); e != nil {
			err = fmt.Errorf("postgres: pg_ctl stop: %v: %s", e, lastLine(out))
		}
	}
	if e := os.RemoveAll(s.dir); e != nil && err == nil {
		err = e
	}
	return err
}

// baseDir is where the server's directory goes: $TMPDIR, unless the socket
// path would exceed the kernel's limit for Unix sockets (about 107 bytes)
// or the server runs as another user who cannot reach $TMPDIR (a private
// one); then /tmp.
func baseDir(cred *syscall.Credential) string {
	tmp := os.TempDir()
	if len(tmp)+len("/keybroker-pg-1234567890/.s.PGSQL.5432") > 100 {
		return "/tmp"
	}
	if cred == nil {
		return ""
	}
	for d := tmp; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return "/tmp"
		}
		sys, ok := st.Sys().(*syscall.Stat_t)
		if !ok || (st.Mode().Perm()&0o001 == 0 && sys.Uid != cred.Uid) {
			return "/tmp"
		}
		if d == filepath.Dir(d) {
			return ""
		}
	}
}

// lastLine is the last non-empty line of a tool's output: its error.
func lastLine(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}
