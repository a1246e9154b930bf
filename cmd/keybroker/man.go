package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// manDir is where `go generate` writes the man pages, relative to this
// package; TestManPages checks they match the commands.
//
//go:generate go run . man ../../docs/man
const manDir = "../../docs/man"

func newManCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:    "man DIR",
		Short:  "Write the man pages (keybroker.1 and one per command) into DIR",
		Hidden: true, // a build step (go generate), not an operator command
		Args:   args(cobra.ExactArgs(1)),
		// No configuration needed.
		PersistentPreRunE: func(*cobra.Command, []string) error { a.started = true; return nil },
		RunE:              func(_ *cobra.Command, argv []string) error { return writeManPages(argv[0]) },
	}
}

// writeManPages replaces DIR's keybroker*.1 with pages generated from the
// command tree, so a removed command leaves no stale page. The date in
// each page's header is SOURCE_DATE_EPOCH's, or today's.
func writeManPages(dir string) error {
	old, err := filepath.Glob(filepath.Join(dir, "keybroker*.1"))
	if err != nil {
		return fmt.Errorf("man: %w", err)
	}
	for _, f := range old {
		if err := os.Remove(f); err != nil {
			return fmt.Errorf("man: %w", err)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("man: %w", err)
	}
	root := newRootCmd(&app{stdout: io.Discard, stderr: io.Discard, logOut: &logWriter{w: io.Discard}})
	root.DisableAutoGenTag = true // its footer carries the generation date too
	if err := doc.GenManTree(root, &doc.GenManHeader{Source: "keybroker", Manual: "keybroker manual"}, dir); err != nil {
		return fmt.Errorf("man: %w", err)
	}
	return nil
}
