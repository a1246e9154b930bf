package bench

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Sizes are the payload sizes measured: 256 B, 1 KiB, 16 KiB, 1 MiB.
var Sizes = []int{256, 1 << 10, 16 << 10, 1 << 20}

// Op names what is measured.
type Op string

// The operations measured.
const (
	Encrypt Op = "encrypt"
	Decrypt Op = "decrypt"
)

// Result is one contender's median over the rounds for one operation on
// one payload size.
type Result struct {
	Contender string
	Op        Op
	Size      int
	NsPerOp   float64 // WallNs or CPUNs, as Measure's clock says
	Clock     Clock
	WallNs    float64   // median of Rounds
	CPUNs     float64   // median of CPURounds
	Rounds    []float64 // wall-clock ns/op of each round
	CPURounds []float64 // process CPU ns/op of each round
	Allocs    int64     // allocations per operation (median round)
	Bytes     int64     // bytes allocated per operation (median round)
	Overhead  int       // bytes the ciphertext adds to the plaintext
}

// MBps is the throughput in MB/s (10^6 bytes).
func (r Result) MBps() float64 { return float64(r.Size) / r.NsPerOp * 1e3 }

// Payload returns n random bytes.
func Payload(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// Clock says which time a Result's NsPerOp is.
type Clock string

// The clocks.
const (
	// Wall is elapsed time: what a caller waits, including time the
	// process spent descheduled by other load, and waits on servers.
	Wall Clock = "wall"
	// CPU is the CPU time of the whole process (every thread, so the
	// garbage collector too) per operation: on a machine shared with other
	// work it estimates the quiet-machine wall time of CPU-bound code far
	// better than elapsed time.
	CPU Clock = "cpu"
)

// cpuSample is the process CPU time and b.N of a benchmark function's
// last invocation: testing.Benchmark's final run.
type cpuSample struct {
	cpu time.Duration
	n   int
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

var benchtimeMu sync.Mutex

// runBenchmark runs f under testing.Benchmark with -test.benchtime set to
// benchtime ("500ms", or "1000x" for a fixed count), so a command outside
// `go test` uses the same machinery.
func runBenchmark(benchtime string, f func(b *testing.B)) testing.BenchmarkResult {
	benchtimeMu.Lock()
	defer benchtimeMu.Unlock()
	testing.Init() // registers the test.* flags once; no effect later
	fl := flag.Lookup("test.benchtime")
	old := fl.Value.String()
	fl.Value.Set(benchtime)
	defer fl.Value.Set(old)
	return testing.Benchmark(f)
}

// BenchSeal returns a benchmark of c.Seal on pt. A failure is stored in
// *errp and ends the benchmark; the process CPU time of the last run is
// stored in *cpu (if not nil).
func BenchSeal(ctx context.Context, c *Contender, pt []byte, errp *error, cpu *cpuSample) func(b *testing.B) {
	return bench(len(pt), errp, cpu, func() error { _, err := c.Seal(ctx, pt); return err })
}

// BenchOpen returns a benchmark of c.Open on ct, which opens to n bytes.
func BenchOpen(ctx context.Context, c *Contender, ct []byte, n int, errp *error, cpu *cpuSample) func(b *testing.B) {
	return bench(n, errp, cpu, func() error { _, err := c.Open(ctx, ct); return err })
}

func bench(n int, errp *error, cpu *cpuSample, f func() error) func(b *testing.B) {
	return func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(n))
		t0 := processCPU()
		for range b.N {
			if err := f(); err != nil {
				*errp = err
				return
			}
		}
		if cpu != nil {
			*cpu = cpuSample{processCPU() - t0, b.N}
		}
	}
}

