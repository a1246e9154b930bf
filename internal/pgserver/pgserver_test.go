package pgserver_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/internal/pgserver"
)

// A server in a given directory on a free port (as scripts/test.sh starts
// it), a bouncer in front of it, and StopDir from "another process": each
// is reachable while it runs and leaves nothing behind.
func TestServerBouncerStopDir(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "pg")
	s, err := pgserver.Start(ctx, pgserver.Options{Dir: dir, TCP: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if s.Dir != dir || s.Port == 0 {
		t.Fatalf("dir %q port %d", s.Dir, s.Port)
	}
	b, err := pgserver.StartBouncer(ctx, s.URL, pgserver.BouncerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	// A pooler announces a backend key of its own, not the backend's PID.
	for _, c := range []struct {
		url    string
		pooled bool
	}{{s.URL, false}, {b.URL, true}} {
		conn, err := pgx.Connect(ctx, c.url)
		if err != nil {
			t.Fatal(err)
		}
		var pid uint32
		err = conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid)
		announced := conn.PgConn().PID()
		conn.Close(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if (pid != announced) != c.pooled {
			t.Errorf("%s: backend %d, announced %d; want them to differ: %v", c.url, pid, announced, c.pooled)
		}
	}
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	if conn, err := pgx.Connect(ctx, b.URL); err == nil {
		conn.Close(ctx)
		t.Fatal("bouncer still accepts connections after Stop")
	}
	if err := pgserver.StopDir(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("server directory left after StopDir: %v", err)
	}
	if conn, err := pgx.Connect(ctx, s.URL); err == nil {
		conn.Close(ctx)
		t.Fatal("server still accepts connections after StopDir")
	}
}

// A standby of a primary is in recovery, refuses writes, and replays what
// the primary commits (polled: replay is asynchronous).
func TestStandby(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p, err := pgserver.Start(ctx, pgserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	s, err := pgserver.StartStandby(ctx, p, "replica1", pgserver.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	pc, err := pgx.Connect(ctx, p.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close(ctx)
	sc, err := pgx.Connect(ctx, s.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close(ctx)
	var recovering bool
	if err := sc.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&recovering); err != nil || !recovering {
		t.Fatalf("standby in recovery: %v, %v", recovering, err)
	}
	if _, err := sc.Exec(ctx, "CREATE TABLE t (x int)"); err == nil {
		t.Fatal("standby accepted a write")
	}
	if _, err := pc.Exec(ctx, "CREATE TABLE t (x int); INSERT INTO t VALUES (42)"); err != nil {
		t.Fatal(err)
	}
	var name string
	if err := pc.QueryRow(ctx, "SELECT application_name FROM pg_stat_replication").Scan(&name); err != nil || name != "replica1" {
		t.Fatalf("pg_stat_replication: %q, %v", name, err)
	}
	for {
		var x int
		err := sc.QueryRow(ctx, "SELECT x FROM t").Scan(&x)
		if err == nil && x == 42 {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the standby never replayed the primary's row: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
