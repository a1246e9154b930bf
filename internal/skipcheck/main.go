// Command skipcheck reads `go test -json` on stdin and prints a readable
// report: the package summary lines, and the full output of every test that
// failed or was skipped. It exits 1 if any test or build failed, and — when
// the environment has CI=true — if any test was skipped without a line in
// the allow-list file named by -allow, so a test that quietly stops running
// in CI (a missing binary, an unset variable) fails the build instead.
//
// The allow-list has one entry per line: import path, test name, and a
// reason after '#', which is required:
//
//	github.com/profullstack/keybroker/e2e TestDocker  # CI has no Docker daemon
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

type event struct {
	Action     string
	Package    string
	ImportPath string // build-output events
	Test       string
	Output     string
}

func main() {
	allowPath := flag.String("allow", "", "allow-list file of tests that may skip in CI")
	flag.Parse()
	allow, err := readAllow(*allowPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "skipcheck:", err)
		os.Exit(2)
	}
	os.Exit(run(os.Stdin, os.Stdout, allow, os.Getenv("CI") == "true"))
}

func readAllow(path string) (map[string]bool, error) {
	allow := map[string]bool{}
	if path == "" {
		return allow, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for i, line := range strings.Split(string(b), "\n") {
		entry, reason, _ := strings.Cut(line, "#")
		f := strings.Fields(entry)
		if len(f) == 0 {
			continue
		}
		if len(f) != 2 || strings.TrimSpace(reason) == "" {
			return nil, fmt.Errorf("%s:%d: want \"<import path> <test>  # reason\"", path, i+1)
		}
		allow[f[0]+" "+f[1]] = true
	}
	return allow, nil
}

func run(in io.Reader, out io.Writer, allow map[string]bool, ci bool) int {
	w := bufio.NewWriter(out)
	defer w.Flush()
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	output := map[string]*strings.Builder{} // by "pkg test"
	var failed bool
	var skipped []string
	var nPass, nFail, nSkip int
	for sc.Scan() {
		var e event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil || e.Action == "" {
			// Not JSON: a build error printed by the go command itself.
			fmt.Fprintln(w, sc.Text())
			continue
		}
		key := e.Package + " " + e.Test
		switch e.Action {
		case "build-output":
			fmt.Fprint(w, e.Output)
		case "build-fail":
			failed = true
		case "output":
			if e.Test == "" {
				if e.Output == "PASS\n" {
					continue // -json implies -v; the "ok" line follows
				}
				fmt.Fprint(w, e.Output)
				w.Flush()
				continue
			}
			b := output[key]
			if b == nil {
				b = &strings.Builder{}
				output[key] = b
			}
			b.WriteString(e.Output)
		case "fail", "skip":
			if e.Action == "fail" {
				failed = true
			}
			if e.Test == "" {
				continue // the package line was printed as output
			}
			if e.Action == "fail" {
				nFail++
			} else {
				nSkip++
			}
			if e.Action == "skip" && !allow[key] {
				skipped = append(skipped, key)
			}
			if b := output[key]; b != nil {
				fmt.Fprint(w, b.String())
			}
			delete(output, key)
		case "pass":
			if e.Test != "" {
				nPass++
			}
			delete(output, key)
		}
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(w, "skipcheck: reading go test output:", err)
		return 1
	}
	// The plain closing line CI reads: subtests count, as go test -v shows them.
	fmt.Fprintf(w, "%d passed, %d failed, %d skipped\n", nPass, nFail, nSkip)
	code := 0
	if failed {
		code = 1
	}
	if len(skipped) > 0 {
		sort.Strings(skipped)
		verdict := "note"
		if ci {
			verdict, code = "error", 1
		}
		fmt.Fprintf(w, "skipcheck: %s: %d test(s) skipped and not in the allow-list:\n", verdict, len(skipped))
		for _, s := range skipped {
			fmt.Fprintln(w, "  "+s)
		}
	}
	return code
}