// Measure benchmarks encrypt and decrypt of every contender at every size,
// rounds times. Each round visits the sizes in turn and, for each, the
// contenders in an order rotated by one from the previous round, so slow
// phases of a noisy machine spread over all contenders. progress, if set,
// is called after each benchmark. clock chooses the time the results'
// NsPerOp report; both are recorded.
func Measure(ctx context.Context, cs []*Contender, sizes []int, rounds int, benchtime time.Duration, clock Clock, progress func(string)) ([]Result, error) {
	type key struct {
		name string
		op   Op
		size int
	}
	type sample struct {
		res testing.BenchmarkResult
		cpu cpuSample
	}
	samples := map[key][]sample{}
	cts := map[key][]byte{}
	pts := map[int][]byte{}
	for _, n := range sizes {
		pts[n] = Payload(n)
		for _, c := range cs {
			if err := RoundTrip(ctx, c, pts[n]); err != nil {
				return nil, err
			}
			ct, err := c.Seal(ctx, pts[n])
			if err != nil {
				return nil, fmt.Errorf("%s: seal: %w", c.Name, err)
			}
			cts[key{c.Name, Decrypt, n}] = ct
		}
	}
	bt := benchtime.String()
	for r := range rounds {
		for _, n := range sizes {
			for i := range cs {
				c := cs[(i+r)%len(cs)]
				var err error
				var cpu cpuSample
				res := runBenchmark(bt, BenchSeal(ctx, c, pts[n], &err, &cpu))
				if err != nil {
					return nil, fmt.Errorf("%s: encrypt %d bytes: %w", c.Name, n, err)
				}
				samples[key{c.Name, Encrypt, n}] = append(samples[key{c.Name, Encrypt, n}], sample{res, cpu})
				res = runBenchmark(bt, BenchOpen(ctx, c, cts[key{c.Name, Decrypt, n}], n, &err, &cpu))
				if err != nil {
					return nil, fmt.Errorf("%s: decrypt %d bytes: %w", c.Name, n, err)
				}
				samples[key{c.Name, Decrypt, n}] = append(samples[key{c.Name, Decrypt, n}], sample{res, cpu})
				if progress != nil {
					progress(fmt.Sprintf("round %d/%d, %s, %s", r+1, rounds, SizeName(n), c.Name))
				}
			}
		}
	}
	var out []Result
	for _, c := range cs {
		for _, op := range []Op{Encrypt, Decrypt} {
			for _, n := range sizes {
				var rs []testing.BenchmarkResult
				var cpus []float64
				for _, s := range samples[key{c.Name, op, n}] {
					rs = append(rs, s.res)
					cpus = append(cpus, float64(s.cpu.cpu.Nanoseconds())/float64(max(1, s.cpu.n)))
				}
				r := summarize(c.Name, op, n, rs)
				r.CPURounds, r.CPUNs, r.Clock = cpus, median(cpus), clock
				if clock == CPU {
					r.NsPerOp = r.CPUNs
				}
				r.Overhead = len(cts[key{c.Name, Decrypt, n}]) - n
				out = append(out, r)
			}
		}
	}
	return out, nil
}

// summarize takes the median round (by ns/op) of rs.
func summarize(name string, op Op, size int, rs []testing.BenchmarkResult) Result {
	r := Result{Contender: name, Op: op, Size: size}
	for _, s := range rs {
		r.Rounds = append(r.Rounds, float64(s.NsPerOp()))
		if s.N > 0 {
			r.Rounds[len(r.Rounds)-1] = float64(s.T.Nanoseconds()) / float64(s.N)
		}
	}
	sorted := slices.Clone(rs)
	slices.SortFunc(sorted, func(a, b testing.BenchmarkResult) int {
		return int(a.T.Nanoseconds()*int64(b.N) - b.T.Nanoseconds()*int64(a.N))
	})
	m := sorted[len(sorted)/2]
	r.WallNs = float64(m.T.Nanoseconds()) / float64(m.N)
	r.NsPerOp = r.WallNs
	r.Allocs, r.Bytes = m.AllocsPerOp(), m.AllocedBytesPerOp()
	return r
}

// SizeName formats a payload size: 256 B, 1 KiB, 16 KiB, 1 MiB.
func SizeName(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}
