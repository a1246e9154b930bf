package pgtest_test

import (
	"context"
	"net/url"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// NewDatabase gives each test its own database and drops it afterwards;
// NewRole's role is not a superuser and is dropped too.
func TestDatabaseAndRoleLifecycle(t *testing.T) {
	ctx := context.Background()
	var dbName, role string
	t.Run("inner", func(t *testing.T) {
		u := pgtest.NewDatabase(t)
		other := pgtest.NewDatabase(t)
		if u == other {
			t.Fatal("two tests got the same database")
		}
		p, _ := url.Parse(u)
		dbName = strings.TrimPrefix(p.Path, "/")
		var roleURL string
		role, roleURL = pgtest.NewRole(t, u)
		pool := pgtest.PoolFor(t, roleURL)
		var super bool
		if err := pool.QueryRow(ctx, `SELECT rolsuper FROM pg_roles WHERE rolname = current_user`).Scan(&super); err != nil || super {
			t.Fatalf("role is superuser (%v, %v)", super, err)
		}
	})
	conn, err := pgx.Connect(ctx, pgtest.AdminURL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_database WHERE datname = $1) + (SELECT count(*) FROM pg_roles WHERE rolname = $2)`, dbName, role).Scan(&n); err != nil || n != 0 {
		t.Fatalf("database or role left behind (%d, %v)", n, err)
	}
}
