//go:build linux

package server

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/pgtest"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider/local"
)

// envKillChild names the database the child process of
// TestAccessLogSurvivesKill serves.
const envKillChild = "KEYBROKER_SERVER_KILL_CHILD_DB"

// TestAccessLogSurvivesKill: a server process (this test binary, re-run
// as a child) is killed with SIGKILL while 32 clients send gets and seals;
// every request that got its answer before the kill has its access_log
// row (group commit answers only after the row's statement committed).
func TestAccessLogSurvivesKill(t *testing.T) {
	if db := os.Getenv(envKillChild); db != "" {
		serveChild(t, db)
		return
	}
	ctx := context.Background()
	dbURL := pgtest.NewDatabase(t)
	pool := pgtest.PoolFor(t, dbURL)
	if err := pgstore.Migrate(ctx, pool, ""); err != nil {
		t.Fatal(err)
	}
	tokens, err := NewTokens(pool, "")
	if err != nil {
		t.Fatal(err)
	}
	tok, _, err := tokens.Create(ctx, TokenSpec{Name: "kill", Ops: []Op{OpRead, OpSeal}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(os.Args[0], "-test.run=^TestAccessLogSurvivesKill$", "-test.count=1")
	cmd.Env = append(os.Environ(), envKillChild+"="+dbURL)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	t.Cleanup(func() {
		if !killed {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	sc := bufio.NewScanner(out)
	var base string
	for sc.Scan() {
		if a, ok := strings.CutPrefix(sc.Text(), "listening "); ok {
			base = "http://" + a
			break
		}
	}
	if base == "" {
		t.Fatal("child did not start serving")
	}
	go func() {
		for sc.Scan() { // drain the child's test output
		}
	}()

	c := &tclient{base: base, c: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 30 * time.Second}}
	const clients, killAfter = 32, 600
	var (
		answered atomic.Int64
		mu       sync.Mutex
		rows     []string // names of the answered requests' rows
		failed   []string // answers other than the expected one (before the kill)
		kill     = make(chan struct{})
		wg       sync.WaitGroup
	)
	for g := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				var (
					code, want int
					raw        []byte
					err        error
					name       string
				)
				if i%2 == 0 {
					name = fmt.Sprintf("missing-%d-%d", g, i)
					want = 404
					code, raw, err = c.do("GET", "/v1/projects/kill/secrets/"+url.PathEscape(name), tok, nil)
				} else {
					col := fmt.Sprintf("c_%d_%d", g, i)
					name, want = "public.t."+col, 200
					code, raw, err = c.do("POST", "/v1/projects/kill/seal", tok, map[string]any{"table": "public.t", "column": col, "row": []string{"1"}, "value": []byte("v")})
				}
				if err != nil {
					return // the server is gone
				}
				mu.Lock()
				if code == want {
					rows = append(rows, name)
				} else {
					failed = append(failed, fmt.Sprintf("%d %s", code, raw))
				}
				mu.Unlock()
				if answered.Add(1) == killAfter {
					close(kill)
				}
			}
		}()
	}
	stopped := make(chan struct{})
	go func() { wg.Wait(); close(stopped) }()
	select {
	case <-kill:
	case <-stopped:
		t.Fatalf("the clients stopped after %d answers, before the kill", answered.Load())
	}
	if err := cmd.Process.Kill(); err != nil { // SIGKILL, with requests in flight
		t.Fatal(err)
	}
	killed = true
	cmd.Wait()
	wg.Wait()
	if len(failed) > 0 {
		t.Fatalf("%d unexpected answers, first: %s", len(failed), failed[0])
	}
	logged := map[string]int{}
	q, err := pool.Query(ctx, `SELECT names[1] FROM keybroker.access_log WHERE project_id = 'kill'`)
	if err != nil {
		t.Fatal(err)
	}
	total := 0
	for q.Next() {
		var n string
		if err := q.Scan(&n); err != nil {
			t.Fatal(err)
		}
		logged[n]++
		total++
	}
	if err := q.Err(); err != nil {
		t.Fatal(err)
	}
	missing := 0
	for _, n := range rows {
		if logged[n] != 1 {
			missing++
			if missing <= 5 {
				t.Errorf("answered request %s has %d rows, want 1", n, logged[n])
			}
		}
	}
	if missing > 0 {
		t.Fatalf("%d of %d answered requests without their row", missing, len(rows))
	}
	t.Logf("%d answered requests before SIGKILL, all with their row; %d rows in all (rows of requests unanswered at the kill are allowed)", len(rows), total)
}

// serveChild serves db's store on a loopback port until killed.
func serveChild(t *testing.T, db string) {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	kek, err := local.Generate("server-kill-test")
	if err != nil {
		t.Fatal(err)
	}
	st, err := pgstore.New(ctx, pool, pgstore.Config{KEK: kek, Actor: "server-kill-test"})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(Config{Store: st, Pool: pool, Ready: http.NotFoundHandler(), Rate: 1e9, Burst: 1e9})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := Listen(Options{Addr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	t.Fatal(Serve(ctx, ln, srv, Options{})) // until SIGKILL
}
