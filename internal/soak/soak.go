package soak

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// Value is the plaintext writer worker stores as write seq (1, 2, ...) of
// the secret name, so that the checker can recompute every value without
// the writer telling it: the worker, name and seq, and 0..63 bytes of
// padding derived from them, so values differ in length too.
func Value(worker int, name string, seq int64) []byte {
	head := fmt.Sprintf("soak|w%d|%s|%d|", worker, name, seq)
	sum := sha256.Sum256([]byte(head))
	pad := hex.EncodeToString(sum[:])
	return []byte(head + (pad + pad)[:int(sum[0])%64])
}

// Name is one secret a writer owns: no other process or goroutine writes
// it, so the writer knows its last acknowledged value.
type Name struct {
	Project string `json:"project"`
	Name    string `json:"name"`
	// Acked is the seq of the last write whose Put returned nil (0: none).
	Acked int64 `json:"acked"`
	// Attempted is the seq of the last write tried. When a Put fails it may
	// still have committed, so the stored value is that of some seq in
	// [Acked, Attempted], and exactly Acked when the two are equal.
	Attempted int64 `json:"attempted"`
}

// WriterSummary is what a writer prints on stdout, as one JSON object,
// when it ends.
type WriterSummary struct {
	Worker     int    `json:"worker"`
	Names      []Name `json:"names"`
	Puts       int64  `json:"puts"`        // Puts that returned nil
	PutErrors  int64  `json:"put_errors"`  // Puts that returned an error
	Gets       int64  `json:"gets"`        // read-backs of its own names
	GetErrors  int64  `json:"get_errors"`  // read-backs that failed
	BadValues  int64  `json:"bad_values"`  // read-backs that returned another value
	OperatorOK bool   `json:"operator_ok"` // the operator had done MinCycles when the writer stopped
	// Errors counts failures by message (operation and error, without the
	// name or seq), for the first MaxErrorKinds distinct messages. Errors
	// never carry values or keys.
	Errors map[string]int `json:"errors"`
}

// MaxErrorKinds bounds the distinct messages in WriterSummary.Errors
// (the counts of failures are exact).
const MaxErrorKinds = 10

// Command is one run of the keybroker CLI by the operator.
type Command struct {
	Args   []string `json:"args"`
	Code   int      `json:"code"`
	Stderr string   `json:"stderr,omitempty"` // last line, for failures
}

// OperatorSummary is what the operator prints on stdout when it ends.
type OperatorSummary struct {
	// Cycles counts the rotate, rewrap, reencrypt and retire rounds the
	// operator completed while the writers ran (before its stdin closed).
	Cycles int `json:"cycles"`
	// Codes counts exit codes by subcommand and flags, e.g.
	// {"rewrap": {"0": 12, "5": 1}, "rotate --retire": {"0": 3}}.
	Codes map[string]map[int]int `json:"codes"`
	// Failures lists every command whose exit code was neither 0 nor 5,
	// and every command that still exited 5 after MaxReruns reruns.
	Failures []Command `json:"failures"`
	// RetireCommand tells whether the CLI has `keybroker retire VERSION`.
	RetireCommand bool `json:"retire_command"`
	// LastReencrypt is the project the final round re-encrypted.
	LastReencrypt string `json:"last_reencrypt"`
}

// ExitIncomplete is the CLI's documented "work remains: rerun" exit code.
const ExitIncomplete = 5

// MaxReruns bounds how often the operator reruns a command that exits
// ExitIncomplete before recording a failure.
const MaxReruns = 20

// Project returns the name of project i of n.
func Project(i int) string { return fmt.Sprintf("p%02d", i) }

// ProgressTable is the one-row table (column cycles) in which the operator
// records the rounds it has completed, and from which the writers learn
// when they may stop. The test creates it.
const ProgressTable = "soak.progress"
