package main

import (
	"runtime/debug"
	"testing"
)

// TestVersionFrom reads each build setting keybroker version reports.
func TestVersionFrom(t *testing.T) {
	bi := &debug.BuildInfo{
		GoVersion: "go1.26.11",
		Main:      debug.Module{Path: "github.com/profullstack/keybroker", Version: "v1.4.0"},
		Settings: []debug.BuildSetting{
			{Key: "-buildmode", Value: "exe"},
			{Key: "vcs", Value: "git"},
			{Key: "vcs.revision", Value: "8d7b056a1b2c"},
			{Key: "vcs.time", Value: "2026-12-01T21:00:00Z"},
			{Key: "vcs.modified", Value: "true"},
		},
	}
	want := versionInfo{Module: "github.com/profullstack/keybroker", Version: "v1.4.0", Revision: "8d7b056a1b2c",
		Time: "2026-12-01T21:00:00Z", Modified: true, Go: "go1.26.11"}
	if got := versionFrom(bi); got != want {
		t.Fatalf("versionFrom = %+v, want %+v", got, want)
	}
	const human = "keybroker v1.4.0\nmodule    github.com/profullstack/keybroker\nrevision  8d7b056a1b2c (modified)\ntime      2026-12-01T21:00:00Z\ngo        go1.26.11\n"
	if got := want.String(); got != human {
		t.Fatalf("String =\n%s\nwant\n%s", got, human)
	}
	// Without VCS stamping (go test, -buildvcs=false) the revision is
	// reported unknown, not empty.
	bi.Settings, bi.Main.Version = nil, ""
	v := versionFrom(bi)
	if v.Version != "(devel)" || v.Revision != "" || v.Modified {
		t.Fatalf("unstamped: %+v", v)
	}
	if s := v.String(); s != "keybroker (devel)\nmodule    github.com/profullstack/keybroker\nrevision  unknown (not recorded in this build)\ngo        go1.26.11\n" {
		t.Fatalf("unstamped String =\n%s", s)
	}
}
