package server

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The loopback benchmarks: each sub-benchmark sends b.N requests of a 1 KiB
// value from conc concurrent clients and reports p50 and p99 latency (µs)
// and throughput; seal, open, get and echo also report CPU per request
// (cpu-µs/req: this process, clients included, and the PostgreSQL
// server's backends), and the audited ones the access-log statements per
// request and rows per statement (the group commit's batch size). The
// same run measures a plain HTTP echo of the same body (the floor: what
// HTTP and JSON cost), keybroker's put and get with and without the access
// log, and Vault Transit's encrypt and decrypt of the same bytes on a dev
// Vault on loopback (internal/vaultserver). Run:
//
//	go test -run '^$' -bench Loopback -benchtime 2000x ./server/
//
// docs/BENCHMARKS.md has the figures.

var concurrencies = []int{1, 8, 64}

// latency runs op b.N times from conc goroutines and reports percentiles.
func latency(b *testing.B, conc int, op func(i int) error) {
	lat := make([]time.Duration, b.N)
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= b.N {
					return
				}
				t0 := time.Now()
				if err := op(i); err != nil {
					failed.CompareAndSwap(nil, err)
					return
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
	slices.Sort(lat)
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
	b.ReportMetric(us(lat[len(lat)/2]), "p50-µs")
	b.ReportMetric(us(lat[len(lat)*99/100]), "p99-µs")
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
	b.ReportMetric(0, "ns/op")
}

type benchClient struct {
	base, token string
	c           *http.Client
}

func (bc *benchClient) do(method, path string, body []byte, want int) ([]byte, error) {
	req, err := http.NewRequest(method, bc.base+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	if bc.token != "" {
		req.Header.Set("Authorization", "Bearer "+bc.token)
	}
	resp, err := bc.c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != want {
		err = fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, raw)
	}
	return raw, err
}

func newBenchClient(base, token string) *benchClient {
	return &benchClient{base: base, token: token, c: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128}}}
}

// echoServer answers every request with its JSON body: HTTP and JSON on
// loopback, without keybroker.
func echoServer(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var v valueBody
		if err := json.NewDecoder(r.Body).Decode(&v); err != nil || v.Value == nil {
			http.Error(w, "bad", 400)
			return
		}
		writeJSON(w, valueResponse{Value: *v.Value})
	})}
	go hs.Serve(ln)
	b.Cleanup(func() { hs.Close() })
	return "http://" + ln.Addr().String()
}

