package server

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// The access log's group commit (logBatcher): every request's row lands
// exactly once with its own fields, rows of concurrent requests share
// statements, a refused batch answers every request in it 503 with no
// value, one bad row refuses only its own request, and Close drains the
// queue.

// tclient sends requests from many goroutines (env.do calls t.Fatal).
type tclient struct {
	base string
	c    *http.Client
}

func (e *env) client() *tclient {
	return &tclient{base: e.http.URL, c: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128}}}
}

func (c *tclient) do(method, path, token string, body any) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := c.c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	return resp.StatusCode, raw, err
}

// createToken returns a token and its id (32 hex digits).
func (e *env) createToken(projects []string, ops ...Op) (string, string) {
	e.t.Helper()
	tok, info, err := e.tokens.Create(context.Background(), TokenSpec{Name: "test", Projects: projects, Ops: ops, TTL: time.Hour})
	if err != nil {
		e.t.Fatal(err)
	}
	return tok, info.ID
}

// logKey is an access_log row as a comparable string.
func logKey(tokenID, project string, names []string, op, outcome string) string {
	if names == nil {
		names = []string{}
	}
	raw, _ := json.Marshal(names)
	return strings.Join([]string{tokenID, project, string(raw), op, outcome}, " | ")
}

// logRows returns every access_log row as logKey strings, sorted.
func (e *env) logRows() []string {
	e.t.Helper()
	rows, err := e.tokens.pool.Query(context.Background(), `SELECT replace(token_id::text, '-', ''), project_id, names, operation, outcome FROM keybroker.access_log`)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for rows.Next() {
		var (
			tok, project, op, outcome string
			names                     []string
		)
		if err := rows.Scan(&tok, &project, &names, &op, &outcome); err != nil {
			e.t.Fatal(err)
		}
		out = append(out, logKey(tok, project, names, op, outcome))
	}
	if err := rows.Err(); err != nil {
		e.t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// holdLog makes every INSERT into access_log wait (a SHARE lock, held by
// a transaction of the test) until release is called. The waiting
// statements hold up to logFlushers+1 connections, and the lock one: the
// env needs a pool with room for the requests besides (newEnvConns).
func (e *env) holdLog() (release func()) {
	e.t.Helper()
	ctx := context.Background()
	tx, err := e.tokens.pool.Begin(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `LOCK TABLE keybroker.access_log IN SHARE MODE`); err != nil {
		e.t.Fatal(err)
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			if err := tx.Commit(ctx); err != nil {
				e.t.Error(err)
			}
		})
	}
	e.t.Cleanup(release)
	return release
}

// countQueued returns a channel that gets a value for each row queued.
func (e *env) countQueued() <-chan struct{} {
	ch := make(chan struct{}, 4096)
	f := func() { ch <- struct{}{} }
	e.srv.audit.log.queued.Store(&f)
	e.t.Cleanup(func() { e.srv.audit.log.queued.Store(nil) })
	return ch
}

func waitQueued(t *testing.T, ch <-chan struct{}, n int) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for i := range n {
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("%d of %d rows queued", i, n)
		}
	}
}

