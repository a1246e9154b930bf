package leancheck

import (
	"os/exec"
	"strings"
	"testing"
)

// forbidden are import-path prefixes that must stay out of the light path.
var forbidden = []string{
	"github.com/aws/",
	"cloud.google.com/",
	"google.golang.org/grpc",
	"github.com/hashicorp/",
	"github.com/jackc/",
	"github.com/testcontainers/",
	"go.opentelemetry.io/",
	"github.com/spf13/",
}

func TestLeanImports(t *testing.T) {
	for _, pkg := range []string{
		"github.com/profullstack/keybroker/provider",
		"github.com/profullstack/keybroker/provider/local",
		"github.com/profullstack/keybroker/envelope",
		"github.com/profullstack/keybroker/legacy",
	} {
		out, err := exec.Command("go", "list", "-deps", pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s: %v\n%s", pkg, err, out)
		}
		deps := strings.Fields(string(out))
		if len(deps) < 10 {
			t.Fatalf("go list -deps %s listed only %d packages; the check would prove nothing", pkg, len(deps))
		}
		for _, d := range deps {
			for _, f := range forbidden {
				if strings.HasPrefix(d, f) {
					t.Errorf("%s compiles %s (prefix %s): keep heavy dependencies out of the light path", pkg, d, f)
				}
			}
		}
	}
}
