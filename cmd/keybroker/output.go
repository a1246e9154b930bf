package main

import (
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/schollz/progressbar/v3"
)

// emit writes a command's result: v as one JSON document with --json,
// otherwise whatever human writes.
func (a *app) emit(v any, human func(w io.Writer)) error {
	if a.json {
		enc := json.NewEncoder(a.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	human(a.stdout)
	return nil
}

// progress reports how far a long operation got: a bar with rate and ETA
// on a terminal, otherwise a plain line on stderr at every tenth of the
// total (so logs and CI output stay short and deterministic).
type progress struct {
	bar   *progressbar.ProgressBar
	out   io.Writer // the bar's writer
	w     io.Writer // progress lines
	op    string
	total int64
	done  int64
	step  int64 // next decile to report, 1..10
	start time.Time
}

// newProgress starts reporting op over total items (total < 0: unknown).
func (a *app) newProgress(op string, total int64) *progress {
	p := &progress{w: a.stderr, op: op, total: total, step: 1, start: time.Now()}
	if a.stdoutTTY && !a.json {
		p.out = a.stdout
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(a.stdout),
			progressbar.OptionSetDescription(op),
			progressbar.OptionSetWidth(30),
			progressbar.OptionShowCount(),
			progressbar.OptionShowIts(),
			progressbar.OptionSetItsString("secrets"),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionThrottle(50*time.Millisecond),
			progressbar.OptionSetRenderBlankState(true),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(a.stdout) }),
		)
	}
	return p
}

// set records that done of total items are finished. Safe to call with a
// total discovered late; callers call it from one goroutine.
func (p *progress) set(done, total int64) {
	if p == nil {
		return
	}
	if total >= 0 && total != p.total {
		p.total = total
		if p.bar != nil {
			p.bar.ChangeMax64(total)
		}
	}
	p.done = done
	if p.bar != nil {
		_ = p.bar.Set64(done)
		return
	}
	if p.total <= 0 {
		return
	}
	if p.step > 10 || done*10 < p.total*p.step {
		return
	}
	for p.step <= 10 && done*10 >= p.total*p.step {
		p.step++
	}
	rate := 0.0
	if el := time.Since(p.start).Seconds(); el > 0 {
		rate = float64(done) / el
	}
	fmt.Fprintf(p.w, "%s: %d/%d (%d%%) %.0f/s\n", p.op, done, p.total, done*100/p.total, rate)
}

// finish ends the bar (leaving it on screen at 100% on success).
func (p *progress) finish() {
	if p == nil || p.bar == nil {
		return
	}
	if p.total > 0 && p.done >= p.total {
		_ = p.bar.Finish()
	} else {
		_ = p.bar.Exit()
		fmt.Fprintln(p.out)
	}
}
