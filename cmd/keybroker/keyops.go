package main

import (
	"context"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/spf13/cobra"
)

// rewrapResult is rewrap's output, and part of rotate's.
type rewrapResult struct {
	Primary   string         `json:"primary"`
	Pending   map[string]int `json:"pending"` // data keys not under primary, by version, before the run
	Rewrapped int64          `json:"rewrapped"`
	DryRun    bool           `json:"dry_run"`
}

// rewrap rewraps every data key not under the primary KEK version, with
// progress.
func (a *app) rewrap(ctx context.Context, s *session, batch int, dryRun bool) (*rewrapResult, error) {
	p := a.newProgress("rewrap", -1)
	res, err := s.store.Rewrap(ctx, pgstore.RewrapOptions{
		BatchSize: batch,
		DryRun:    dryRun,
		Progress:  func(pr pgstore.RewrapProgress) { p.set(pr.Done, pr.Total) },
	})
	p.finish()
	if err != nil {
		return nil, err
	}
	out := &rewrapResult{Primary: res.Primary.String(), Pending: map[string]int{}, Rewrapped: res.Rewrapped, DryRun: dryRun}
	for _, vc := range res.Pending {
		out.Pending[vc.KEKVersion.String()] = int(vc.DataKeys)
	}
	if !dryRun {
		a.log.Info("rewrapped data keys", "to", out.Primary, "count", res.Rewrapped)
	}
	return out, nil
}

func (r *rewrapResult) print(w io.Writer) {
	pending := 0
	for _, n := range r.Pending {
		pending += n
	}
	if r.DryRun {
		fmt.Fprintf(w, "dry run: would rewrap %d data keys to %s\n", pending, r.Primary)
		return
	}
	fmt.Fprintf(w, "rewrapped %d data keys to %s\n", r.Rewrapped, r.Primary)
}

func newRewrapCmd(a *app) *cobra.Command {
	var batch int
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "rewrap",
		Short: "Rewrap every data key not under the primary KEK version",
		Long: `rewrap re-encrypts each data key wrapped under an older KEK version, or
under a decrypt-only provider, to the primary KEK's current version. Secrets
are not touched. Each batch commits on its own: an interrupted run leaves
every data key usable, and a rerun continues where it stopped.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			res, err := a.rewrap(cmd.Context(), s, batch, dryRun)
			if err != nil {
				return err
			}
			return a.emit(res, res.print)
		},
	}
	cmd.Flags().IntVar(&batch, "batch", 0, "data keys per transaction (default 500)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "count what would be rewrapped, change nothing")
	return cmd
}

func newRotateCmd(a *app) *cobra.Command {
	var batch int
	var dryRun, retire bool
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Rotate the primary KEK to a new version, then rewrap every data key",
		Long: `rotate asks the primary KEK's key service for a new key version, then
rewraps every data key to it (see rewrap). With --retire it then retires
the previous version, which the key service will no longer use; keybroker
refuses if any data key still needs it. A provider that cannot rotate from
here (rotate it in the key service instead, then run rewrap) is an error.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			s, err := a.openStore(ctx)
			if err != nil {
				return err
			}
			defer s.close()
			prev, err := s.store.PrimaryVersion(ctx)
			if err != nil {
				return err
			}
			out := struct {
				From     string        `json:"from"`
				To       string        `json:"to,omitempty"`
				DataKeys int64         `json:"data_keys,omitempty"` // dry run: data keys a rotation would rewrap
				Rewrap   *rewrapResult `json:"rewrap,omitempty"`
				Retired  string        `json:"retired,omitempty"`
				DryRun   bool          `json:"dry_run"`
			}{From: prev.String(), DryRun: dryRun}
			if dryRun {
				if out.DataKeys, err = s.countDataKeys(ctx); err != nil {
					return err
				}
				return a.emit(out, func(w io.Writer) {
					fmt.Fprintf(w, "dry run: would rotate %s to a new version and rewrap %d data keys\n", prev, out.DataKeys)
				})
			}
			next, err := s.store.RotateKEK(ctx)
			if err != nil {
				return err
			}
			out.To = next.String()
			a.log.Info("rotated KEK", "from", prev.String(), "to", next.String())
			if out.Rewrap, err = a.rewrap(ctx, s, batch, false); err != nil {
				// Rerunning rotate would make yet another version.
				return &hintError{hint: "rotated to " + next.String() + "; run keybroker rewrap to finish", err: err}
			}
			if retire {
				if err := s.store.RetireKEK(ctx, prev); err != nil {
					return err
				}
				out.Retired = prev.String()
				a.log.Info("retired KEK version", "version", prev.String())
			}
			return a.emit(out, func(w io.Writer) {
				fmt.Fprintf(w, "rotated %s to %s\n", prev, next)
				out.Rewrap.print(w)
				if out.Retired != "" {
					fmt.Fprintf(w, "retired %s\n", out.Retired)
				}
			})
		},
	}
	cmd.Flags().IntVar(&batch, "batch", 0, "data keys per transaction (default 500)")
	cmd.Flags().BoolVar(&retire, "retire", false, "retire the previous version after the rewrap")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "report what would happen, change nothing")
	return cmd
}

