package pgcolumn_test

import (
	"os"
	"testing"

	"github.com/profullstack/keybroker/internal/pgtest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
