package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/internal/soak"
	"github.com/profullstack/keybroker/internal/testbin"
)

// operator loops the keybroker CLI as an operator would while the fleet
// runs: rotate, rewrap, reencrypt a random project, retire old versions.
type operator struct {
	o    options
	pool *pgxpool.Pool
	rng  *rand.Rand
	sum  soak.OperatorSummary
	// bound: project 0 is bound to o.tenantKEK (the operator's last
	// set-kek or unset-kek).
	bound bool
}

// runOperator runs rounds until its stdin closes (the test closes it once
// every writer has exited), then one final round with no writer running,
// whose re-encryption is the last one.
func runOperator(ctx context.Context, o options) (*soak.OperatorSummary, error) {
	if o.keybroker == "" {
		return nil, errors.New("-keybroker is required")
	}
	pool, err := openPool(ctx)
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	op := &operator{o: o, pool: pool, rng: rand.New(rand.NewPCG(o.seed, 0)),
		sum: soak.OperatorSummary{Codes: map[string]map[int]int{}, Failures: []soak.Command{}}}
	// `keybroker retire VERSION` is newer than rotate --retire; use it
	// when this build has it.
	op.sum.RetireCommand = op.exec(ctx, "retire", "--help").Code == 0

	stdinClosed := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(stdinClosed) }()
	for round := 0; ; round++ {
		select {
		case <-stdinClosed:
		case <-ctx.Done():
			return nil, ctx.Err()
		default:
			op.round(ctx, round)
			op.sum.Cycles++
			if _, err := pool.Exec(ctx, `UPDATE `+soak.ProgressTable+` SET cycles = $1`, op.sum.Cycles); err != nil {
				return nil, fmt.Errorf("record progress: %w", err)
			}
			continue
		}
		break
	}
	op.round(ctx, -1)
	return &op.sum, ctx.Err()
}

// round is one rotation with everything that follows it. With `keybroker
// retire`, even rounds rotate, rewrap and retire in separate commands and
// odd ones use rotate --retire; without it, every round uses rotate
// --retire, so that every version but the primary gets retired. The final
// round (-1) rotates with --retire and then retires whatever older version
// is left.
func (op *operator) round(ctx context.Context, n int) {
	if op.o.tenantKEK != "" {
		// Writers keep writing to the project while its data keys move
		// between the deployment's chain and its own: bound on even
		// rounds, unbound on odd ones and at the end (round -1; -1%2 is
		// -1 in Go), so the checks after the run read it under the
		// deployment's KEK. A project already unbound is left as it is:
		// unset-kek refuses a project that is not bound (exit 1).
		if bind := n >= 0 && n%2 == 0; bind != op.bound {
			if bind {
				op.untilDone(ctx, "project", "set-kek", soak.Project(0), op.o.tenantKEK)
			} else {
				op.untilDone(ctx, "project", "unset-kek", soak.Project(0))
			}
			op.bound = bind
		}
	}
	if op.sum.RetireCommand && n%2 == 0 {
		op.expect(ctx, op.run(ctx, "rotate"))
	} else {
		op.expect(ctx, op.run(ctx, "rotate", "--retire"))
	}
	op.untilDone(ctx, "rewrap")
	project := soak.Project(op.rng.IntN(op.o.projects))
	op.untilDone(ctx, "reencrypt", project)
	op.retireOld(ctx)
	op.status(ctx)
	if n < 0 {
		op.sum.LastReencrypt = project
	}
}

// expect handles the exit code of a command that must not simply be rerun
// (rotate would make yet another version): 5 means the rotation committed
// and work remains, which a rewrap (and the retire step) finishes.
func (op *operator) expect(ctx context.Context, c soak.Command) {
	if c.Code == soak.ExitIncomplete {
		op.untilDone(ctx, "rewrap")
	}
}

