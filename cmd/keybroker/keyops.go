package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/spf13/cobra"
)

// rewrapResult is rewrap's output, and part of rotate's.
type rewrapResult struct {
	Primary string `json:"primary"`
	// IntermediateKeys counts the intermediate keys rewrapped to the
	// primary KEK version (the key hierarchy).
	IntermediateKeys int            `json:"intermediate_keys"`
	Pending          map[string]int `json:"pending"` // data keys not under primary, by version, before the run
	Rewrapped        int64          `json:"rewrapped"`
	ProjectKEKs      int64          `json:"project_keks"` // of Rewrapped, moved to projects' own KEKs' chains
	Skipped          int64          `json:"skipped"`      // held by another transaction for longer than --lock-wait
	Corrupt          []corruptKey   `json:"corrupt"`      // did not unwrap; left as they are
	Remaining        int64          `json:"remaining"`    // not under primary when the run ended, recounted
	DryRun           bool           `json:"dry_run"`
}

type corruptKey struct {
	Project   string `json:"project"`
	DataKeyID string `json:"data_key_id"`
	Version   string `json:"version"`
}

// rewrap rewraps every data key not under the primary KEK version, with
// progress.
func (a *app) rewrap(ctx context.Context, s *session, batch int, lockWait time.Duration, dryRun bool) (*rewrapResult, error) {
	p := a.newProgress("rewrap", -1)
	p.unit = "data keys"
	res, err := s.store.Rewrap(ctx, pgstore.RewrapOptions{
		BatchSize: batch,
		DryRun:    dryRun,
		LockWait:  lockWait,
		Progress:  func(pr pgstore.RewrapProgress) { p.set(pr.Done, pr.Total) },
	})
	p.finish()
	if err != nil {
		return nil, err
	}
	out := &rewrapResult{Primary: res.Primary.String(), IntermediateKeys: res.IntermediateKeys, Pending: map[string]int{}, Rewrapped: res.Rewrapped, ProjectKEKs: res.ProjectKEKs,
		Skipped: res.Skipped, Corrupt: []corruptKey{}, Remaining: res.Remaining, DryRun: dryRun}
	for _, vc := range res.Pending {
		out.Pending[vc.KEKVersion.String()] = int(vc.DataKeys)
	}
	for _, c := range res.Corrupt {
		out.Corrupt = append(out.Corrupt, corruptKey{Project: c.Project, DataKeyID: uuidString(c.DataKeyID), Version: c.KEKVersion.String()})
	}
	if !dryRun {
		a.log.Info("rewrapped data keys", "to", out.Primary, "count", res.Rewrapped, "remaining", res.Remaining)
	}
	return out, nil
}

func (r *rewrapResult) print(w io.Writer) {
	if r.DryRun {
		fmt.Fprintf(w, "dry run: would rewrap %d data keys to %s\n", r.Remaining, r.Primary)
		return
	}
	if r.IntermediateKeys > 0 {
		fmt.Fprintf(w, "rewrapped %d intermediate keys to the primary KEK version\n", r.IntermediateKeys)
	}
	if r.ProjectKEKs > 0 {
		fmt.Fprintf(w, "rewrapped %d data keys to %s and %d to projects' own KEKs\n", r.Rewrapped-r.ProjectKEKs, r.Primary, r.ProjectKEKs)
	} else {
		fmt.Fprintf(w, "rewrapped %d data keys to %s\n", r.Rewrapped, r.Primary)
	}
	for _, c := range r.Corrupt {
		fmt.Fprintf(w, "corrupt data key %s of project %q (under %s) does not unwrap; left as it is\n", c.DataKeyID, c.Project, c.Version)
	}
	if r.Skipped > 0 {
		fmt.Fprintf(w, "skipped %d data keys locked by another process\n", r.Skipped)
	}
	if r.Remaining > 0 {
		fmt.Fprintf(w, "%d data keys remain on older versions\n", r.Remaining)
	}
}

