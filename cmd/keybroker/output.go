package main

import (
	"encoding/json"
	"fmt"
	"io"
	"sync"
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
	a     *app
	tty   bool
	bar   *progressbar.ProgressBar // on a terminal, once the total is known
	op    string
	unit  string // what is counted, for the rate: "secrets" unless set
	total int64
	done  int64
	step  int64 // next tenth to report, 1..10
	start time.Time
}

// newProgress starts reporting op over total items (total < 0: not yet
// known; set gives it later).
func (a *app) newProgress(op string, total int64) *progress {
	return &progress{a: a, tty: a.stdoutTTY && !a.json, op: op, unit: "secrets", total: total, step: 1, start: time.Now()}
}

// set records that done of total items are finished. Callers call it from
// one goroutine.
func (p *progress) set(done, total int64) {
	if total >= 0 {
		p.total = total
	}
	p.done = done
	if p.total <= 0 {
		return
	}
	if p.tty {
		if p.bar == nil {
			p.startBar()
		}
		p.bar.ChangeMax64(p.total)
		_ = p.bar.Set64(done)
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
	fmt.Fprintf(p.a.stderr, "%s: %d/%d (%d%%) %.0f %s/s\n", p.op, done, p.total, done*100/p.total, rate, p.unit)
}

func (p *progress) startBar() {
	a := p.a
	p.bar = progressbar.NewOptions64(p.total,
		progressbar.OptionSetWriter(a.stdout),
		progressbar.OptionSetDescription(p.op),
		progressbar.OptionSetWidth(30),
		progressbar.OptionShowCount(),
		progressbar.OptionShowIts(),
		progressbar.OptionSetItsString(p.unit),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionThrottle(50*time.Millisecond),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(a.stdout) }),
	)
	a.logOut.setBar(p.bar)
}

// finish ends the bar, leaving it on screen (at 100% on success).
func (p *progress) finish() {
	if p.bar == nil {
		return
	}
	p.a.logOut.setBar(nil)
	if p.done >= p.total {
		_ = p.bar.Finish()
		return
	}
	_ = p.bar.Exit()
	fmt.Fprintln(p.a.stdout)
}

// logWriter is where logs go: stderr, after clearing the progress bar's
// line (when one is showing) so a log line does not land in the middle of
// the bar; the bar redraws itself on its next update.
type logWriter struct {
	mu  sync.Mutex
	w   io.Writer
	bar *progressbar.ProgressBar
}

func (l *logWriter) setBar(b *progressbar.ProgressBar) {
	l.mu.Lock()
	l.bar = b
	l.mu.Unlock()
}

func (l *logWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.bar != nil {
		_ = l.bar.Clear()
	}
	return l.w.Write(b)
}
