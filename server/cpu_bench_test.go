package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/profullstack/keybroker/internal/cpumeter"
	"github.com/profullstack/keybroker/internal/vaultserver"
)

// BenchmarkServerCPU compares what each server spends per request, which
// the loopback latency benchmarks cannot show on a 2-core machine where
// the clients' own HTTP and JSON work competes with the server for the
// same cores: the clients run in another process (this test binary run
// again as a load generator, loadgen below), so the CPU time counted is the
// servers' alone —
//
//   - keybroker serve: this process (the Server in process) plus the
//     PostgreSQL backends (the access log's rows), by internal/cpumeter;
//   - Vault Transit (dev server, in-memory storage, no audit device):
//     the Vault process;
//   - echo (the floor): this process, a plain net/http server decoding
//     the same JSON body and sending it back.
//
// Each sub-benchmark sends b.N requests of a 1 KiB value from c concurrent
// keep-alive clients; the load generator checks every status and answer.
// On a machine where the servers have their cores to themselves, requests
// per second per core is about 1 / (server CPU per request). Run:
//
//	go test -run '^$' -bench ServerCPU -benchtime 4000x ./server/
func BenchmarkServerCPU(b *testing.B) {
	value := make([]byte, 1024)
	rand.Read(value)
	e := newEnv(b, func(c *Config) { c.Rate = 1e9; c.Burst = 1e9; c.Logger = nil })
	tok := e.token(nil, OpSeal, OpOpen)
	kb := e.serving(Options{})
	sealBody, openBody := columnBodies(b, newBenchClient(kb, tok), value)
	echoBody, _ := json.Marshal(map[string][]byte{"value": value})
	echo := echoServer(b)

	v := benchVault(b)
	plain := base64.StdEncoding.EncodeToString(value)
	encBody, _ := json.Marshal(map[string]string{"plaintext": plain})
	sec, err := v.Root.Logical().Write("transit/encrypt/bench", map[string]any{"plaintext": plain})
	if err != nil {
		b.Fatal(err)
	}
	ct, _ := sec.Data["ciphertext"].(string)
	decBody, _ := json.Marshal(map[string]string{"ciphertext": ct})

	meter := benchMeter(b, e)
	self := func() time.Duration { c, s := meter.Sample(); return c + s }
	vault := func() time.Duration { return cpumeter.Process(v.PID()) }
	b64 := base64.StdEncoding.EncodeToString(value)
	for _, c := range []struct {
		name, url, header, token string
		body                     []byte
		want                     string // in every answer
		cpu                      func() time.Duration
	}{
		{"echo", echo + "/", "", "", echoBody, b64, self},
		{"keybroker-seal", kb + "/v1/projects/bench/seal", "Authorization", "Bearer " + tok, sealBody, `"sealed":`, self},
		{"keybroker-open", kb + "/v1/projects/bench/open", "Authorization", "Bearer " + tok, openBody, b64, self},
		{"vault-encrypt", v.Addr + "/v1/transit/encrypt/bench", "X-Vault-Token", v.Token, encBody, `"ciphertext":"vault:v1:`, vault},
		{"vault-decrypt", v.Addr + "/v1/transit/decrypt/bench", "X-Vault-Token", v.Token, decBody, `"plaintext":"` + plain + `"`, vault},
	} {
		for _, conc := range concurrencies {
			b.Run(fmt.Sprintf("%s/c=%d", c.name, conc), func(b *testing.B) {
				dir := b.TempDir()
				bodyFile := dir + "/body"
				if err := os.WriteFile(bodyFile, c.body, 0o600); err != nil {
					b.Fatal(err)
				}
				cmd := exec.Command(os.Args[0])
				cmd.Env = append(os.Environ(), loadgenEnv+"="+strings.Join([]string{c.url, c.header, bodyFile, c.want, strconv.Itoa(conc), strconv.Itoa(b.N)}, "\x1f"),
					"KEYBROKER_LOADGEN_TOKEN="+c.token)
				var out, errb bytes.Buffer
				cmd.Stdout, cmd.Stderr = &out, &errb
				b.ResetTimer()
				cpu0 := c.cpu()
				err := cmd.Run()
				cpu1 := c.cpu()
				b.StopTimer()
				if err != nil {
					b.Fatalf("load generator: %v: %s", err, errb.String())
				}
				rate, _ := strconv.ParseFloat(strings.TrimSpace(out.String()), 64)
				b.ReportMetric(float64((cpu1-cpu0).Nanoseconds())/1e3/float64(b.N), "server-cpu-µs/req")
				b.ReportMetric(rate, "req/s")
				b.ReportMetric(0, "ns/op")
			})
		}
	}
}

