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
// functions by flat time, with their cumulative share, plus the raw
// profile.
func Profile(ctx context.Context, d time.Duration, top int, f func() error) ([]ProfileLine, []byte, error) {
	var buf bytes.Buffer
	if err := pprof.StartCPUProfile(&buf); err != nil {
		return nil, nil, err
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
		return nil, nil, ferr
	}
	p, err := profile.Parse(bytes.NewReader(buf.Bytes()))
	if err != nil {
		return nil, nil, fmt.Errorf("bench: parse profile: %w", err)
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
		return nil, buf.Bytes(), nil
	}
	var out []ProfileLine
	for name, v := range flat {
		out = append(out, ProfileLine{Func: name, Flat: float64(v) / float64(total), Cum: float64(cum[name]) / float64(total)})
	}
	slices.SortFunc(out, func(a, b ProfileLine) int {
		if a.Flat != b.Flat {
			if a.Flat > b.Flat {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Func, b.Func)
	})
	return out[:min(top, len(out))], buf.Bytes(), nil
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
