package main

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/spf13/cobra"
)

func newPutCmd(a *app) *cobra.Command {
	var file string
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "put PROJECT NAME",
		Short: "Encrypt and store a secret read from stdin (or --from-file)",
		Long: `put stores a secret, replacing any previous value. The value is read
exactly as given from stdin, or from --from-file, never from the command line
(where other users could see it); a trailing newline is part of the value, so
use printf rather than echo.`,
		Args: args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			project, name := argv[0], argv[1]
			var r io.Reader = cmd.InOrStdin()
			if file != "" {
				f, err := os.Open(file)
				if err != nil {
					return fmt.Errorf("put: %w", err)
				}
				defer f.Close()
				r = f
			}
			value, err := io.ReadAll(io.LimitReader(r, pgstore.MaxValueLen+1))
			if err != nil {
				return fmt.Errorf("put: read value: %w", err)
			}
			defer clear(value)
			if len(value) > pgstore.MaxValueLen {
				return usageErrorf("put: value is larger than %d bytes", pgstore.MaxValueLen)
			}
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			if !dryRun {
				if err := s.store.Put(cmd.Context(), project, name, value); err != nil {
					return err
				}
				a.log.Info("stored secret", "project", project, "name", name, "bytes", len(value))
			}
			res := struct {
				Project string `json:"project"`
				Name    string `json:"name"`
				Bytes   int    `json:"bytes"`
				DryRun  bool   `json:"dry_run"`
			}{project, name, len(value), dryRun}
			return a.emit(res, func(w io.Writer) {
				if dryRun {
					fmt.Fprintf(w, "dry run: would store %s/%s (%d bytes)\n", project, name, len(value))
				} else {
					fmt.Fprintf(w, "stored %s/%s (%d bytes)\n", project, name, len(value))
				}
			})
		},
	}
	cmd.Flags().StringVar(&file, "from-file", "", "read the value from this file instead of stdin")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "check everything, store nothing")
	return cmd
}

func newGetCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "get PROJECT NAME",
		Short: "Decrypt a secret and print its value to stdout",
		Long: `get prints the secret's value to stdout, exactly, with no newline added.
With --json it prints {"project", "name", "value_base64"}. The value is never
logged.`,
		Args: args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			value, err := s.store.Get(cmd.Context(), argv[0], argv[1])
			if err != nil {
				return err
			}
			defer clear(value)
			if a.json {
				return a.emit(struct {
					Project string `json:"project"`
					Name    string `json:"name"`
					Value   string `json:"value_base64"`
				}{argv[0], argv[1], base64.StdEncoding.EncodeToString(value)}, nil)
			}
			_, err = a.stdout.Write(value)
			return err
		},
	}
}

func newDeleteCmd(a *app) *cobra.Command {
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "delete PROJECT NAME",
		Short: "Delete a secret",
		Args:  args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			project, name := argv[0], argv[1]
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			if dryRun {
				list, err := s.store.List(cmd.Context(), project)
				if err != nil {
					return err
				}
				if !slices.ContainsFunc(list, func(si pgstore.SecretInfo) bool { return si.Name == name }) {
					return fmt.Errorf("%w: %q in project %q", pgstore.ErrNotFound, name, project)
				}
			} else {
				if err := s.store.Delete(cmd.Context(), project, name); err != nil {
					return err
				}
				a.log.Info("deleted secret", "project", project, "name", name)
			}
			res := struct {
				Project string `json:"project"`
				Name    string `json:"name"`
				DryRun  bool   `json:"dry_run"`
			}{project, name, dryRun}
			return a.emit(res, func(w io.Writer) {
				if dryRun {
					fmt.Fprintf(w, "dry run: would delete %s/%s\n", project, name)
				} else {
					fmt.Fprintf(w, "deleted %s/%s\n", project, name)
				}
			})
		},
	}
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "check the secret exists, delete nothing")
	return cmd
}

func newListCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "list PROJECT",
		Short: "List a project's secrets (names and data keys, never values)",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			list, err := s.store.List(cmd.Context(), argv[0])
			if err != nil {
				return err
			}
			type item struct {
				Name      string    `json:"name"`
				DataKeyID string    `json:"data_key_id"`
				CreatedAt time.Time `json:"created_at"`
				UpdatedAt time.Time `json:"updated_at"`
			}
			out := struct {
				Project string `json:"project"`
				Secrets []item `json:"secrets"`
			}{Project: argv[0], Secrets: []item{}}
			for _, si := range list {
				out.Secrets = append(out.Secrets, item{si.Name, uuidString(si.DataKeyID), si.CreatedAt.UTC(), si.UpdatedAt.UTC()})
			}
			return a.emit(out, func(w io.Writer) {
				for _, it := range out.Secrets {
					fmt.Fprintf(w, "%s\t%s\t%s\n", it.Name, it.DataKeyID, it.UpdatedAt.Format(time.RFC3339))
				}
			})
		},
	}
}

func uuidString(id [16]byte) string {
	h := hex.EncodeToString(id[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