// columnBodies returns the bodies of a seal of value and of an open of
// what that seal returned (through c), for column public.secrets.value_encrypted
// of row "bench" of project bench.
func columnBodies(b *testing.B, c *benchClient, value []byte) (seal, open []byte) {
	b.Helper()
	where := map[string]any{"table": "public.secrets", "column": "value_encrypted", "row": []string{"bench"}}
	body := func(k string, v any) []byte {
		m := map[string]any{k: v}
		for k, v := range where {
			m[k] = v
		}
		raw, _ := json.Marshal(m)
		return raw
	}
	seal = body("value", value)
	raw, err := c.do("POST", "/v1/projects/bench/seal", seal, 200)
	if err != nil {
		b.Fatal(err)
	}
	var sr sealResponse
	if err := json.Unmarshal(raw, &sr); err != nil {
		b.Fatal(err)
	}
	return seal, body("sealed", sr.Sealed)
}

// benchVault starts a dev Vault (stopped when b ends) with Transit
// mounted and a key "bench".
func benchVault(b *testing.B) *vaultserver.Server {
	b.Helper()
	v, err := vaultserver.Start(context.Background(), vaultserver.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(v.Stop)
	if err := v.Root.Sys().Mount("transit", &api.MountInput{Type: "transit"}); err != nil {
		b.Fatal(err)
	}
	if _, err := v.Root.Logical().Write("transit/keys/bench", nil); err != nil {
		b.Fatal(err)
	}
	return v
}

// loadgenEnv, when set, makes the test binary BenchmarkServerCPU's load
// generator: URL, header name, body file, expected substring, clients and
// requests, separated by U+001F; the header's value is in
// KEYBROKER_LOADGEN_TOKEN (the environment, not the command line, which
// other users can read). It prints requests per second and exits 0, or
// prints the first failure and exits 1.
const loadgenEnv = "KEYBROKER_LOADGEN"

func loadgen() int {
	f := strings.Split(os.Getenv(loadgenEnv), "\x1f")
	if len(f) != 6 {
		fmt.Fprintln(os.Stderr, "loadgen: bad", loadgenEnv)
		return 2
	}
	url, header, want := f[0], f[1], []byte(f[3])
	body, err := os.ReadFile(f[2])
	conc, _ := strconv.Atoi(f[4])
	n, _ := strconv.Atoi(f[5])
	if err != nil || conc < 1 || n < 1 {
		fmt.Fprintln(os.Stderr, "loadgen: bad arguments", err)
		return 2
	}
	token := os.Getenv("KEYBROKER_LOADGEN_TOKEN")
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128}}
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				req, err := http.NewRequest("POST", url, bytes.NewReader(body))
				if err != nil {
					failed.CompareAndSwap(nil, err)
					return
				}
				if header != "" {
					req.Header.Set(header, token)
				}
				resp, err := client.Do(req)
				if err != nil {
					failed.CompareAndSwap(nil, err)
					return
				}
				raw, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err == nil && (resp.StatusCode != 200 || !bytes.Contains(raw, want)) {
					err = fmt.Errorf("status %d, answer without %q", resp.StatusCode, want)
				}
				if err != nil {
					failed.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		return 1
	}
	fmt.Println(float64(n) / time.Since(start).Seconds())
	return 0
}
