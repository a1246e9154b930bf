// Package pgserver starts throwaway PostgreSQL servers, and PgBouncers in
// front of them, from the machine's binaries: the one launcher behind the
// tests (internal/pgtest, scripts/test.sh through cmd/pgserver), the
// benchmarks (bench/) and `keybroker demo`.
//
// StartStandby starts a hot standby of such a server (pg_basebackup, then
// streaming replication), for read-replica tests.
//
// A server lives in one directory holding its data (data/), its log
// (server.log) and its Unix socket. Durability is off (fsync, synchronous
// commit, full-page writes): the data is thrown away. initdb and pgbouncer
// refuse to run as root, so as root both run as the user who ran sudo
// (SUDO_UID), else as the postgres user.
package pgserver

import (
	"context"
	"errors"
	"fmt"
	"net"
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

// ErrNoBinaries means the machine has no PostgreSQL server binaries
// (initdb and pg_ctl).
var ErrNoBinaries = errors.New("pgserver: no PostgreSQL server binaries (initdb, pg_ctl) in " + binGlob + " or $PATH: install them (make deps, or apt-get install postgresql)")

// binGlob is where Debian and Ubuntu install PostgreSQL's server binaries.
const binGlob = "/usr/lib/postgresql/*/bin"

// Options says how to start a server.
type Options struct {
	// Dir is the directory for the server's files. It must not exist yet
	// or be empty; Stop removes it. Empty: a new temporary directory.
	Dir string
	// TCP makes the server listen on a free 127.0.0.1 port as well, and URL
	// name it (other processes then reach it by host and port). Otherwise
	// it listens only on its Unix socket, which nothing outside Dir finds.
	TCP bool
	// BinGlob overrides where the binaries are looked for first (tests).
	BinGlob string
}

// Server is a running throwaway PostgreSQL server.
type Server struct {
	// URL is the superuser ("postgres", no password) URL of the postgres
	// database.
	URL  string
	Dir  string
	Port int // 0 when the server listens only on its socket
	bin  string
	cred *syscall.Credential // nil: run as ourselves
}

// DataDir is the server's data directory (it holds postmaster.pid).
func (s *Server) DataDir() string { return filepath.Join(s.Dir, "data") }

// Start initialises a cluster and starts a server on it, waiting until it
// accepts connections.
func Start(ctx context.Context, opts Options) (*Server, error) {
	return start(ctx, opts, nil)
}

// StartStandby starts a hot standby of primary (a server Start started, with
// the same Options.BinGlob): pg_basebackup copies the primary's cluster over
// a replication connection, and the standby then streams the primary's WAL
// asynchronously and serves read-only queries, as a read replica does. Its
// application_name at the primary is name (for synchronous_standby_names).
// It waits until the standby accepts connections.
func StartStandby(ctx context.Context, primary *Server, name string, opts Options) (*Server, error) {
	if primary == nil || primary.Dir == "" {
		return nil, errors.New("pgserver: StartStandby needs a running primary")
	}
	ci := primary.conninfo("application_name=" + name)
	return start(ctx, opts, &ci)
}

// conninfo is a libpq connection string for the server's superuser, over its
// Unix socket.
func (s *Server) conninfo(extra ...string) string {
	port := s.Port
	if port == 0 {
		port = 5432
	}
	return strings.Join(append([]string{"host='" + s.Dir + "'", fmt.Sprintf("port=%d", port), "user=postgres"}, extra...), " ")
}

// start is Start, or with primary set (its conninfo) StartStandby.
func start(ctx context.Context, opts Options, primary *string) (*Server, error) {
	bin, ok := findBinDir(opts.BinGlob)
	if !ok {
		return nil, ErrNoBinaries
	}
	cred, err := serverUser()
	if err != nil {
		return nil, err
	}
	dir := opts.Dir
	if dir == "" {
		if dir, err = os.MkdirTemp(baseDir(cred), "keybroker-pg-"); err != nil {
			return nil, fmt.Errorf("pgserver: %w", err)
		}
	} else if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("pgserver: %w", err)
	}
	s := &Server{Dir: dir, bin: bin, cred: cred}
	if err := s.prepareDir(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if primary != nil {
		// -R writes standby.signal and primary_conninfo (the connection
		// string given, application_name included).
		if out, err := s.run(ctx, "pg_basebackup", "-D", s.DataDir(), "-d", *primary, "-X", "stream", "-R", "-c", "fast", "--no-sync"); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("pgserver: pg_basebackup: %v: %s", err, lastLine(out))
		}
	} else if out, err := s.run(ctx, "initdb", "-D", s.DataDir(), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pgserver: initdb: %v: %s", err, lastLine(out))
	}
	// pg_ctl runs the server through the shell: quote the directory.
	opts0 := "-k '" + dir + "' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
	if opts.TCP {
		if s.Port, err = freePort(); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		opts0 += fmt.Sprintf(" -c listen_addresses=127.0.0.1 -p %d", s.Port)
	} else {
		opts0 += " -c listen_addresses=''"
	}
	if out, err := s.run(ctx, "pg_ctl", "-D", s.DataDir(), "-l", filepath.Join(dir, "server.log"), "-w", "-t", "60", "-o", opts0, "start"); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "server.log"))
		s.Stop()
		return nil, fmt.Errorf("pgserver: pg_ctl start: %v: %s %s", err, lastLine(out), lastLine(log))
	}
	if opts.TCP {
		s.URL = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", s.Port)
	} else {
		q := url.Values{"host": {dir}, "sslmode": {"disable"}}
		// pgx reads "+" in a query literally: spell spaces %20.
		s.URL = "postgres://postgres@/postgres?" + strings.ReplaceAll(q.Encode(), "+", "%20")
	}
	return s, nil
}

