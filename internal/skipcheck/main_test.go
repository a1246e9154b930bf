package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const stream = `{"Action":"start","Package":"p"}
{"Action":"run","Package":"p","Test":"TestA"}
{"Action":"output","Package":"p","Test":"TestA","Output":"=== RUN   TestA\n"}
{"Action":"output","Package":"p","Test":"TestA","Output":"    a_test.go:9: no vault binary\n"}
{"Action":"output","Package":"p","Test":"TestA","Output":"--- SKIP: TestA (0.00s)\n"}
{"Action":"skip","Package":"p","Test":"TestA"}
{"Action":"run","Package":"p","Test":"TestB"}
{"Action":"output","Package":"p","Test":"TestB","Output":"=== RUN   TestB\n"}
{"Action":"pass","Package":"p","Test":"TestB"}
{"Action":"output","Package":"p","Output":"ok  \tp\t0.01s\n"}
{"Action":"pass","Package":"p"}
{"Action":"skip","Package":"q"}
`

func TestSkipFailsOnlyInCIAndUnlisted(t *testing.T) {
	for _, tc := range []struct {
		name  string
		allow map[string]bool
		ci    bool
		code  int
	}{
		{"local run", nil, false, 0},
		{"CI", nil, true, 1},
		{"CI, allowed", map[string]bool{"p TestA": true}, true, 0},
	} {
		var out strings.Builder
		if got := run(strings.NewReader(stream), &out, tc.allow, tc.ci); got != tc.code {
			t.Errorf("%s: exit %d, want %d; output:\n%s", tc.name, got, tc.code, out.String())
		}
		if !strings.Contains(out.String(), "no vault binary") || strings.Contains(out.String(), "=== RUN   TestB") {
			t.Errorf("%s: want the skipped test's output and not the passing one's; got:\n%s", tc.name, out.String())
		}
		if tc.code == 1 && !strings.Contains(out.String(), "p TestA") {
			t.Errorf("%s: the report does not name the skipped test:\n%s", tc.name, out.String())
		}
	}
}

func TestFailureAndBuildError(t *testing.T) {
	fail := `{"Action":"output","Package":"p","Test":"TestC","Output":"    c_test.go:3: boom\n"}
{"Action":"fail","Package":"p","Test":"TestC"}
{"Action":"fail","Package":"p"}
`
	var out strings.Builder
	if got := run(strings.NewReader(fail), &out, nil, false); got != 1 || !strings.Contains(out.String(), "boom") {
		t.Errorf("failing test: exit %d, output %q; want 1 and the test's output", got, out.String())
	}
	out.Reset()
	build := "# p\np/x.go:1:1: syntax error\n" + `{"ImportPath":"p","Action":"build-fail"}` + "\n"
	if got := run(strings.NewReader(build), &out, nil, false); got != 1 || !strings.Contains(out.String(), "syntax error") {
		t.Errorf("build error: exit %d, output %q; want 1 and the compiler's message", got, out.String())
	}
}

func TestAllowListNeedsReasons(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	os.WriteFile(good, []byte("# comment\n\np TestA  # needs Docker\n"), 0o644)
	allow, err := readAllow(good)
	if err != nil || !allow["p TestA"] {
		t.Fatalf("readAllow = %v, %v; want p TestA allowed", allow, err)
	}
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, []byte("p TestA\n"), 0o644)
	if _, err := readAllow(bad); err == nil || !strings.Contains(err.Error(), "bad:1") {
		t.Fatalf("readAllow without a reason: %v; want an error naming line 1", err)
	}
}