// untilDone runs a command again while it exits 5 (work remains), up to
// soak.MaxReruns times.
func (op *operator) untilDone(ctx context.Context, args ...string) {
	for range soak.MaxReruns {
		if op.run(ctx, args...).Code != soak.ExitIncomplete {
			return
		}
	}
	op.sum.Failures = append(op.sum.Failures, soak.Command{Args: args, Code: soak.ExitIncomplete,
		Stderr: fmt.Sprintf("still exit %d after %d reruns", soak.ExitIncomplete, soak.MaxReruns)})
}

// retireOld retires, oldest first, every version of the primary key that
// status lists as active (older than the primary, not retired), with
// `keybroker retire VERSION` when the CLI has it.
func (op *operator) retireOld(ctx context.Context) {
	if !op.sum.RetireCommand {
		return
	}
	st, ok := op.status(ctx)
	if !ok || len(st.Providers) == 0 {
		return
	}
	p := st.Providers[0]
	var old []int
	for _, v := range st.Versions {
		n, err := strconv.Atoi(v.Version)
		if v.Provider == p.Provider && v.KeyID == p.KeyID && v.State == "active" && err == nil {
			old = append(old, n)
		}
	}
	slices.Sort(old)
	for _, n := range old {
		version := fmt.Sprintf("%s:%s@%d", p.Provider, p.KeyID, n)
		for range soak.MaxReruns {
			if op.run(ctx, "retire", version).Code != soak.ExitIncomplete {
				break
			}
			op.untilDone(ctx, "rewrap")
		}
	}
}

type statusJSON struct {
	Providers []struct {
		Provider string `json:"provider"`
		KeyID    string `json:"key_id"`
	} `json:"providers"`
	Versions []struct {
		Provider string `json:"provider"`
		KeyID    string `json:"key_id"`
		Version  string `json:"version"`
		State    string `json:"state"`
	} `json:"versions"`
}

// status runs `keybroker status --json`, which must exit 0: 3 means a
// retired version still wraps data keys.
func (op *operator) status(ctx context.Context) (statusJSON, bool) {
	var st statusJSON
	c, out := op.runOutput(ctx, "status", "--json")
	if err := json.Unmarshal(out, &st); err != nil {
		op.sum.Failures = append(op.sum.Failures, soak.Command{Args: c.Args, Code: c.Code, Stderr: "unreadable JSON on stdout: " + err.Error()})
		return st, false
	}
	return st, c.Code == 0
}

func (op *operator) run(ctx context.Context, args ...string) soak.Command {
	c, _ := op.runOutput(ctx, args...)
	return c
}

// runOutput runs keybroker with args, counts its exit code and records a
// failure for any code other than 0 and 5. It returns the command and its
// stdout.
func (op *operator) runOutput(ctx context.Context, args ...string) (soak.Command, []byte) {
	c, out := op.execOutput(ctx, args...)
	key := args[0]
	for _, a := range args[1:] {
		if strings.HasPrefix(a, "--") && a != "--json" {
			key += " " + a
		}
	}
	codes := op.sum.Codes[key]
	if codes == nil {
		codes = map[int]int{}
		op.sum.Codes[key] = codes
	}
	codes[c.Code]++
	if c.Code != 0 && c.Code != soak.ExitIncomplete {
		op.sum.Failures = append(op.sum.Failures, c)
	}
	return c, out
}

func (op *operator) exec(ctx context.Context, args ...string) soak.Command {
	c, _ := op.execOutput(ctx, args...)
	return c
}

func (op *operator) execOutput(ctx context.Context, args ...string) (soak.Command, []byte) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, op.o.keybroker, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	testbin.KillWithParent(cmd)
	err := cmd.Run()
	c := soak.Command{Args: args}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		c.Code = ee.ExitCode()
	default:
		c.Code, c.Stderr = -1, err.Error()
		return c, nil
	}
	if c.Code != 0 {
		c.Stderr = lastLine(stderr.String())
	}
	return c, stdout.Bytes()
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}
