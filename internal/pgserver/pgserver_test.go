package pgserver_test

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

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