func BenchmarkLoopback(b *testing.B) {
	value := make([]byte, 1024)
	rand.Read(value)
	body, _ := json.Marshal(map[string][]byte{"value": value})
	e := newEnv(b, func(c *Config) { c.Rate = 1e9; c.Burst = 1e9; c.Logger = nil })
	tok := e.token(nil, OpRead, OpWrite, OpSeal, OpOpen)
	audited := newBenchClient(e.serving(Options{}), tok)
	// The same Store and tokens, without the access log.
	quiet, err := New(Config{Store: e.store, Pool: e.tokens.pool, Ready: http.NotFoundHandler(), Rate: 1e9, Burst: 1e9})
	if err != nil {
		b.Fatal(err)
	}
	quiet.audit.off = true
	b.Cleanup(func() { quiet.Close() })
	e2 := &env{t: b, srv: quiet}
	unaudited := newBenchClient(e2.serving(Options{}), tok)
	echo := newBenchClient(echoServer(b), "")
	names := make([]string, 64)
	for i := range names {
		names[i] = fmt.Sprintf("bench-%02d", i)
		if _, err := audited.do("PUT", "/v1/projects/bench/secrets/"+names[i], body, 204); err != nil {
			b.Fatal(err)
		}
	}
	check := func(raw []byte) error {
		var v valueResponse
		if err := json.Unmarshal(raw, &v); err != nil || !bytes.Equal(v.Value, value) {
			return fmt.Errorf("wrong value back")
		}
		return nil
	}
	sealBody, openBody := columnBodies(b, audited, value)
	// logged reports what run, sending through audited, costs in CPU
	// (this process, clients included, and the PostgreSQL server's
	// backends: less noisy than wall time on a shared machine), and its
	// access-log statements per request and rows per statement.
	meter := benchMeter(b, e)
	logged := func(b *testing.B, run func()) {
		st, rows := logCounters(e.srv)
		c0, s0 := meter.Sample()
		run()
		c1, s1 := meter.Sample()
		b.ReportMetric(float64((c1-c0)+(s1-s0))/1e3/float64(b.N), "cpu-µs/req")
		st1, rows1 := logCounters(e.srv)
		if st1 -= st; st1 > 0 {
			b.ReportMetric(float64(st1)/float64(b.N), "log-stmts/req")
			b.ReportMetric(float64(rows1-rows)/float64(st1), "rows/stmt")
		}
	}
	for _, conc := range concurrencies {
		b.Run(fmt.Sprintf("seal/c=%d", conc), func(b *testing.B) {
			logged(b, func() {
				latency(b, conc, func(int) error {
					_, err := audited.do("POST", "/v1/projects/bench/seal", sealBody, 200)
					return err
				})
			})
		})
		b.Run(fmt.Sprintf("open/c=%d", conc), func(b *testing.B) {
			logged(b, func() {
				latency(b, conc, func(int) error {
					raw, err := audited.do("POST", "/v1/projects/bench/open", openBody, 200)
					if err != nil {
						return err
					}
					return check(raw)
				})
			})
		})
		b.Run(fmt.Sprintf("echo/c=%d", conc), func(b *testing.B) {
			logged(b, func() {
				latency(b, conc, func(int) error {
					raw, err := echo.do("POST", "/", body, 200)
					if err != nil {
						return err
					}
					return check(raw)
				})
			})
		})
		for _, arm := range []struct {
			name string
			c    *benchClient
		}{{"", audited}, {"-noaudit", unaudited}} {
			b.Run(fmt.Sprintf("put%s/c=%d", arm.name, conc), func(b *testing.B) {
				latency(b, conc, func(i int) error {
					_, err := arm.c.do("PUT", "/v1/projects/bench/secrets/"+names[i%len(names)], body, 204)
					return err
				})
			})
			b.Run(fmt.Sprintf("get%s/c=%d", arm.name, conc), func(b *testing.B) {
				logged(b, func() {
					latency(b, conc, func(i int) error {
						raw, err := arm.c.do("GET", "/v1/projects/bench/secrets/"+names[i%len(names)], nil, 200)
						if err != nil {
							return err
						}
						return check(raw)
					})
				})
			})
		}
	}
	// A workflow run's ten secrets: one get-many against ten gets, one client.
	ten, _ := json.Marshal(map[string][]string{"names": names[:10]})
	b.Run("getmany10", func(b *testing.B) {
		latency(b, 1, func(int) error {
			raw, err := audited.do("POST", "/v1/projects/bench/get-many", ten, 200)
			var m getManyResponse
			if err == nil && (json.Unmarshal(raw, &m) != nil || len(m.Values) != 10) {
				err = fmt.Errorf("get-many: %d values", len(m.Values))
			}
			return err
		})
	})
	b.Run("get10", func(b *testing.B) {
		latency(b, 1, func(int) error {
			for _, n := range names[:10] {
				if _, err := audited.do("GET", "/v1/projects/bench/secrets/"+n, nil, 200); err != nil {
					return err
				}
			}
			return nil
		})
	})
}

// BenchmarkVaultTransit: Vault Transit encrypt and decrypt of the same 1 KiB
// over loopback HTTP, the contender keybroker serve replaces.
func BenchmarkVaultTransit(b *testing.B) {
	v := benchVault(b)
	value := make([]byte, 1024)
	rand.Read(value)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128}}
	type transit struct {
		Data struct {
			Ciphertext string `json:"ciphertext"`
			Plaintext  string `json:"plaintext"`
		} `json:"data"`
	}
	call := func(op string, body []byte) (transit, error) {
		var out transit
		req, err := http.NewRequest("POST", v.Addr+"/v1/transit/"+op+"/bench", bytes.NewReader(body))
		if err != nil {
			return out, err
		}
		req.Header.Set("X-Vault-Token", v.Token)
		resp, err := client.Do(req)
		if err != nil {
			return out, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			return out, fmt.Errorf("vault %s: %d", op, resp.StatusCode)
		}
		return out, json.NewDecoder(resp.Body).Decode(&out)
	}
	enc, _ := json.Marshal(map[string]string{"plaintext": base64.StdEncoding.EncodeToString(value)})
	first, err := call("encrypt", enc)
	if err != nil {
		b.Fatal(err)
	}
	dec, _ := json.Marshal(map[string]string{"ciphertext": first.Data.Ciphertext})
	for _, conc := range concurrencies {
		b.Run(fmt.Sprintf("encrypt/c=%d", conc), func(b *testing.B) {
			latency(b, conc, func(int) error {
				out, err := call("encrypt", enc)
				if err == nil && !strings.HasPrefix(out.Data.Ciphertext, "vault:v1:") {
					err = fmt.Errorf("vault encrypt: no ciphertext")
				}
				return err
			})
		})
		b.Run(fmt.Sprintf("decrypt/c=%d", conc), func(b *testing.B) {
			latency(b, conc, func(int) error {
				out, err := call("decrypt", dec)
				if err == nil && out.Data.Plaintext != base64.StdEncoding.EncodeToString(value) {
					err = fmt.Errorf("vault decrypt: wrong plaintext")
				}
				return err
			})
		})
	}
}
