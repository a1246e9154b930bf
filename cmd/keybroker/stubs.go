package main

import (
	"errors"

	"github.com/spf13/cobra"
)

func stub(name string) func(a *app) *cobra.Command {
	return func(a *app) *cobra.Command {
		return &cobra.Command{Use: name, RunE: func(*cobra.Command, []string) error { return errors.New("not implemented") }}
	}
}

var (
	newImportCmd = stub("import-plaintext")
	newStatusCmd = stub("status")
)
