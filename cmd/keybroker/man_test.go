package main

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"testing"
)

// TestManPages checks that docs/man holds exactly the pages the command
// tree generates (run `go generate ./cmd/keybroker` after changing a
// command's help or flags). The header's month is ignored.
func TestManPages(t *testing.T) {
	dir := t.TempDir()
	if err := writeManPages(dir); err != nil {
		t.Fatal(err)
	}
	want := manPages(t, dir)
	got := manPages(t, manDir)
	if len(want) < 2 {
		t.Fatalf("generated only %d pages", len(want))
	}
	for name, page := range want {
		if cur, ok := got[name]; !ok {
			t.Errorf("%s/%s is missing: run go generate ./cmd/keybroker", manDir, name)
		} else if cur != page {
			t.Errorf("%s/%s is out of date: run go generate ./cmd/keybroker", manDir, name)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("%s/%s belongs to no command: run go generate ./cmd/keybroker", manDir, name)
		}
	}
}

// thDate is the date field of a man page's .TH line.
var thDate = regexp.MustCompile(`(?m)^(\.TH "[^"]*" "[^"]*" )"[^"]*"`)

func manPages(t *testing.T, dir string) map[string]string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "keybroker*.1"))
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(files)
	pages := map[string]string{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		pages[filepath.Base(f)] = thDate.ReplaceAllString(string(b), `$1"DATE"`)
	}
	return pages
}
