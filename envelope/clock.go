package envelope

import "time"

// clock is the time source for DEK ages and cache TTLs. Expiry is driven by
// timers rather than by reading the time on every message, which keeps
// time.Now off the seal and cache-hit paths and drops expired cache entries
// even when nobody asks for them. Tests replace it with a manual clock.
type clock interface {
	// AfterFunc calls f in its own goroutine after d; stop cancels it and
	// reports whether it did so before f started.
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

type realClock struct{}

func (realClock) AfterFunc(d time.Duration, f func()) func() bool { return time.AfterFunc(d, f).Stop }