// TestAccessLogConcurrent: 64 clients × 12 requests of every kind that
// record a row (get, a missing get, get-many, seal, open, a refusal):
// exactly one row per request, with its token, project, names, operation
// and outcome.
func TestAccessLogConcurrent(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.Rate = 1e9; c.Burst = 1e9 })
	ctx := context.Background()
	tokA, idA := e.createToken([]string{"ga"}, OpRead, OpSeal, OpOpen)
	tokB, idB := e.createToken([]string{"elsewhere"}, OpRead)
	if err := e.store.Put(ctx, "ga", "s", []byte("value-s")); err != nil {
		t.Fatal(err)
	}
	c := e.client()
	ref := map[string]any{"table": "public.secrets", "column": "value_encrypted", "row": []string{"1"}}
	sealed := c.seal(t, "ga", tokA, ref, []byte("sealed-v"))
	want := []string{logKey(idA, "ga", []string{"public.secrets.value_encrypted"}, "seal", "ok")}
	before := e.srv.audit.log.statements.Load()

	const clients, rounds = 64, 12
	var (
		mu   sync.Mutex
		errs []error
	)
	var wg sync.WaitGroup
	for g := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []string
			fail := func(err error) {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
			for r := range rounds {
				var (
					code int
					raw  []byte
					err  error
					ok   bool
				)
				switch (g + r) % 6 {
				case 0:
					code, raw, err = c.do("GET", "/v1/projects/ga/secrets/s", tokA, nil)
					var v valueResponse
					ok = code == 200 && json.Unmarshal(raw, &v) == nil && string(v.Value) == "value-s"
					mine = append(mine, logKey(idA, "ga", []string{"s"}, "get", "ok"))
				case 1:
					name := fmt.Sprintf("missing %d/%d", g, r)
					code, raw, err = c.do("GET", "/v1/projects/ga/secrets/"+url.PathEscape(name), tokA, nil)
					ok = code == 404
					mine = append(mine, logKey(idA, "ga", []string{name}, "get", "not_found"))
				case 2:
					names := []string{"s", fmt.Sprintf("a,b %d", g), fmt.Sprintf(`{"q"} %d`, r)}
					code, raw, err = c.do("POST", "/v1/projects/ga/get-many", tokA, map[string]any{"names": names})
					var m getManyResponse
					ok = code == 200 && json.Unmarshal(raw, &m) == nil && len(m.Values) == 1 && string(m.Values["s"]) == "value-s"
					mine = append(mine, logKey(idA, "ga", names, "getmany", "ok"))
				case 3:
					col := fmt.Sprintf("c_%d_%d", g, r)
					code, raw, err = c.do("POST", "/v1/projects/ga/seal", tokA, map[string]any{"table": "public.t", "column": col, "row": []string{"1"}, "value": []byte("v")})
					ok = code == 200
					mine = append(mine, logKey(idA, "ga", []string{"public.t." + col}, "seal", "ok"))
				case 4:
					code, raw, err = c.do("POST", "/v1/projects/ga/open", tokA, withRef(ref, "sealed", sealed))
					var v valueResponse
					ok = code == 200 && json.Unmarshal(raw, &v) == nil && string(v.Value) == "sealed-v"
					mine = append(mine, logKey(idA, "ga", []string{"public.secrets.value_encrypted"}, "open", "ok"))
				case 5:
					code, raw, err = c.do("GET", "/v1/projects/ga/secrets/s", tokB, nil)
					ok = code == 403
					mine = append(mine, logKey(idB, "ga", nil, "get", "forbidden"))
				}
				if err == nil && !ok {
					err = fmt.Errorf("client %d round %d: %d %s", g, r, code, raw)
				}
				if err != nil {
					fail(err)
					return
				}
			}
			mu.Lock()
			want = append(want, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatal(errs[0])
	}
	slices.Sort(want)
	got := e.logRows()
	if !slices.Equal(got, want) {
		t.Errorf("access log: %d rows, want %d", len(got), len(want))
		for _, k := range got {
			if _, found := slices.BinarySearch(want, k); !found {
				t.Errorf("unexpected row %s", k)
			}
		}
		for _, k := range want {
			if _, found := slices.BinarySearch(got, k); !found {
				t.Errorf("missing row %s", k)
			}
		}
	}
	st := e.srv.audit.log.statements.Load() - before
	t.Logf("%d requests' rows in %d statements", clients*rounds, st)
	if st > clients*rounds {
		t.Fatalf("%d statements for %d rows", st, clients*rounds)
	}
}

