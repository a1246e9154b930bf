package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
)

// redactURL is a provider URL fit for output: query values and user
// information replaced.
func redactURL(raw string) string {
	u, err := provider.ParseURL(raw)
	if err != nil {
		return "(malformed)"
	}
	return provider.Redact(u)
}

type projectKEKResult struct {
	Project string     `json:"project"`
	Bound   bool       `json:"bound"`
	KEK     string     `json:"kek,omitempty"` // the URL, query values redacted
	Chain   string     `json:"chain,omitempty"`
	BoundAt *time.Time `json:"bound_at,omitempty"`
	// Set by set-kek and unset-kek, which rewrap (unless --no-rewrap).
	Rewrap *rewrapResult `json:"rewrap,omitempty"`
	DryRun bool          `json:"dry_run,omitempty"`
}

func newProjectKEKResult(b pgstore.ProjectKEK, bound bool) *projectKEKResult {
	r := &projectKEKResult{Project: b.Project, Bound: bound}
	if bound {
		t := b.BoundAt
		r.KEK, r.Chain, r.BoundAt = redactURL(b.URL), b.Chain, &t
	}
	return r
}

func (r *projectKEKResult) print(w io.Writer) {
	switch {
	case r.DryRun && r.Bound:
		fmt.Fprintf(w, "dry run: would bind project %q to its own KEK %s\n", r.Project, r.KEK)
	case r.DryRun:
		fmt.Fprintf(w, "dry run: would unbind project %q from its own KEK\n", r.Project)
	case r.Bound:
		fmt.Fprintf(w, "project %q: own KEK %s (chain %s, bound %s)\n", r.Project, r.KEK, r.Chain, r.BoundAt.UTC().Format(time.RFC3339))
	default:
		fmt.Fprintf(w, "project %q: the deployment's KEK\n", r.Project)
	}
	if r.Rewrap != nil {
		r.Rewrap.print(w)
	}
}

func newSetKEKCmd(a *app) *cobra.Command {
	var dryRun bool
	rw := &bindingRewrap{}
	cmd := &cobra.Command{
		Use:   "set-kek PROJECT URL",
		Short: "Bind PROJECT to its own KEK at URL and rewrap its data keys under it",
		Long: `set-kek checks that URL may be a project's KEK (scheme allowed by
--tenant-kek-schemes, no local keyring, no parameter naming a file), opens
it, wraps and unwraps a throwaway key with it, records the binding with a
project.kek.set event and then runs rewrap, which moves the project's data
keys under its own chain (resumable: rerun rewrap if interrupted). Binding
to the URL the project is bound to already changes nothing. Needs the
tables' owner role. Exit status 5 while data keys remain to move.`,
		Args: args(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			ctx := cmd.Context()
			project, url := argv[0], argv[1]
			if err := pgstore.CheckTenantKEKURL(url, a.cfg.TenantKEKSchemes); err != nil {
				return &codeError{code: exitUsage, err: err}
			}
			s, err := a.openStore(ctx)
			if err != nil {
				return err
			}
			defer s.close()
			if dryRun {
				res := newProjectKEKResult(pgstore.ProjectKEK{Project: project, URL: url}, true)
				res.DryRun = true
				return a.emit(res, res.print)
			}
			b, err := s.store.SetProjectKEK(ctx, project, url)
			if err != nil {
				if errors.Is(err, pgstore.ErrInvalidArgument) || errors.Is(err, pgstore.ErrTenantKEKRefused) {
					return &codeError{code: exitUsage, err: err}
				}
				return err
			}
			return a.rewrapBinding(ctx, s, newProjectKEKResult(b, true), "bound", rw)
		},
	}
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "check the URL, change nothing")
	rw.flags(cmd, "record the binding only; run keybroker rewrap later")
	return cmd
}

