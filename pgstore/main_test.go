package pgstore_test

import (
	"os"
	"testing"

	"github.com/profullstack/keybroker/internal/pgtest"
)

func TestMain(m *testing.M) {
	code := pgtest.Main(m)
	for _, f := range atExit {
		f()
	}
	os.Exit(code)
}

// atExit holds what TestMain runs after the tests: stopping servers that
// tests start once for the whole package (local-kms).
var atExit []func()

func stopAtExit(f func()) { atExit = append(atExit, f) }
