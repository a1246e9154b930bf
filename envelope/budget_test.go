package envelope

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

// fakeClock is a clock whose timers fire, in order, only when Advance
// moves it past them, in the goroutine that calls Advance.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Duration
	timers []*fakeTimer
}

type fakeTimer struct {
	at   time.Duration
	f    func()
	done bool // fired or stopped; guarded by fakeClock.mu
}

func newFakeClock() *fakeClock { return &fakeClock{} }

func (c *fakeClock) AfterFunc(d time.Duration, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{at: c.now + d, f: f}
	c.timers = append(c.timers, t)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		stopped := !t.done
		t.done = true
		return stopped
	}
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now += d
	var due, pending []*fakeTimer
	for _, t := range c.timers {
		switch {
		case t.done:
		case t.at <= c.now:
			t.done = true
			due = append(due, t)
		default:
			pending = append(pending, t)
		}
	}
	c.timers = pending
	c.mu.Unlock()
	slices.SortStableFunc(due, func(a, b *fakeTimer) int { return cmp.Compare(a.at, b.at) })
	for _, t := range due {
		t.f()
	}
}

// wrappedCiphertext returns the wrapped DEK an inline envelope carries.
func wrappedCiphertext(t *testing.T, blob []byte) string {
	t.Helper()
	h, err := ParseHeader(blob)
	if err != nil {
		t.Fatal(err)
	}
	return string(h.WrappedKey.Ciphertext)
}

