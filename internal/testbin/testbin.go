// Package testbin finds the server binaries that tests and benchmarks
// start (vault, local-kms, PostgreSQL's initdb and pg_ctl), which `make
// deps` builds or installs once per machine. A missing binary is an error
// naming the command that installs it: tests never skip for lack of one.
package testbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// CacheDir is where `make deps` puts the binaries it builds:
// $KEYBROKER_CACHE/bin, by default ~/.cache/keybroker/bin.
func CacheDir() string {
	if d := os.Getenv("KEYBROKER_CACHE"); d != "" {
		return filepath.Join(d, "bin")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "keybroker-cache", "bin")
	}
	return filepath.Join(home, ".cache", "keybroker", "bin")
}

// Find returns the path of the named binary: $KEYBROKER_<NAME>_BIN if set,
// else the cache directory, else $PATH.
func Find(name string) (string, error) {
	env := "KEYBROKER_" + envName(name) + "_BIN"
	if p := os.Getenv(env); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("testbin: %s=%s: %w", env, p, err)
		}
		return p, nil
	}
	p := filepath.Join(CacheDir(), name)
	if st, err := os.Stat(p); err == nil && !st.IsDir() {
		return p, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("testbin: %s not found in %s or $PATH: run `make deps` (scripts/deps.sh) to build it", name, CacheDir())
}

func envName(name string) string {
	b := []byte(name)
	for i, c := range b {
		switch {
		case c >= 'a' && c <= 'z':
			b[i] = c - 'a' + 'A'
		case c == '-':
			b[i] = '_'
		}
	}
	return string(b)
}