func newUnsetKEKCmd(a *app) *cobra.Command {
	var dryRun bool
	rw := &bindingRewrap{}
	cmd := &cobra.Command{
		Use:   "unset-kek PROJECT",
		Short: "Return PROJECT to the deployment's KEK and rewrap its data keys back",
		Long: `unset-kek removes the project's binding (a project.kek.unset event) and
runs rewrap, which moves its data keys back under the deployment's chain;
that needs the project's own KEK once more. Its chain stays recorded, so the
data keys keep unwrapping until rewrap has moved them. Needs the tables'
owner role.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			ctx := cmd.Context()
			s, err := a.openStore(ctx)
			if err != nil {
				return err
			}
			defer s.close()
			project := argv[0]
			if dryRun {
				b, bound, err := s.store.ProjectKEK(ctx, project)
				if err != nil {
					return err
				}
				if !bound {
					return fmt.Errorf("project %q is not bound to a KEK of its own", project)
				}
				res := newProjectKEKResult(b, false)
				res.DryRun = true
				return a.emit(res, res.print)
			}
			if err := s.store.UnsetProjectKEK(ctx, project); err != nil {
				return err
			}
			return a.rewrapBinding(ctx, s, &projectKEKResult{Project: project}, "unbound", rw)
		},
	}
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "show what would change, change nothing")
	rw.flags(cmd, "remove the binding only; run keybroker rewrap later")
	return cmd
}

// bindingRewrap is the rewrap set-kek and unset-kek run after changing a
// binding, and its flags.
type bindingRewrap struct {
	batch    int
	skip     bool
	lockWait time.Duration
}

func (rw *bindingRewrap) flags(cmd *cobra.Command, skipHelp string) {
	cmd.Flags().IntVar(&rw.batch, "batch", 0, batchHelp)
	cmd.Flags().BoolVar(&rw.skip, "no-rewrap", false, skipHelp)
	cmd.Flags().DurationVar(&rw.lockWait, "lock-wait", pgstore.DefaultLockWait, "how long rewrap waits for a data key another process holds locked")
}

// rewrapBinding runs rw's rewrap (unless --no-rewrap) after res's binding
// changed (what: "bound" or "unbound"), prints res, and returns exit
// status 5 while data keys remain to move.
func (a *app) rewrapBinding(ctx context.Context, s *session, res *projectKEKResult, what string, rw *bindingRewrap) error {
	if !rw.skip {
		var err error
		if res.Rewrap, err = a.rewrap(ctx, s, rw.batch, rw.lockWait, false); err != nil {
			return fmt.Errorf("%s project %q; rewrap: %w (rerun keybroker rewrap)", what, res.Project, err)
		}
	}
	if err := a.emit(res, res.print); err != nil {
		return err
	}
	if res.Rewrap != nil {
		return res.Rewrap.incomplete()
	}
	return nil
}

func newShowKEKCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "show PROJECT",
		Short: "Show which KEK wraps PROJECT's data keys",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			b, bound, err := s.store.ProjectKEK(cmd.Context(), argv[0])
			if err != nil {
				return err
			}
			res := newProjectKEKResult(b, bound)
			return a.emit(res, res.print)
		},
	}
}

type recoveryResult struct {
	Recovery         string `json:"recovery"` // the recovery key, provider:key_id
	Done             int    `json:"done"`
	Already          int    `json:"already"`
	IntermediateKeys int    `json:"intermediate_keys"`
	DirectDataKeys   int64  `json:"direct_data_keys,omitempty"`
	recover          bool
}

func (r *recoveryResult) print(w io.Writer) {
	if r.recover {
		fmt.Fprintf(w, "recovered %d of %d intermediate keys with %s under the new primary KEK (%d needed nothing)\n", r.Done, r.IntermediateKeys, r.Recovery, r.Already)
		if r.DirectDataKeys > 0 {
			fmt.Fprintf(w, "warning: %d data keys are wrapped directly under a KEK, not under an intermediate key: recovery wraps do not cover them\n", r.DirectDataKeys)
		}
		return
	}
	fmt.Fprintf(w, "wrapped %d intermediate keys under recovery key %s (%d of %d had a wrap already)\n", r.Done, r.Recovery, r.Already, r.IntermediateKeys)
}

func newRecoveryCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "recovery",
		Short: "Manage recovery (break-glass) wraps of the intermediate keys",
	}
	var url string
	add := &cobra.Command{
		Use:   "add --recovery URL",
		Short: "Wrap every intermediate key under the recovery key URL as well",
		Long: `recovery add wraps each of the deployment's intermediate keys that has
no wrap under the recovery key yet (an offline keyring kept in a safe, say
local:///mnt/safe/recovery.json, or a KMS key in another account or region)
under it as well, checks each wrap unwraps, and records it in the database
(intermediate_key_recovery, an ik.recovery.add event each). One call to the
KEK and two to the recovery key per intermediate key, whatever the number
of data keys. Resumable: rerun after an interruption. Intermediate keys made
by later rotations are not covered until it runs again: status warns.
Projects bound to their own KEK are not covered, on purpose.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withRecovery(cmd.Context(), "recovery add", url, func(ctx context.Context, s *session, rec provider.KEKProvider) (*recoveryResult, error) {
				r, err := s.store.AddRecovery(ctx, rec)
				return &recoveryResult{Done: r.Done, Already: r.Already, IntermediateKeys: r.Total}, err
			})
		},
	}
	add.Flags().StringVar(&url, "recovery", "", "recovery provider URL")
	cmd.AddCommand(add)
	return cmd
}

func newRecoverCmd(a *app) *cobra.Command {
	var url string
	cmd := &cobra.Command{
		Use:   "recover --recovery URL",
		Short: "Restore service after the primary KEK is lost, from a recovery key",
		Long: `recover is the break-glass step of docs/OPERATIONS.md (Recovering from a
lost KEK). Run it with --kek naming the new primary KEK (keep the lost one
in --kek-decrypt-only if it may still answer) and --recovery naming the
recovery key: every intermediate key the keyring cannot unwrap is unwrapped
from its recovery wrap and wrapped under the new primary (an ik.recover
event each). Data keys and secrets are not touched. Resumable: rerun after
an interruption. Data keys wrapped directly under the lost KEK (no
intermediate key) cannot be recovered; the output counts them.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withRecovery(cmd.Context(), "recover", url, func(ctx context.Context, s *session, rec provider.KEKProvider) (*recoveryResult, error) {
				r, err := s.store.Recover(ctx, rec)
				return &recoveryResult{Done: r.Done, Already: r.Already, IntermediateKeys: r.Total, DirectDataKeys: r.DirectDataKeys, recover: true}, err
			})
		},
	}
	cmd.Flags().StringVar(&url, "recovery", "", "recovery provider URL")
	return cmd
}

// withRecovery opens the recovery key url (--recovery, required: usage
// error naming command) and the store, runs do and prints its result.
func (a *app) withRecovery(ctx context.Context, command, url string, do func(context.Context, *session, provider.KEKProvider) (*recoveryResult, error)) error {
	if url == "" {
		return usageErrorf("%s: --recovery URL is required", command)
	}
	rec, err := openProvider(ctx, url)
	if err != nil {
		return err
	}
	s, err := a.openStore(ctx)
	if err != nil {
		return err
	}
	defer s.close()
	res, err := do(ctx, s, rec)
	if err != nil {
		return err
	}
	res.Recovery = rec.Ref().String()
	return a.emit(res, res.print)
}
