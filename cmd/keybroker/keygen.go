package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/profullstack/keybroker/provider/local"
	"github.com/spf13/cobra"
)

func newKeygenCmd(a *app) *cobra.Command {
	var id string
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "keygen FILE",
		Short: "Write a new local keyring file (mode 0600; never overwrites)",
		Long: `keygen writes a new keyring for the local provider: one random AES-256 key
version, primary. The file is created with mode 0600 and keygen refuses to
overwrite an existing file, which would destroy the keys in it. Use the
printed URL as --kek or KEYBROKER_KEK.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			path, err := filepath.Abs(argv[0])
			if err != nil {
				return err
			}
			if _, err := os.Lstat(path); err == nil {
				return fmt.Errorf("keygen: %s exists; refusing to overwrite a keyring", path)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("keygen: %w", err)
			}
			if !dryRun {
				p, err := local.Generate(id)
				if err != nil {
					return err
				}
				if err := p.Save(path); err != nil {
					return err
				}
				a.log.Info("generated keyring", "id", id, "file", path)
			}
			res := struct {
				File   string `json:"file"`
				ID     string `json:"id"`
				URL    string `json:"url"`
				DryRun bool   `json:"dry_run"`
			}{path, id, localURL(path), dryRun}
			return a.emit(res, func(w io.Writer) {
				if dryRun {
					fmt.Fprintf(w, "dry run: would write keyring %s to %s\n", id, path)
					return
				}
				fmt.Fprintf(w, "wrote keyring %s to %s\nKEYBROKER_KEK=%s\n", id, path, res.URL)
			})
		},
	}
	cmd.Flags().StringVar(&id, "id", "keybroker", "keyring id, recorded with every key it wraps")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "check the path without writing")
	return cmd
}

// localURL is the provider URL of a keyring file.
func localURL(absPath string) string { return "local://" + filepath.ToSlash(absPath) }
