package server

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// serving runs e's Server through Serve (the timeouts and shutdown the
// CLI uses) on a loopback port and returns its base URL.
func (e *env) serving(opts Options) string {
	e.t.Helper()
	return "http://" + serveOn(e.t, e.srv, opts)
}

// serveOn runs Serve with h and opts on a loopback port until t ends
// (checking that Serve then returns nil) and returns the listener's
// address.
func serveOn(t testing.TB, h http.Handler, opts Options) string {
	t.Helper()
	opts.Addr = "127.0.0.1:0"
	ln, err := Listen(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- Serve(ctx, ln, h, opts) }()
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ln.Addr().String()
}

// settle waits, bounded, for the goroutine count to come back to at most
// want: connection goroutines end asynchronously after their sockets close.
func settle(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for runtime.NumGoroutine() > want {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, want at most %d:\n%s", runtime.NumGoroutine(), want, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// 10,000 abusive requests and 100 slow clients: every answer is the
// expected 4xx, nothing is written, goroutines and heap come back to their
// baseline, and the server keeps serving a good client throughout.
func TestAbuse(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxBody = 4 << 10; c.Rate = 1e6; c.Burst = 1e6; c.Logger = nil })
	base := e.serving(Options{ReadHeaderTimeout: 300 * time.Millisecond, ReadTimeout: 5 * time.Second, IdleTimeout: 5 * time.Second})
	ctx := context.Background()
	good := e.token([]string{"p"}, OpRead, OpWrite)
	revoked, info, err := e.tokens.Create(ctx, TokenSpec{Name: "r", Ops: AllOps, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.tokens.Revoke(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	// A connection per request: abusive requests get their connections
	// closed, and a pooled connection the server closed meanwhile would fail
	// the next request for the client's reasons, not the server's.
	tr := &http.Transport{DisableKeepAlives: true}
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	send := func(method, path, token, body string) (int, error) {
		req, err := http.NewRequest(method, base+path, strings.NewReader(body))
		if err != nil {
			return 0, err
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err != nil {
			// The server answers an oversized body before reading it all
			// and closes the connection, which the client, still sending,
			// sees as an error of its own.
			if len(body) > 4<<10 && (errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed)) {
				return refused, nil // answered and closed while the client was still sending
			}
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	if code, err := send("GET", "/v1/projects/p/secrets/s", good, ""); err != nil || code != 404 {
		t.Fatalf("warm-up: %d %v", code, err)
	}
	tr.CloseIdleConnections()
	settle(t, runtime.NumGoroutine()) // let the warm-up's connection goroutines end
	goroutines, heap := runtime.NumGoroutine(), heapInUse()

	huge := `{"value":"` + strings.Repeat("A", 64<<10) + `"}`
	cases := []struct {
		method, path, token, body string
		want                      int
	}{
		{"GET", "/v1/projects/p/secrets/s", "kbt_" + strings.Repeat("Q", 64), "", 401}, // unknown id
		{"GET", "/v1/projects/p/secrets/s", revoked, "", 401},
		{"GET", "/v1/projects/p/secrets/s", "not a token", "", 401},
		{"PUT", "/v1/projects/p/secrets/s", good, huge, 413},
		{"PUT", "/v1/projects/p/secrets/s", good, `{"value":`, 400},
		{"POST", "/v1/projects/p/get-many", good, `{"names":[1,2]}`, 400},
		{"PUT", "/v1/projects/elsewhere/secrets/s", good, `{"value":"AA=="}`, 403},
		{"PUT", "/v1/projects/p/secrets/s", revoked, huge, 401},
	}
	const total = 10000
	var next, failures atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= total {
					return
				}
				c := cases[i%int64(len(cases))]
				code, err := send(c.method, c.path, c.token, c.body)
				if err != nil || (code != c.want && !(code == refused && len(c.body) > 4<<10)) {
					if failures.Add(1) <= 5 {
						t.Errorf("%s %s %.20q: %d %v, want %d", c.method, c.path, c.body, code, err, c.want)
					}
				}
			}
		}()
	}

	// Meanwhile, slow clients: each sends half a request line's headers and
	// stops. The header timeout closes them; a good client is served.
	var slow []net.Conn
	for i := 0; i < 100; i++ {
		c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "PUT /v1/projects/p/secrets/s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n", good)
		slow = append(slow, c)
	}
	if code, err := send("PUT", "/v1/projects/p/secrets/ok", good, `{"value":"b2s="}`); err != nil || code != 204 {
		t.Fatalf("good client while slow clients hang: %d %v", code, err)
	}
	for i, c := range slow {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		// Closed by the server: EOF, or a 408 it managed to write first.
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusRequestTimeout {
				t.Fatalf("slow client %d: %d", i, resp.StatusCode)
			}
		} else if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
			t.Fatalf("slow client %d still held open: %v", i, err)
		}
		c.Close()
	}
	wg.Wait()
	if failures.Load() > 0 {
		t.Fatalf("%d of %d abusive requests got an unexpected answer", failures.Load(), total)
	}

	// Nothing was written but the good client's secret.
	if _, err := e.store.Get(ctx, "p", "s"); err == nil {
		t.Fatal("an abusive request stored a secret")
	}
	if code, _ := send("GET", "/v1/projects/p/secrets/ok", good, ""); code != 200 {
		t.Fatalf("server no longer serving: %d", code)
	}
	tr.CloseIdleConnections()
	settle(t, goroutines+2)
	if h := heapInUse(); h > heap+32<<20 {
		t.Fatalf("heap in use %d MiB after the abuse, %d MiB before", h>>20, heap>>20)
	}
}