// countDataKeys counts the data keys a rotation would rewrap: every one
// that still has a wrapped form.
func (s *session) countDataKeys(ctx context.Context) (int64, error) {
	var n int64
	if err := s.pool.QueryRow(ctx, "SELECT count(*) FROM "+pgx.Identifier{s.store.Schema(), "data_keys"}.Sanitize()+" WHERE wrapped_dek IS NOT NULL").Scan(&n); err != nil {
		return 0, fmt.Errorf("count data keys: %w", err)
	}
	return n, nil
}

func newReencryptCmd(a *app) *cobra.Command {
	var batch int
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "reencrypt PROJECT",
		Short: "Re-encrypt a project's secrets under a fresh data key",
		Long: `reencrypt gives PROJECT a fresh data key, for when its data key may have
been exposed: it retires the project's data keys, re-encrypts every secret
under the new one (checking each decrypts to the same bytes before writing
it), and then destroys the retired keys. Batches commit on their own; after
an interruption a rerun resumes with the same fresh key.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			ctx := cmd.Context()
			project := argv[0]
			s, err := a.openStore(ctx)
			if err != nil {
				return err
			}
			defer s.close()
			// Retired keys left behind mean an earlier run was interrupted:
			// continue it rather than start over with yet another key.
			var resume bool
			if err := pgstore.WithProject(ctx, s.pool, project, func(tx pgx.Tx) error {
				return tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM "+pgx.Identifier{s.store.Schema(), "data_keys"}.Sanitize()+
					" WHERE project_id = $1 AND state = 'retired')", project).Scan(&resume)
			}); err != nil {
				return fmt.Errorf("reencrypt: %w", err)
			}
			if resume {
				a.log.Info("resuming an interrupted re-encryption", "project", project)
			}
			p := a.newProgress("reencrypt", -1)
			res, err := s.store.Reencrypt(ctx, project, pgstore.ReencryptOptions{
				BatchSize: batch,
				DryRun:    dryRun,
				Resume:    resume,
				Progress:  func(pr pgstore.ReencryptProgress) { p.set(pr.Done, pr.Total) },
			})
			p.finish()
			if err != nil {
				return err
			}
			out := struct {
				Project       string `json:"project"`
				Pending       int64  `json:"pending"`
				Reencrypted   int64  `json:"reencrypted"`
				RetiredKeys   int64  `json:"retired_keys"`
				DestroyedKeys int64  `json:"destroyed_keys"`
				RemainingKeys int64  `json:"remaining_keys"`
				Resumed       bool   `json:"resumed"`
				DryRun        bool   `json:"dry_run"`
			}{project, res.Pending, res.Reencrypted, res.RetiredKeys, res.DestroyedKeys, res.RemainingKeys, resume, dryRun}
			return a.emit(out, func(w io.Writer) {
				if dryRun {
					fmt.Fprintf(w, "dry run: would re-encrypt %d secrets of %s under a fresh data key\n", res.Pending, project)
					return
				}
				fmt.Fprintf(w, "re-encrypted %d secrets of %s under a fresh data key; destroyed %d old data keys\n", res.Reencrypted, project, res.DestroyedKeys)
				if res.RemainingKeys > 0 {
					fmt.Fprintf(w, "%d old data keys are still in use (rows busy): rerun to finish\n", res.RemainingKeys)
				}
			})
		},
	}
	cmd.Flags().IntVar(&batch, "batch", 0, "secrets per transaction (default 500)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "count what would be re-encrypted, change nothing")
	return cmd
}
