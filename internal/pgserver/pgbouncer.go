package pgserver

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// ErrNoPgBouncer means the machine has no pgbouncer binary.
var ErrNoPgBouncer = errors.New("pgserver: no pgbouncer binary on $PATH or in /usr/sbin: install it (make deps, or apt-get install pgbouncer)")

// BouncerOptions says how to start a PgBouncer.
type BouncerOptions struct {
	// PoolSize is default_pool_size: server connections per database and
	// user. 2 when zero: small, so that two clients' session state (such as
	// named prepared statements) meets on one server connection at once.
	PoolSize int
}

// Bouncer is a running PgBouncer in transaction pooling mode
// (pool_mode=transaction): a client holds a server connection only for
// the length of a transaction, as with Supabase's transaction-mode pooler.
type Bouncer struct {
	// URL is the upstream URL with its host and port replaced by the
	// bouncer's (127.0.0.1 and a free port); any database name of the
	// upstream server works in its path.
	URL  string
	Port int
	dir  string
	cmd  *exec.Cmd
	done chan error // the process's exit
}

// StartBouncer starts a PgBouncer in transaction mode on a free loopback
// port in front of the server upstream names (a postgres:// URL whose user
// the server lets in without a password, as Start's servers do), and waits
// until it accepts connections. It authenticates no one (auth_type=trust,
// for the upstream URL's user only): it is for tests and benchmarks.
func StartBouncer(ctx context.Context, upstream string, opts BouncerOptions) (*Bouncer, error) {
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		if bin = "/usr/sbin/pgbouncer"; !isExec(bin) {
			return nil, ErrNoPgBouncer
		}
	}
	u, err := url.Parse(upstream)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return nil, errors.New("pgserver: pgbouncer: upstream must be a postgres:// URL")
	}
	if _, ok := u.User.Password(); ok {
		return nil, errors.New("pgserver: pgbouncer: upstream URL with a password is not supported (use a trust server, such as Start's)")
	}
	user := u.User.Username()
	if user == "" {
		user = "postgres"
	}
	host, port := u.Hostname(), u.Port()
	if h := u.Query().Get("host"); h != "" {
		host = h
	}
	if host == "" {
		return nil, errors.New("pgserver: pgbouncer: upstream URL names no host")
	}
	if port == "" {
		port = "5432"
	}
	if opts.PoolSize == 0 {
		opts.PoolSize = 2
	}
	cred, err := serverUser()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(baseDir(cred), "keybroker-pgbouncer-")
	if err != nil {
		return nil, fmt.Errorf("pgserver: %w", err)
	}
	b := &Bouncer{dir: dir, done: make(chan error, 1)}
	fail := func(err error) (*Bouncer, error) {
		os.RemoveAll(dir)
		return nil, err
	}
	if b.Port, err = freePort(); err != nil {
		return fail(err)
	}
	ini := fmt.Sprintf(`[databases]
* = host=%s port=%s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = transaction
default_pool_size = %d
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
`, host, port, b.Port, filepath.Join(dir, "users.txt"), opts.PoolSize)
	if strings.ContainsAny(host+user, "\n\"' ") {
		return fail(errors.New("pgserver: pgbouncer: upstream host or user has characters a pgbouncer.ini cannot hold"))
	}
	for name, text := range map[string]string{"pgbouncer.ini": ini, "users.txt": fmt.Sprintf("%q \"\"\n", user)} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o600); err != nil {
			return fail(fmt.Errorf("pgserver: %w", err))
		}
	}
	if cred != nil {
		for _, p := range []string{dir, filepath.Join(dir, "pgbouncer.ini"), filepath.Join(dir, "users.txt")} {
			if err := os.Chown(p, int(cred.Uid), int(cred.Gid)); err != nil {
				return fail(fmt.Errorf("pgserver: %w", err))
			}
		}
	}
	logf, err := os.Create(filepath.Join(dir, "pgbouncer.log"))
	if err != nil {
		return fail(fmt.Errorf("pgserver: %w", err))
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		logf.Close()
		return fail(fmt.Errorf("pgserver: %w", err))
	}
	b.cmd = exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
	b.cmd.Dir = dir
	b.cmd.Stdout, b.cmd.Stderr = pw, pw
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: cred}
	err = b.cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		logf.Close()
		return fail(fmt.Errorf("pgserver: start pgbouncer: %w", err))
	}
	go func() { b.done <- b.cmd.Wait() }()
	// pgbouncer logs "process up" once it listens; the log goes to
	// pgbouncer.log for as long as it runs.
	up := make(chan struct{})
	lines := make(chan string, 1) // the last line before "process up"
	go func() {
		defer logf.Close()
		defer pr.Close()
		sc := bufio.NewScanner(pr)
		waiting := true
		for sc.Scan() {
			fmt.Fprintln(logf, sc.Text())
			switch {
			case waiting && strings.Contains(sc.Text(), "process up"):
				close(up)
				waiting = false
			case waiting:
				select {
				case <-lines:
				default:
				}
				lines <- sc.Text()
			}
		}
		close(lines)
	}()
	select {
	case <-up:
	case err := <-b.done:
		b.done <- err
		var last string
		for l := range lines {
			last = l
		}
		return fail(fmt.Errorf("pgserver: pgbouncer exited before listening: %v: %s", err, last))
	case <-ctx.Done():
		b.Stop()
		return nil, ctx.Err()
	}
	u.Host = fmt.Sprintf("127.0.0.1:%d", b.Port)
	q := u.Query()
	q.Del("host")
	q.Del("port")
	u.RawQuery = q.Encode()
	b.URL = u.String()
	return b, nil
}

// Stop shuts the bouncer down at once (SIGTERM: its clients are cut off)
// and removes its directory.
func (b *Bouncer) Stop() error {
	var err error
	if b.cmd.Process.Signal(syscall.SIGTERM) == nil {
		select {
		case <-b.done:
		case <-time.After(30 * time.Second):
			b.cmd.Process.Kill()
			err = errors.New("pgserver: pgbouncer did not stop on SIGTERM: killed")
		}
	}
	if e := os.RemoveAll(b.dir); e != nil && err == nil {
		err = fmt.Errorf("pgserver: %w", e)
	}
	return err
}