// Stop stops the server immediately and removes its directory. It is safe
// to call on a server that did not start, and more than once.
func (s *Server) Stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var err error
	if _, statErr := os.Stat(filepath.Join(s.DataDir(), "postmaster.pid")); statErr == nil {
		if out, e := s.run(ctx, "pg_ctl", "-D", s.DataDir(), "-m", "immediate", "-w", "stop"); e != nil {
			err = fmt.Errorf("pgserver: pg_ctl stop: %v: %s", e, lastLine(out))
		}
	}
	if e := os.RemoveAll(s.Dir); e != nil && err == nil {
		err = fmt.Errorf("pgserver: %w", e)
	}
	return err
}

// StopDir stops the server Start left running in dir (from another
// process, as cmd/pgserver's stop does) and removes dir.
func StopDir(dir string) error {
	bin, ok := findBinDir("")
	if !ok {
		os.RemoveAll(dir)
		return ErrNoBinaries
	}
	cred, err := serverUser()
	if err != nil {
		return err
	}
	return (&Server{Dir: dir, bin: bin, cred: cred}).Stop()
}

// prepareDir hands the directory to the server's user and checks that user
// can reach it: private ancestors of ours (mktemp -d's, t.TempDir's) get
// o+x, search only, so it can pass through them.
func (s *Server) prepareDir() error {
	if s.cred == nil {
		return nil
	}
	if err := os.Chown(s.Dir, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
		return fmt.Errorf("pgserver: %w", err)
	}
	if _, err := s.run(context.Background(), "", "test", "-x", s.Dir); err == nil {
		return nil
	}
	for d := filepath.Dir(s.Dir); d != filepath.Dir(d); d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			break
		}
		if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) == os.Geteuid() && st.Mode().Perm()&0o001 == 0 {
			os.Chmod(d, st.Mode().Perm()|0o001)
		}
	}
	if _, err := s.run(context.Background(), "", "test", "-x", s.Dir); err != nil {
		return fmt.Errorf("pgserver: the server's user (uid %d) cannot reach %s", s.cred.Uid, s.Dir)
	}
	return nil
}

// run runs the PostgreSQL binary name (or, with name "", the program
// args[0] from $PATH) as the server's user, in the server's directory, and
// returns its output. It runs in its own process group so that a Ctrl-C at
// the terminal reaches the caller, which then stops the server in order,
// rather than the server directly. Output goes through a file, not a pipe:
// the server pg_ctl starts inherits the descriptors and would hold a pipe
// open.
func (s *Server) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	path := filepath.Join(s.bin, name)
	if name == "" {
		path, args = args[0], args[1:]
	}
	return runAs(ctx, s.cred, s.Dir, path, args...)
}

func runAs(ctx context.Context, cred *syscall.Credential, dir, path string, args ...string) ([]byte, error) {
	out, err := os.CreateTemp("", "keybroker-pg-out-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(out.Name())
	defer out.Close()
	c := exec.CommandContext(ctx, path, args...)
	c.Dir = dir
	c.Stdout, c.Stderr = out, out
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: cred}
	c.Env = append(os.Environ(), "LC_ALL=C")
	err = c.Run()
	b, _ := os.ReadFile(out.Name())
	return b, err
}

// Tool returns the path of one of PostgreSQL's client programs (pg_dump,
// pg_restore, pg_basebackup, psql) from the directory the servers Start runs
// come from, so that the tool's version is the server's (pg_dump refuses a
// newer server).
func Tool(name string) (string, error) {
	dir, ok := findBinDir("")
	if !ok {
		return "", ErrNoBinaries
	}
	p := filepath.Join(dir, name)
	if !isExec(p) {
		return "", fmt.Errorf("pgserver: %s is not in %s: install PostgreSQL's client programs (apt-get install postgresql-client)", name, dir)
	}
	return p, nil
}

// findBinDir returns the directory holding initdb and pg_ctl: the newest
// glob match, else the directory of postgres on $PATH.
func findBinDir(glob string) (string, bool) {
	if glob == "" {
		glob = binGlob
	}
	dirs, _ := filepath.Glob(glob)
	sort.Slice(dirs, func(i, j int) bool { return major(dirs[i]) > major(dirs[j]) })
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

func major(bindir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(bindir)))
	return n
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

// serverUser picks who runs the server: ourselves, or as root the user who
// ran sudo (SUDO_UID), else the postgres user.
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
		return nil, errors.New("pgserver: running as root, and initdb refuses root: create a postgres user, or run via sudo as another user")
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
}

// baseDir is where a new server directory goes: $TMPDIR, unless the socket
// path would exceed the kernel's limit for Unix sockets (about 107 bytes)
// or the server runs as another user who cannot reach $TMPDIR (a private
// one); then /tmp.
func baseDir(cred *syscall.Credential) string {
	tmp := os.TempDir()
	if len(tmp)+len("/keybroker-pg-1234567890/.s.PGSQL.65535") > 100 {
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

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pgserver: find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// lastLine is the last non-empty line of a tool's output: its error.
func lastLine(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}