// TestAccessLogBatchNames: rows queued while a batch is held form one
// statement, and each row's names come back exactly, whatever they hold
// (commas, quotes, braces, backslashes, NULL, unicode, none at all).
func TestAccessLogBatchNames(t *testing.T) {
	e := newEnvConns(t, 16, func(c *Config) { c.Rate = 1e9; c.Burst = 1e9 })
	tok, id := e.createToken(nil, OpRead)
	weird := []string{`a,b`, `"quoted"`, `{braces}`, `{"json": [1, 2]}`, `back\slash`, `NULL`, `null`, ``, ` lead`, `trail `,
		`it's`, `日本語 🔑`, `e\u0301`, "tab\tnew\nline", `{}`, `""`, `,`, `\`}
	const n = 40
	queued := e.countQueued()
	release := e.holdLog()
	before := e.srv.audit.log.statements.Load()
	c := e.client()
	type result struct {
		key string
		err error
	}
	results := make(chan result, n)
	for i := range n {
		go func() {
			// Rows of 0 to len(weird)-1 names, the same names in other
			// positions from row to row; every fifth a list (no names).
			if i%5 == 4 {
				code, raw, err := c.do("GET", "/v1/projects/names/secrets", tok, nil)
				if err == nil && code != 200 {
					err = fmt.Errorf("list: %d %s", code, raw)
				}
				results <- result{logKey(id, "names", nil, "list", "ok"), err}
				return
			}
			var names []string
			for k := range i % len(weird) {
				names = append(names, weird[(i+k)%len(weird)])
			}
			if names == nil {
				names = []string{}
			}
			code, raw, err := c.do("POST", "/v1/projects/names/get-many", tok, map[string]any{"names": names})
			outcome := map[int]string{200: "ok", 400: "invalid"}[code]
			if err == nil && outcome == "" {
				err = fmt.Errorf("get-many: %d %s", code, raw)
			}
			results <- result{logKey(id, "names", names, "getmany", outcome), err}
		}()
	}
	waitQueued(t, queued, n)
	release()
	var want []string
	for range n {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		want = append(want, r.key)
	}
	slices.Sort(want)
	if got := e.logRows(); !slices.Equal(got, want) {
		t.Fatalf("access log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// The first row was written by its own request and waited on the
	// lock; each flusher took what was queued when it woke (at least one
	// row) and waited too; every other row was queued behind them and went
	// in one statement after.
	if st := e.srv.audit.log.statements.Load() - before; st > logFlushers+2 {
		t.Fatalf("%d rows in %d statements, want at most %d", n, st, logFlushers+2)
	}
}

// unavailable is the body of every request refused for want of its row.
const unavailable = `{"error":"unavailable","message":"access log unavailable"}` + "\n"

// TestAccessLogRefused: while PostgreSQL refuses access_log's inserts
// (a trigger refusing the statement, a CHECK constraint refusing the
// row), every get, get-many, seal and open of 64 concurrent clients gets
// the same 503 and no value; once the refusal ends, they are served.
func TestAccessLogRefused(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.Rate = 1e9; c.Burst = 1e9 })
	ctx := context.Background()
	tok, _ := e.createToken([]string{"rf"}, OpRead, OpWrite, OpSeal, OpOpen)
	if err := e.store.Put(ctx, "rf", "s", []byte("value-s")); err != nil {
		t.Fatal(err)
	}
	c := e.client()
	ref := map[string]any{"table": "public.secrets", "column": "v", "row": []string{"1"}}
	sealed := c.seal(t, "rf", tok, ref, []byte("sealed-v"))
	requests := []struct {
		method, path string
		body         any
	}{
		{"GET", "/v1/projects/rf/secrets/s", nil},
		{"POST", "/v1/projects/rf/get-many", map[string]any{"names": []string{"s"}}},
		{"POST", "/v1/projects/rf/seal", withRef(ref, "value", []byte("x"))},
		{"POST", "/v1/projects/rf/open", withRef(ref, "sealed", sealed)},
		{"PUT", "/v1/projects/rf/secrets/s", map[string]any{"value": []byte("overwritten")}},
	}
	for _, refusal := range []struct{ name, on, off string }{
		{"trigger", `CREATE FUNCTION keybroker.refuse_log() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'refused by the test'; END$$;
CREATE TRIGGER refuse_log BEFORE INSERT ON keybroker.access_log FOR EACH STATEMENT EXECUTE FUNCTION keybroker.refuse_log()`,
			`DROP TRIGGER refuse_log ON keybroker.access_log; DROP FUNCTION keybroker.refuse_log()`},
		{"check", `ALTER TABLE keybroker.access_log ADD CONSTRAINT refuse_log CHECK (false) NOT VALID`,
			`ALTER TABLE keybroker.access_log DROP CONSTRAINT refuse_log`},
	} {
		t.Run(refusal.name, func(t *testing.T) {
			rows := len(e.logRows())
			if _, err := e.tokens.pool.Exec(ctx, refusal.on); err != nil {
				t.Fatal(err)
			}
			const clients, rounds = 64, 5
			errs := make(chan error, clients)
			var wg sync.WaitGroup
			for g := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for r := range rounds {
						rq := requests[(g+r)%len(requests)]
						code, raw, err := c.do(rq.method, rq.path, tok, rq.body)
						if err == nil && (code != 503 || string(raw) != unavailable) {
							err = fmt.Errorf("%s %s: %d %s", rq.method, rq.path, code, raw)
						}
						if err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			if _, err := e.tokens.pool.Exec(ctx, refusal.off); err != nil {
				t.Fatal(err)
			}
			if n := len(e.logRows()); n != rows {
				t.Errorf("%d rows added while refused", n-rows)
			}
			// The put's transaction was refused with its row.
			if v, err := e.store.Get(ctx, "rf", "s"); err != nil || string(v) != "value-s" {
				t.Fatalf("secret after refused puts: %q %v", v, err)
			}
			code, raw, err := c.do("GET", "/v1/projects/rf/secrets/s", tok, nil)
			var v valueResponse
			if err != nil || code != 200 || json.Unmarshal(raw, &v) != nil || string(v.Value) != "value-s" {
				t.Fatalf("get after the refusal: %d %s %v", code, raw, err)
			}
		})
	}
}

// TestAccessLogRowRefusedAlone: a row PostgreSQL refuses (a CHECK on one
// project; a name with NUL, which text cannot hold) fails only its own
// request, not the others of its batch.
func TestAccessLogRowRefusedAlone(t *testing.T) {
	e := newEnvConns(t, 16, func(c *Config) { c.Rate = 1e9; c.Burst = 1e9 })
	ctx := context.Background()
	tok, id := e.createToken(nil, OpRead)
	for _, p := range []string{"fine", "refused"} {
		if err := e.store.Put(ctx, p, "s", []byte("value-"+p)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.tokens.pool.Exec(ctx, `ALTER TABLE keybroker.access_log ADD CONSTRAINT refuse_project CHECK (project_id <> 'refused') NOT VALID`); err != nil {
		t.Fatal(err)
	}
	const n = 32
	queued := e.countQueued()
	release := e.holdLog()
	c := e.client()
	type result struct {
		key string // "" when no row is wanted
		err error
	}
	results := make(chan result, n)
	for i := range n {
		go func() {
			switch {
			case i == 0:
				code, raw, err := c.do("POST", "/v1/projects/fine/get-many", tok, map[string]any{"names": []string{"s", "nul\x00name"}})
				if err == nil && (code != 503 || string(raw) != unavailable) {
					err = fmt.Errorf("NUL name: %d %s", code, raw)
				}
				results <- result{"", err}
			case i%2 == 1:
				code, raw, err := c.do("GET", "/v1/projects/refused/secrets/s", tok, nil)
				if err == nil && (code != 503 || string(raw) != unavailable) {
					err = fmt.Errorf("refused project: %d %s", code, raw)
				}
				results <- result{"", err}
			default:
				code, raw, err := c.do("GET", "/v1/projects/fine/secrets/s", tok, nil)
				var v valueResponse
				if err == nil && (code != 200 || json.Unmarshal(raw, &v) != nil || string(v.Value) != "value-fine") {
					err = fmt.Errorf("fine project: %d %s", code, raw)
				}
				results <- result{logKey(id, "fine", []string{"s"}, "get", "ok"), err}
			}
		}()
	}
	waitQueued(t, queued, n)
	release()
	var want []string
	for range n {
		r := <-results
		if r.err != nil {
			t.Error(r.err)
		}
		if r.key != "" {
			want = append(want, r.key)
		}
	}
	slices.Sort(want)
	if got := e.logRows(); !slices.Equal(got, want) {
		t.Fatalf("access log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestAccessLogWaitAndClose: a request whose context ends while its row
// waits gets errAuditFailed (and its row may land after: here it does);
// Close lets every queued row commit and answers its request, and after
// it a request that needs a row gets 503.
func TestAccessLogWaitAndClose(t *testing.T) {
	e := newEnvConns(t, 16, nil)
	tokStr, id := e.createToken([]string{"wc"}, OpRead)
	raw, err := hex.DecodeString(id)
	if err != nil {
		t.Fatal(err)
	}
	tok := &tokenRow{}
	copy(tok.id[:], raw)
	a := e.srv.audit
	queued := e.countQueued()
	release := e.holdLog()

	// With nothing in flight a row is written by its own goroutine; this
	// one waits on the lock, so the rows after it queue.
	first := make(chan error, 1)
	go func() { first <- a.record(context.Background(), tok, "wc", []string{"first"}, "get", outcomeOK) }()
	waitQueued(t, queued, 1)

	ctx, cancel := context.WithCancel(context.Background())
	gaveUp := make(chan error, 1)
	go func() { gaveUp <- a.record(ctx, tok, "wc", []string{"given up"}, "get", outcomeOK) }()
	waitQueued(t, queued, 1)
	cancel()
	if err := <-gaveUp; !errors.Is(err, errAuditFailed) || !errors.Is(err, context.Canceled) {
		t.Fatalf("record after its ctx ended: %v", err)
	}

	const n = 16
	done := make(chan error, n)
	for i := range n {
		go func() { done <- a.record(context.Background(), tok, "wc", []string{fmt.Sprint(i)}, "get", outcomeOK) }()
	}
	waitQueued(t, queued, n)
	a.log.shut() // as Close does, while the rows are still queued
	if err := a.record(context.Background(), tok, "wc", []string{"late"}, "get", outcomeOK); !errors.Is(err, errAuditFailed) || !errors.Is(err, errLogClosed) {
		t.Fatalf("record after close: %v", err)
	}
	if code, body := e.do("GET", "/v1/projects/wc/secrets/x", tokStr, nil); code != 503 || string(body) != unavailable {
		t.Fatalf("get after close: %d %s", code, body)
	}
	release()
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	for range n {
		if err := <-done; err != nil {
			t.Fatalf("a queued row at close: %v", err)
		}
	}
	if err := <-first; err != nil {
		t.Fatalf("the first row: %v", err)
	}
	want := []string{logKey(id, "wc", []string{"first"}, "get", "ok"), logKey(id, "wc", []string{"given up"}, "get", "ok")}
	for i := range n {
		want = append(want, logKey(id, "wc", []string{fmt.Sprint(i)}, "get", "ok"))
	}
	slices.Sort(want)
	if got := e.logRows(); !slices.Equal(got, want) {
		t.Fatalf("access log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// seal seals value for column ref of project with token and returns the
// sealed bytes, failing t on anything but 200.
func (c *tclient) seal(t *testing.T, project, token string, ref map[string]any, value []byte) []byte {
	t.Helper()
	code, raw, err := c.do("POST", "/v1/projects/"+project+"/seal", token, withRef(ref, "value", value))
	var sr sealResponse
	if err != nil || code != 200 || json.Unmarshal(raw, &sr) != nil {
		t.Fatalf("seal: %d %s %v", code, raw, err)
	}
	return sr.Sealed
}

// withRef is a request body naming column ref (table, column, row) with k
// set to v.
func withRef(ref map[string]any, k string, v any) map[string]any {
	m := map[string]any{k: v}
	for rk, rv := range ref {
		m[rk] = rv
	}
	return m
}