func TestBudgetMessages(t *testing.T) {
	kek := &countingKEK{KEKProvider: newKEK(t, "budget")}
	e := newTestEnvelope(t, kek, WithMaxMessages(3))
	var blobs [][]byte
	for range 7 {
		blobs = append(blobs, mustEncrypt(t, e, []byte("m"), nil))
	}
	if got := kek.wraps.Load(); got != 3 {
		t.Fatalf("7 messages with a budget of 3 made %d DEKs, want 3", got)
	}
	for i, b := range blobs {
		same := wrappedCiphertext(t, b) == wrappedCiphertext(t, blobs[i/3*3])
		if !same {
			t.Fatalf("message %d not under the DEK of message %d", i, i/3*3)
		}
		if i%3 == 0 && i > 0 && wrappedCiphertext(t, b) == wrappedCiphertext(t, blobs[i-1]) {
			t.Fatalf("message %d reused the previous DEK past its budget", i)
		}
		if _, err := e.Decrypt(context.Background(), b, nil); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
}

// TestBudgetConcurrent: under concurrency no DEK seals more than its budget
// and every message is sealed.
func TestBudgetConcurrent(t *testing.T) {
	kek := &countingKEK{KEKProvider: newKEK(t, "budget")}
	e := newTestEnvelope(t, kek, WithMaxMessages(10))
	const goroutines, each = 8, 50
	var mu sync.Mutex
	perDEK := map[string]int{}
	var wg sync.WaitGroup
	for range goroutines {
		wg.Go(func() {
			for range each {
				b, err := e.Encrypt(context.Background(), []byte("m"), nil)
				if err != nil {
					t.Error(err)
					return
				}
				h, err := ParseHeader(b)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				perDEK[string(h.WrappedKey.Ciphertext)]++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	total := 0
	for _, n := range perDEK {
		if n > 10 {
			t.Fatalf("a DEK sealed %d messages, budget 10", n)
		}
		total += n
	}
	if total != goroutines*each || int64(len(perDEK)) != kek.wraps.Load() || len(perDEK) < goroutines*each/10 {
		t.Fatalf("%d messages under %d DEKs with %d wraps", total, len(perDEK), kek.wraps.Load())
	}
}

func TestBudgetAge(t *testing.T) {
	clock := newFakeClock()
	kek := &countingKEK{KEKProvider: newKEK(t, "age")}
	e := newTestEnvelope(t, kek, WithMaxAge(time.Hour), withClock(clock))
	first := mustEncrypt(t, e, []byte("m"), nil)
	clock.Advance(time.Hour - time.Nanosecond)
	second := mustEncrypt(t, e, []byte("m"), nil)
	if kek.wraps.Load() != 1 || wrappedCiphertext(t, first) != wrappedCiphertext(t, second) {
		t.Fatalf("a DEK younger than its max age was replaced (%d wraps)", kek.wraps.Load())
	}
	clock.Advance(time.Nanosecond)
	third := mustEncrypt(t, e, []byte("m"), nil)
	if kek.wraps.Load() != 2 || wrappedCiphertext(t, third) == wrappedCiphertext(t, first) {
		t.Fatalf("a DEK at its max age was not replaced (%d wraps)", kek.wraps.Load())
	}
}

func TestDataKeyBudget(t *testing.T) {
	clock := newFakeClock()
	ctx := context.Background()
	k, _, err := NewDataKey(ctx, newKEK(t, "dk"), nil, WithMaxMessages(2), WithMaxAge(time.Minute), withClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := SealWithKeyID(k, []byte("id"), nil, nil); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	if _, err := SealWithKeyID(k, []byte("id"), nil, nil); err != ErrKeyExhausted {
		t.Fatalf("message 3 of 2: %v, want ErrKeyExhausted", err)
	}

	k, _, err = NewDataKey(ctx, newKEK(t, "dk"), nil, WithMaxAge(time.Minute), withClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := SealWithKeyID(k, []byte("id"), nil, nil); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Minute)
	if _, err := SealWithKeyID(k, []byte("id"), nil, nil); err != ErrKeyExhausted {
		t.Fatalf("after max age: %v, want ErrKeyExhausted", err)
	}
}

// TestCoalescedWrap: 64 goroutines using a fresh Envelope at once cause
// exactly one Wrap.
func TestCoalescedWrap(t *testing.T) {
	kek := &countingKEK{KEKProvider: newKEK(t, "coalesce"), gate: make(chan struct{})}
	e := newTestEnvelope(t, kek)
	const n = 64
	var started, done sync.WaitGroup
	started.Add(n)
	blobs := make([][]byte, n)
	for i := range n {
		done.Go(func() {
			started.Done()
			b, err := e.Encrypt(context.Background(), []byte("m"), nil)
			if err != nil {
				t.Error(err)
			}
			blobs[i] = b
		})
	}
	started.Wait() // every goroutine is at or past Encrypt; the Wrap is held
	close(kek.gate)
	done.Wait()
	if got := kek.wraps.Load(); got != 1 {
		t.Fatalf("64 concurrent first uses made %d Wrap calls, want 1", got)
	}
	for i := range blobs {
		if wrappedCiphertext(t, blobs[i]) != wrappedCiphertext(t, blobs[0]) {
			t.Fatal("concurrent first uses got different DEKs")
		}
	}
}

// TestRotateWaitCanceled: a caller waiting for another caller's Wrap gives
// up when its ctx ends; a failed Wrap is not cached and the next caller
// tries again.
func TestRotateWaitCanceled(t *testing.T) {
	kek := &countingKEK{KEKProvider: newKEK(t, "cancel"), gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	kek.setFail(errTest)
	e := newTestEnvelope(t, kek)
	errc := make(chan error, 1)
	go func() {
		_, err := e.Encrypt(context.Background(), []byte("m"), nil)
		errc <- err
	}()
	<-kek.entered // the first caller holds the rotation inside Wrap
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.Encrypt(ctx, []byte("m"), nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("waiting caller with canceled ctx: %v", err)
	}
	close(kek.gate)
	if err := <-errc; !errors.Is(err, errTest) {
		t.Fatalf("first caller: %v, want the Wrap error", err)
	}
	kek.fail.Store(nil)
	if _, err := e.Encrypt(context.Background(), []byte("m"), nil); err != nil {
		t.Fatal(err)
	}
	if got := kek.wraps.Load(); got != 2 {
		t.Fatalf("%d Wrap calls, want 2", got)
	}
}
