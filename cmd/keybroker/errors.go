package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/profullstack/keybroker/pgstore"
)

// Exit codes. Documented in `keybroker help` (see root.go).
const (
	exitOK          = 0
	exitError       = 1   // the operation failed; nothing was partially written
	exitUsage       = 2   // bad flags, arguments or configuration
	exitRetiredUsed = 3   // status: a retired key version is still referenced
	exitVerifyFail  = 4   // verify: at least one secret did not decrypt
	exitIncomplete  = 5   // work remains (locked rows, corrupt keys, old keys in use, half-done retire): rerun, or --wait
	exitInterrupted = 130 // SIGINT/SIGTERM; rerun to continue
)

// codeError carries an exit code other than exitError through cobra.
type codeError struct {
	code int
	err  error
}

func (e *codeError) Error() string { return e.err.Error() }
func (e *codeError) Unwrap() error { return e.err }

func usageErrorf(format string, args ...any) error {
	return &codeError{code: exitUsage, err: fmt.Errorf(format, args...)}
}

// exitCode maps err to the process exit code.
func exitCode(err error) int {
	var ce *codeError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ce):
		return ce.code
	case errors.As(err, new(*interruptedError)):
		return exitInterrupted
	case errors.Is(err, pgstore.ErrInvalidArgument), errors.Is(err, pgstore.ErrPooler), columnUsage(err):
		return exitUsage
	case errors.Is(err, pgstore.ErrRetireIncomplete):
		return exitIncomplete
	}
	return exitError
}

// oneLine renders err as the single stderr line the CLI promises: no line
// breaks, whatever a driver or SDK put in its message.
func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

// interruptedError replaces whatever error a command returned after
// SIGINT or SIGTERM (usually "context canceled" from deep inside).
type interruptedError struct{ hint string }

func (e *interruptedError) Error() string {
	return "interrupted; nothing was partially written, " + e.hint
}

// hintError carries what to run to finish an operation that stopped
// half-way through, for the interrupted message.
type hintError struct {
	hint string
	err  error
}

func (e *hintError) Error() string { return e.err.Error() + "; " + e.hint }
func (e *hintError) Unwrap() error { return e.err }

func resumeHint(err error) string {
	var h *hintError
	if errors.As(err, &h) {
		return h.hint
	}
	return "rerun to continue"
}

// incomplete is the error of a command that committed part of its work:
// exit code exitIncomplete, with what to run to finish.
func incomplete(format string, args ...any) error {
	return &codeError{code: exitIncomplete, err: fmt.Errorf(format, args...)}
}
