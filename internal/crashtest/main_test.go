//go:build linux

package crashtest

import (
	"flag"
	"fmt"
	"hash/fnv"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/profullstack/keybroker/internal/pgtest"
)

const (
	envSeed  = "KEYBROKER_CRASHTEST_SEED"
	envScale = "KEYBROKER_CRASHTEST_SCALE"
)

var scaleFlag = flag.Int("crashtest.scale", 0, "run this many times as many rounds (more kills); env "+envScale)

// keybrokerBin is the keybroker binary TestMain builds.
var keybrokerBin string

// TestMain builds ./cmd/keybroker, runs the tests against the PostgreSQL
// server pgtest provides, and removes the binary. The four tests run at
// once unless -parallel says otherwise: most of their time is spent
// waiting for the child or the database, not on a CPU.
func TestMain(m *testing.M) {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		_ = flag.Set("test.parallel", "4")
	}
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "keybroker-crashtest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "crashtest:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	keybrokerBin = filepath.Join(dir, "keybroker")
	// No symbol table or DWARF: linking is most of the build's time.
	cmd := exec.Command("go", "build", "-ldflags=-s -w", "-o", keybrokerBin, "github.com/profullstack/keybroker/cmd/keybroker")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "crashtest: go build ./cmd/keybroker:", err)
		return 1
	}
	return pgtest.Main(m)
}

// seedFor returns the test's seed: KEYBROKER_CRASHTEST_SEED when set, else
// a fresh one; each test mixes in its name so one seed replays any of them.
func seedFor(t *testing.T) uint64 {
	t.Helper()
	base := uint64(time.Now().UnixNano())
	if v := os.Getenv(envSeed); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("crashtest: %s=%q: want a decimal number", envSeed, v)
		}
		base = n
	}
	t.Logf("seed %d (replay: %s=%d go test -run '^%s$' ./internal/crashtest/)", base, envSeed, base, t.Name())
	h := fnv.New64a()
	h.Write([]byte(t.Name()))
	return base ^ h.Sum64()
}

// scale is how many times the default number of rounds to run.
func scale(t *testing.T) int {
	t.Helper()
	if *scaleFlag > 0 {
		return *scaleFlag
	}
	if v := os.Getenv(envScale); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("crashtest: %s=%q: want a positive number", envScale, v)
		}
		return n
	}
	return 1
}
