package main

import (
	"fmt"
	"io"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"
)

// versionInfo is what the binary records about its build.
type versionInfo struct {
	Module   string `json:"module"`
	Version  string `json:"version"`            // module version; "(devel)" for a build from a checkout
	Revision string `json:"revision,omitempty"` // VCS revision, when the build recorded it
	Time     string `json:"time,omitempty"`     // VCS commit time (RFC 3339), when recorded
	Modified bool   `json:"modified"`           // the checkout had uncommitted changes
	Go       string `json:"go"`
}

// buildVersion reads the running binary's build information.
func buildVersion() versionInfo {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return versionInfo{Module: "github.com/profullstack/keybroker", Version: "unknown", Go: "unknown"}
	}
	return versionFrom(bi)
}

// versionFrom extracts versionInfo from bi. The vcs.* settings exist only
// when `go build` stamped them (a main package built in a VCS checkout
// without -buildvcs=false); `go install module@version` records the
// module version instead.
func versionFrom(bi *debug.BuildInfo) versionInfo {
	v := versionInfo{Module: bi.Main.Path, Version: bi.Main.Version, Go: bi.GoVersion}
	if v.Version == "" {
		v.Version = "(devel)"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Revision = s.Value
		case "vcs.time":
			v.Time = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	return v
}

// String is the human form, also what --version prints.
func (v versionInfo) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "keybroker %s\n", v.Version)
	fmt.Fprintf(&b, "module    %s\n", v.Module)
	switch {
	case v.Revision == "":
		b.WriteString("revision  unknown (not recorded in this build)\n")
	case v.Modified:
		fmt.Fprintf(&b, "revision  %s (modified)\n", v.Revision)
	default:
		fmt.Fprintf(&b, "revision  %s\n", v.Revision)
	}
	if v.Time != "" {
		fmt.Fprintf(&b, "time      %s\n", v.Time)
	}
	fmt.Fprintf(&b, "go        %s\n", v.Go)
	return b.String()
}

func newVersionCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the build: module version, VCS revision and time, Go version",
		Long: `version prints what the binary recorded about its build: the module
version, the VCS revision, commit time and whether the checkout was
modified (when the build recorded them), and the Go version. --version
prints the same. It reads no configuration.`,
		Args: args(cobra.NoArgs),
		// No configuration: version works whatever the environment holds.
		PersistentPreRunE: func(*cobra.Command, []string) error { a.started = true; return nil },
		RunE: func(*cobra.Command, []string) error {
			v := buildVersion()
			return a.emit(v, func(w io.Writer) { io.WriteString(w, v.String()) })
		},
	}
}