// incomplete returns the exitIncomplete error for a run that left data
// keys on older versions, nil otherwise.
func (r *rewrapResult) incomplete() error {
	if r.DryRun || r.Remaining == 0 {
		return nil
	}
	return incomplete("rewrap: %d data keys remain on older versions (%d locked by another process, %d corrupt): rerun, or use --lock-wait; see docs/OPERATIONS.md for corrupt keys",
		r.Remaining, r.Skipped, len(r.Corrupt))
}

const batchHelp = "data keys per transaction (default 1000, pgstore.DefaultBatchSize)"

func newRewrapCmd(a *app) *cobra.Command {
	var batch int
	var dryRun bool
	var lockWait time.Duration
	cmd := &cobra.Command{
		Use:   "rewrap",
		Short: "Rewrap every data key not under the primary KEK version",
		Long: `rewrap first rewraps the intermediate keys (the key hierarchy) not under the
primary KEK's current version to it: one key-service call each. It then
re-encrypts each data key not under the current intermediate key (or, with
--direct-kek, the primary KEK's current version) to it: locally from an older
intermediate key, else through the key service (data keys wrapped directly
under a KEK, by a database from before the hierarchy). Secrets are not
touched. Each batch commits on its own: an interrupted run leaves
every data key usable, and a rerun continues where it stopped. Several
rewraps may run at once (a data key another one is rewrapping is left to
it); a batch waits up to --lock-wait for a data key another transaction
holds locked (a reencrypt, a shred, a dead process's open transaction),
then leaves it and counts it as skipped. A data key that does not unwrap is
reported as corrupt and left alone; the others are rewrapped.

Exit status 5 while any data key remains on an older version (skipped,
corrupt, or wrapped meanwhile by a process with an old configuration).`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			res, err := a.rewrap(cmd.Context(), s, batch, lockWait, dryRun)
			if err != nil {
				return err
			}
			if err := a.emit(res, res.print); err != nil {
				return err
			}
			return res.incomplete()
		},
	}
	cmd.Flags().IntVar(&batch, "batch", 0, batchHelp)
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "count what would be rewrapped, change nothing")
	cmd.Flags().DurationVar(&lockWait, "lock-wait", pgstore.DefaultLockWait, "how long to wait for a data key another process holds locked")
	return cmd
}

