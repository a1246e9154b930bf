package bench

import (
	"bytes"
	"context"
	"fmt"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"github.com/google/pprof/profile"
)

// ProfileLine is one function of a CPU profile.
type ProfileLine struct {
	Func      string
	Flat, Cum float64 // fraction of all samples
}

// Profile runs f in a loop for d under the CPU profiler and returns the top
// functions by own (flat) time, the top functions outside the Go runtime
// and this package by cumulative time (the call path's breakdown), and
// the raw profile.
func Profile(ctx context.Context, d time.Duration, top int, f func() error) (flatTop, cumTop []ProfileLine, raw []byte, err error) {
	var buf bytes.Buffer
	if err := pprof.StartCPUProfile(&buf); err != nil {
		return nil, nil, nil, err
	}
	deadline := time.Now().Add(d)
	var ferr error
	for time.Now().Before(deadline) && ferr == nil {
		for range 100 {
			if ferr = f(); ferr != nil {
				break
			}
		}
	}
	pprof.StopCPUProfile()
	if ferr != nil {
		return nil, nil, nil, ferr
	}
	p, err := profile.Parse(bytes.NewReader(buf.Bytes()))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("bench: parse profile: %w", err)
	}
	flat, cum := map[string]int64{}, map[string]int64{}
	var total int64
	vi := len(p.SampleType) - 1 // cpu nanoseconds
	for _, s := range p.Sample {
		v := s.Value[vi]
		total += v
		seen := map[string]bool{}
		for i, loc := range s.Location {
			for j, ln := range loc.Line {
				name := shortFunc(ln.Function.Name)
				if i == 0 && j == 0 {
					flat[name] += v
				}
				if !seen[name] {
					seen[name] = true
					cum[name] += v
				}
			}
		}
	}
	if total == 0 {
		return nil, nil, buf.Bytes(), nil
	}
	var all []ProfileLine
	for name, v := range cum {
		all = append(all, ProfileLine{Func: name, Flat: float64(flat[name]) / float64(total), Cum: float64(v) / float64(total)})
	}
	byFlat := func(a, b ProfileLine) int { return cmpDesc(a.Flat, b.Flat, a.Func, b.Func) }
	byCum := func(a, b ProfileLine) int { return cmpDesc(a.Cum, b.Cum, a.Func, b.Func) }
	slices.SortFunc(all, byFlat)
	for _, l := range all {
		if len(flatTop) < top && l.Flat > 0 {
			flatTop = append(flatTop, l)
		}
	}
	slices.SortFunc(all, byCum)
	for _, l := range all {
		if len(cumTop) < top && !uninteresting(l.Func) {
			cumTop = append(cumTop, l)
		}
	}
	return flatTop, cumTop, buf.Bytes(), nil
}

func cmpDesc(a, b float64, an, bn string) int {
	switch {
	case a > b:
		return -1
	case a < b:
		return 1
	}
	return strings.Compare(an, bn)
}

// uninteresting are the frames every profile shares: the runtime's, the
// benchmark loop's.
func uninteresting(fn string) bool {
	for _, p := range []string{"runtime.", "runtime/", "internal/runtime", "testing.", "bench.", "main."} {
		if strings.HasPrefix(fn, p) {
			return true
		}
	}
	return false
}

// shortFunc drops the module path: "crypto/internal/fips140/aes/gcm.seal"
// stays, "github.com/profullstack/keybroker/envelope.seal" becomes
// "envelope.seal".
func shortFunc(name string) string {
	if i := strings.LastIndex(name, "/"); i >= 0 && strings.HasPrefix(name, "github.com/") {
		return name[i+1:]
	}
	return name
}