// refused stands for a connection the server closed while the client was
// still sending an oversized body (after answering it, or before).
const refused = -1

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// 64 concurrent clients, a fixed number of requests each, every response
// checked; then every request is in the access log, each with outcome ok.
func TestConcurrentClients(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.Rate = 1e6; c.Burst = 1e6; c.Logger = nil })
	base := e.serving(Options{})
	tok := e.token(nil, OpRead, OpWrite)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	const clients, rounds = 64, 8
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			project := fmt.Sprintf("proj-%d", c%8)
			do := func(method, path, body string, want int) ([]byte, error) {
				req, _ := http.NewRequest(method, base+path, strings.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+tok)
				resp, err := client.Do(req)
				if err != nil {
					return nil, err
				}
				defer resp.Body.Close()
				raw, err := io.ReadAll(resp.Body)
				if err == nil && resp.StatusCode != want {
					err = fmt.Errorf("%s %s: %d %s, want %d", method, path, resp.StatusCode, raw, want)
				}
				return raw, err
			}
			for r := 0; r < rounds; r++ {
				name := fmt.Sprintf("c%d-r%d", c, r)
				value := fmt.Sprintf("value of %s", name)
				path := "/v1/projects/" + project + "/secrets/" + name
				if _, err := do("PUT", path, `{"value":"`+b64(value)+`"}`, 204); err != nil {
					errs <- err
					return
				}
				raw, err := do("GET", path, "", 200)
				var v valueResponse
				if err == nil && (json.Unmarshal(raw, &v) != nil || string(v.Value) != value) {
					err = fmt.Errorf("get %s: %s", name, raw)
				}
				if err != nil {
					errs <- err
					return
				}
				raw, err = do("POST", "/v1/projects/"+project+"/get-many", `{"names":["`+name+`","absent"]}`, 200)
				var m getManyResponse
				if err == nil && (json.Unmarshal(raw, &m) != nil || len(m.Values) != 1 || string(m.Values[name]) != value) {
					err = fmt.Errorf("get-many %s: %s", name, raw)
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
	var n, notOK int
	if err := e.tokens.pool.QueryRow(context.Background(), `SELECT count(*), count(*) FILTER (WHERE outcome <> 'ok') FROM keybroker.access_log`).Scan(&n, &notOK); err != nil {
		t.Fatal(err)
	}
	if n != clients*rounds*3 || notOK != 0 {
		t.Fatalf("access log: %d rows (%d not ok), want %d ok", n, notOK, clients*rounds*3)
	}
}

// FuzzDecode: any body gives a decoded request or a 400/413, never a panic.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{`{"value":"AA=="}`, `{"names":["a","b"]}`, `{`, `[]`, `{"value":null}`, `{"value":"AA=="} x`, "\x00", `{"names":[1]}`} {
		f.Add([]byte(s))
	}
	s := &Server{maxBody: 1 << 10}
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, v := range []any{&valueBody{}, &getManyBody{}} {
			rec := httptest.NewRecorder()
			r := httptest.NewRequest("PUT", "/", strings.NewReader(string(body)))
			ok := s.decode(rec, r, v)
			if ok && (rec.Code != 200 || rec.Body.Len() != 0) {
				t.Fatalf("decoded, but answered %d", rec.Code)
			}
			if !ok {
				if rec.Code != 400 && rec.Code != 413 {
					t.Fatalf("refused with %d", rec.Code)
				}
				var eb errorBody
				if err := json.Unmarshal(rec.Body.Bytes(), &eb); err != nil || eb.Error == "" || eb.Message == "" {
					t.Fatalf("error body %q", rec.Body.Bytes())
				}
			}
		}
	})
}