func newRotateCmd(a *app) *cobra.Command {
	var batch int
	var dryRun, retire, intermediate bool
	var lockWait time.Duration
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Rotate the primary KEK to a new version, then rewrap every data key",
		Long: `rotate asks the primary KEK's key service for a new key version, then
rewraps to it (see rewrap) the intermediate keys — or, with --direct-kek,
every data key. With --intermediate it makes a new intermediate key version
instead (one key-service call) and rewraps every data key to it locally. With --retire it then retires
the previous version, which the key service will no longer use; keybroker
refuses if any data key still needs it. A provider that cannot rotate from
here (rotate it in the key service instead, then run rewrap) is an error.

Once the rotation has committed, a failure later on exits 5 and says what
committed and what to run to finish (rewrap, or retire VERSION): do not
rerun rotate, which would make yet another version.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			s, err := a.openStore(ctx)
			if err != nil {
				return err
			}
			defer s.close()
			// Without --intermediate the deployment's KEK rotates (with the
			// key hierarchy the rewrap then moves the intermediate keys, not
			// the data keys); with it, the intermediate key does.
			primaryVersion := s.store.KEKPrimaryVersion
			if intermediate {
				primaryVersion = s.store.PrimaryVersion
			}
			prev, err := primaryVersion(ctx)
			if err != nil {
				return err
			}
			out := struct {
				From     string        `json:"from"`
				To       string        `json:"to,omitempty"`
				DataKeys int64         `json:"data_keys,omitempty"` // dry run: data keys a rotation would rewrap
				Rewrap   *rewrapResult `json:"rewrap,omitempty"`
				Retired  string        `json:"retired,omitempty"`
				Retire   bool          `json:"retire"` // --retire was given
				DryRun   bool          `json:"dry_run"`
			}{From: prev.String(), Retire: retire, DryRun: dryRun}
			if dryRun {
				if out.DataKeys, err = s.countDataKeys(ctx); err != nil {
					return err
				}
				return a.emit(out, func(w io.Writer) {
					fmt.Fprintf(w, "dry run: would rotate %s to a new version and rewrap %d data keys", prev, out.DataKeys)
					if retire {
						fmt.Fprintf(w, ", then retire %s", prev)
					}
					fmt.Fprintln(w)
				})
			}
			rotate := s.store.RotateKEK
			if intermediate {
				rotate = s.store.RotateIntermediate
			}
			next, err := rotate(ctx)
			if err != nil {
				return err
			}
			out.To = next.String()
			a.log.Info("rotated KEK", "from", prev.String(), "to", next.String())
			if out.Rewrap, err = a.rewrap(ctx, s, batch, lockWait, false); err != nil {
				// Rerunning rotate would make yet another version.
				return &codeError{code: exitIncomplete, err: &hintError{hint: "rotated to " + next.String() + "; run keybroker rewrap to finish", err: err}}
			}
			var finish error
			switch {
			case out.Rewrap.Remaining > 0:
				finish = incomplete("rotated %s to %s and rewrapped %d data keys; %d remain on older versions (%d locked by another process, %d corrupt): run keybroker rewrap%s",
					prev, next, out.Rewrap.Rewrapped, out.Rewrap.Remaining, out.Rewrap.Skipped, len(out.Rewrap.Corrupt), retireHint(retire, prev))
			case retire:
				if err := s.store.RetireKEK(ctx, prev); err != nil {
					finish = incomplete("rotated %s to %s and rewrapped %d data keys; retire failed: %v; run keybroker retire %s", prev, next, out.Rewrap.Rewrapped, err, prev)
					break
				}
				out.Retired = prev.String()
				a.log.Info("retired KEK version", "version", prev.String())
			}
			if err := a.emit(out, func(w io.Writer) {
				fmt.Fprintf(w, "rotated %s to %s\n", prev, next)
				out.Rewrap.print(w)
				if out.Retired != "" {
					fmt.Fprintf(w, "retired %s\n", out.Retired)
				}
			}); err != nil {
				return err
			}
			return finish
		},
	}
	cmd.Flags().IntVar(&batch, "batch", 0, batchHelp)
	cmd.Flags().BoolVar(&retire, "retire", false, "retire the previous version after the rewrap")
	cmd.Flags().BoolVar(&intermediate, "intermediate", false, "rotate the intermediate key (the key hierarchy) instead of the KEK; the rewrap is then local")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "report what would happen, change nothing")
	cmd.Flags().DurationVar(&lockWait, "lock-wait", pgstore.DefaultLockWait, "how long to wait for a data key another process holds locked")
	return cmd
}

func retireHint(retire bool, prev pgstore.KEKVersion) string {
	if !retire {
		return ""
	}
	return ", then keybroker retire " + prev.String()
}

// parseVersion reads a KEK version as status and rotate print it,
// PROVIDER:KEY@VERSION, or a bare VERSION of the primary provider's key.
func parseVersion(arg string, primary provider.KeyRef) (pgstore.KEKVersion, error) {
	at := strings.LastIndexByte(arg, '@')
	if at < 0 {
		if arg == "" {
			return pgstore.KEKVersion{}, usageErrorf("retire: empty version")
		}
		return pgstore.KEKVersion{Provider: primary.Provider, KeyID: primary.KeyID, Version: arg}, nil
	}
	prov, key, ok := strings.Cut(arg[:at], ":")
	if !ok || prov == "" || key == "" || at == len(arg)-1 {
		return pgstore.KEKVersion{}, usageErrorf("retire: version must be PROVIDER:KEY@VERSION (as status prints it) or a version of the primary key")
	}
	return pgstore.KEKVersion{Provider: prov, KeyID: key, Version: arg[at+1:]}, nil
}

func newRetireCmd(a *app) *cobra.Command {
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "retire VERSION",
		Short: "Retire a KEK version no data key uses (finishes an interrupted rotate --retire)",
		Long: `retire retires KEK VERSION, given as status and rotate print it
(local:keybroker@2) or as a bare version of the primary provider's key (2).
It never rotates. It refuses the primary version and a version that still
wraps data keys (run rewrap first). The database records the retirement
first (from then on no process can wrap a new data key under it), then the
key service retires the version. When the second step fails, or an earlier
run was killed between the two, rerunning retire finishes it: exit 5 until
it has.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, argv []string) error {
			ctx := cmd.Context()
			s, err := a.openStore(ctx)
			if err != nil {
				return err
			}
			defer s.close()
			v, err := parseVersion(argv[0], s.store.Keyring().Ref())
			if err != nil {
				return err
			}
			out := struct {
				Version string `json:"version"`
				Retired bool   `json:"retired"`
				DryRun  bool   `json:"dry_run"`
			}{Version: v.String(), DryRun: dryRun}
			if dryRun {
				st, err := s.store.Status(ctx)
				if err != nil {
					return err
				}
				i := slices.IndexFunc(st.Versions, func(vs pgstore.VersionStatus) bool { return vs.KEKVersion == v })
				switch {
				case i < 0:
					return fmt.Errorf("retire: %w: %s", pgstore.ErrUnknownVersion, v)
				case st.Versions[i].DataKeys > 0:
					return &pgstore.InUseError{Provider: v.Provider, KeyID: v.KeyID, Version: v.Version, DataKeys: st.Versions[i].DataKeys}
				}
				return a.emit(out, func(w io.Writer) { fmt.Fprintf(w, "dry run: would retire %s\n", v) })
			}
			if err := s.store.RetireKEK(ctx, v); err != nil {
				return err
			}
			out.Retired = true
			return a.emit(out, func(w io.Writer) { fmt.Fprintf(w, "retired %s\n", v) })
		},
	}
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "check the version could be retired, change nothing")
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
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "reencrypt PROJECT",
		Short: "Re-encrypt a project's secrets under a fresh data key",
		Long: `reencrypt gives PROJECT a fresh data key, for when its data key may have
been exposed: it retires the project's data keys, re-encrypts every secret
under the new one (checking each decrypts to the same bytes before writing
it), and then destroys the retired keys. Services may keep writing
meanwhile: once the retirement commits, no process writes under the old
keys. Batches commit on their own; after an interruption a rerun resumes
with the same fresh key. A project with neither secrets nor data keys is an
error.

Exit status 5 while an old data key is still in use at the end: rerun, or
give --wait to keep trying that long.`,
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
			var resume, exists bool
			if err := pgstore.WithProject(ctx, s.pool, project, func(tx pgx.Tx) error {
				q := pgx.Identifier{s.store.Schema()}.Sanitize()
				return tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM "+q+".data_keys WHERE project_id = $1 AND state = 'retired'), "+
					"EXISTS (SELECT 1 FROM "+q+".data_keys WHERE project_id = $1) OR EXISTS (SELECT 1 FROM "+q+".encrypted_secrets WHERE project_id = $1)",
					project).Scan(&resume, &exists)
			}); err != nil {
				return fmt.Errorf("reencrypt: %w", err)
			}
			if !exists {
				return usageErrorf("reencrypt: project %q has no secrets and no data keys", project)
			}
			if resume {
				a.log.Info("resuming an interrupted re-encryption", "project", project)
			}
			p := a.newProgress("reencrypt", -1)
			res, err := s.store.Reencrypt(ctx, project, pgstore.ReencryptOptions{
				BatchSize: batch,
				DryRun:    dryRun,
				Resume:    resume,
				Wait:      wait,
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
			if err := a.emit(out, func(w io.Writer) {
				if dryRun {
					fmt.Fprintf(w, "dry run: would re-encrypt %d secrets of %s under a fresh data key\n", res.Pending, project)
					return
				}
				fmt.Fprintf(w, "re-encrypted %d secrets of %s under a fresh data key; destroyed %d old data keys\n", res.Reencrypted, project, res.DestroyedKeys)
			}); err != nil {
				return err
			}
			if !dryRun && res.RemainingKeys > 0 {
				return incomplete("reencrypt: %d old data keys of %s are still in use: rerun, or use --wait", res.RemainingKeys, project)
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&batch, "batch", 0, "secrets per transaction (default 1000, pgstore.DefaultBatchSize)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "count what would be re-encrypted, change nothing")
	cmd.Flags().DurationVar(&wait, "wait", 0, "keep trying this long to destroy old data keys still in use")
	return cmd
}
