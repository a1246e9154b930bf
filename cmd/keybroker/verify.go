package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore"
	"github.com/profullstack/keybroker/provider"
	"github.com/spf13/cobra"
)

// verifyWorkers is how many secrets are decrypted at once.
const verifyWorkers = 8

type verifyFailure struct {
	Project string `json:"project"`
	Name    string `json:"name"`
	Error   string `json:"error"` // one line; never secret bytes
}

type verifyResult struct {
	Total    int64           `json:"total"`
	OK       int64           `json:"ok"`
	Failures []verifyFailure `json:"failures"`
}

type secretKey struct{ project, name string }

// verifyAll decrypts every secret in the schema, calling check (if not
// nil) on each value, and reports those that fail by project and name.
// A secret that does not decrypt, or that check rejects, is a failure; an
// unreachable database or key service, or cancellation, aborts the run.
func (a *app) verifyAll(ctx context.Context, s *session, op string, check func(project, name string, value []byte) error) (*verifyResult, error) {
	rows, err := s.pool.Query(ctx, "SELECT project_id, name FROM "+pgx.Identifier{s.store.Schema(), "encrypted_secrets"}.Sanitize()+" ORDER BY project_id, name")
	if err != nil {
		return nil, fmt.Errorf("%s: list secrets: %w", op, err)
	}
	keys, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (k secretKey, err error) {
		err = r.Scan(&k.project, &k.name)
		return k, err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: list secrets: %w", op, err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	jobs := make(chan secretKey)
	type outcome struct {
		k     secretKey
		err   error
		fatal bool
	}
	results := make(chan outcome)
	var wg sync.WaitGroup
	for range verifyWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range jobs {
				v, err := s.store.Get(ctx, k.project, k.name)
				if err == nil && check != nil {
					err = check(k.project, k.name, v)
				}
				clear(v)
				o := outcome{k: k, err: err}
				if err != nil && !secretFailure(err) && !errors.Is(err, pgstore.ErrNotFound) {
					o.fatal = true
				}
				results <- o
			}
		}()
	}
	go func() {
		defer close(jobs)
		for _, k := range keys {
			select {
			case jobs <- k:
			case <-ctx.Done():
				return
			}
		}
	}()
	go func() { wg.Wait(); close(results) }()

	res := &verifyResult{Failures: []verifyFailure{}}
	p := a.newProgress(op, int64(len(keys)))
	var fatal error
	for o := range results {
		switch {
		case o.fatal:
			if fatal == nil {
				fatal = o.err
				cancel()
			}
			continue
		case errors.Is(o.err, pgstore.ErrNotFound):
			// Deleted while we ran: nothing to verify.
		case o.err != nil:
			res.Failures = append(res.Failures, verifyFailure{o.k.project, o.k.name, oneLine(o.err)})
			a.log.Warn("secret failed verification", "project", o.k.project, "name", o.k.name, "err", o.err)
		default:
			res.OK++
		}
		res.Total++
		p.set(res.Total, int64(len(keys)))
	}
	p.finish()
	if fatal != nil {
		return nil, fmt.Errorf("%s: %w", op, fatal)
	}
	slices.SortFunc(res.Failures, func(x, y verifyFailure) int {
		return cmp.Or(strings.Compare(x.Project, y.Project), strings.Compare(x.Name, y.Name))
	})
	return res, nil
}

// secretFailure reports whether err is about one secret (its ciphertext,
// its data key, or a wrong value) rather than about reaching the database
// or key service. A data key row that is missing (pgx.ErrNoRows from the
// lookup; only possible with foreign keys bypassed) is the secret's
// failure too, so that one dangling row does not hide the others.
func secretFailure(err error) bool {
	return errors.Is(err, envelope.ErrDecrypt) ||
		errors.Is(err, pgx.ErrNoRows) ||
		errors.Is(err, provider.ErrInvalidCiphertext) ||
		errors.Is(err, provider.ErrKeyNotFound) ||
		errors.Is(err, provider.ErrKeyDisabled) ||
		errors.Is(err, errMismatch)
}

// errMismatch is what the demo's check returns for a wrong value.
var errMismatch = errors.New("decrypted value differs from the original")

func newVerifyCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "verify",
		Short: "Decrypt every secret and report those that fail (by project and name)",
		Long: `verify decrypts every stored secret and reports, by project and name,
each one that fails, with a one-line reason: a corrupt row, a data key that
no configured KEK can unwrap or whose row is gone, a retired key version.
Every row is checked whatever the others hold. Values are never printed.
Exit status 4 when any secret failed; an unreachable database or key
service stops the run with an error (status 1) instead.`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := a.openStore(cmd.Context())
			if err != nil {
				return err
			}
			defer s.close()
			res, err := a.verifyAll(cmd.Context(), s, "verify", nil)
			if err != nil {
				return err
			}
			if err := a.emit(res, func(w io.Writer) {
				for _, f := range res.Failures {
					fmt.Fprintf(w, "FAILED %s/%s: %s\n", f.Project, f.Name, f.Error)
				}
				fmt.Fprintf(w, "verified %d secrets: %d ok, %d failed\n", res.Total, res.OK, len(res.Failures))
			}); err != nil {
				return err
			}
			if n := len(res.Failures); n > 0 {
				return &codeError{code: exitVerifyFail, err: fmt.Errorf("verify: %d of %d secrets failed to decrypt", n, res.Total)}
			}
			return nil
		},
	}
}
