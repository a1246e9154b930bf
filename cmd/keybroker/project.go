package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func newProjectCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "project",
		Short: "Project lifecycle: delete (crypto-shred) or reopen a project; bind it to a KEK of its own",
		Long: `project delete crypto-shreds a project and project reopen lets its id be
used again (see each command).

project set-kek binds a project to its own KEK: a provider URL (a
customer's AWS KMS or Cloud KMS key; vault only when --tenant-kek-schemes
allows it; never local) that wraps the project's own chain of intermediate
keys, which wrap its data keys. Disabling or revoking that key makes the
project's reads fail with a key-disabled or access-denied error while every
other project keeps working; destroying it crypto-shreds the project (see
docs/SECURITY.md, Per-project KEKs). unset-kek returns the project to the
deployment's KEK. Both are audited (key_events) and then rewrap the data
keys, without re-encrypting any secret; show prints the binding.`,
		Args: args(cobra.NoArgs),
	}
	cmd.AddCommand(newProjectDeleteCmd(a), newProjectReopenCmd(a), newSetKEKCmd(a), newUnsetKEKCmd(a), newShowKEKCmd(a))
	return cmd
}

func newProjectDeleteCmd(a *app) *cobra.Command {
	var dryRun, yes bool
	cmd := &cobra.Command{
		Use:   "delete PROJECT",
		Short: "Crypto-shred a project: destroy all its data keys and secrets",
		Long: `delete destroys every data key of PROJECT (active, spent and retired) and
every secret keybroker stores for it, in one transaction, and records one
project.shred event in key_events with the counts. Values an application
sealed into its own tables under those data keys can no longer be opened.
The project id then refuses new data keys (a racing or later write fails)
until "keybroker project reopen". It cannot be undone; it needs --yes.

Old database backups still hold the wrapped data keys: see docs/SECURITY.md
for what they can decrypt, and until when.

Exit codes: 0 shredded (also when there was nothing to shred); 1 error,
nothing changed; 2 usage (no --yes, a bad project id).`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			project := argv[0]
			if !dryRun && !yes {
				return usageErrorf("project delete: destroying project %q cannot be undone: pass --yes (or --dry-run)", project)
			}
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			res := struct {
				Project         string `json:"project"`
				DataKeys        int64  `json:"data_keys"`
				Secrets         int64  `json:"secrets"`
				AlreadyShredded bool   `json:"already_shredded"`
				DryRun          bool   `json:"dry_run"`
			}{Project: project, DryRun: dryRun}
			if dryRun {
				p, err := s.store.PreviewShred(cmd.Context(), project)
				if err != nil {
					return err
				}
				res.DataKeys, res.Secrets, res.AlreadyShredded = p.DataKeys, p.Secrets, p.Shredded
			} else {
				r, err := s.store.ShredProject(cmd.Context(), project)
				if err != nil {
					return err
				}
				res.DataKeys, res.Secrets = r.DataKeys, r.Secrets
				a.log.Info("shredded project", "project", project, "data_keys", r.DataKeys, "secrets", r.Secrets)
			}
			return a.emit(res, func(w io.Writer) {
				switch {
				case dryRun && res.AlreadyShredded:
					fmt.Fprintf(w, "dry run: project %s is already shredded; would destroy %d data keys and %d secrets\n", project, res.DataKeys, res.Secrets)
				case dryRun:
					fmt.Fprintf(w, "dry run: would destroy %d data keys and %d secrets of project %s\n", res.DataKeys, res.Secrets, project)
				default:
					fmt.Fprintf(w, "shredded project %s: destroyed %d data keys and %d secrets\n", project, res.DataKeys, res.Secrets)
				}
			})
		},
	}
	cmd.Flags().BoolVar(&yes, "yes", false, "confirm: destroy the project's keys and secrets")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "count what would be destroyed, change nothing")
	return cmd
}

func newProjectReopenCmd(a *app) *cobra.Command {
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "reopen PROJECT",
		Short: "Let a shredded project id take new data keys again",
		Long: `reopen lifts the tombstone "project delete" left, so writes to PROJECT
create data keys again, and records a project.reopen event. Nothing that was
shredded comes back.

Exit codes: 0 reopened, or the project was not shredded (the message says
which); 1 error; 2 usage.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			project := argv[0]
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			var reopened bool
			if dryRun {
				p, err := s.store.PreviewShred(cmd.Context(), project)
				if err != nil {
					return err
				}
				reopened = p.Shredded
			} else if reopened, err = s.store.ReopenProject(cmd.Context(), project); err != nil {
				return err
			}
			res := struct {
				Project  string `json:"project"`
				Reopened bool   `json:"reopened"`
				DryRun   bool   `json:"dry_run"`
			}{project, reopened, dryRun}
			return a.emit(res, func(w io.Writer) {
				switch {
				case dryRun && reopened:
					fmt.Fprintf(w, "dry run: would reopen project %s\n", project)
				case reopened:
					fmt.Fprintf(w, "reopened project %s\n", project)
				default:
					fmt.Fprintf(w, "project %s is not shredded; nothing to reopen\n", project)
				}
			})
		},
	}
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "report whether the project is shredded, change nothing")
	return cmd
}
