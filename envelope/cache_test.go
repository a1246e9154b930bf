package envelope

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/profullstack/keybroker/provider"
)

// newCacheKey makes a real DataKey (a fresh DEK wrapped by a local provider).
func newCacheKey(t testing.TB) *DataKey {
	t.Helper()
	k, _, err := NewDataKey(context.Background(), newKEK(t, "cache"), nil)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func cacheWithClock(n int, ttl time.Duration) (*KeyCache, *fakeClock) {
	c := NewKeyCache(n, ttl)
	clock := newFakeClock()
	c.clock = clock
	return c, clock
}

func destroyed(k *DataKey) bool { return k.aead.Load() == nil }

// get fetches id, loading a fresh key on a miss, and releases at once.
func get(t *testing.T, c *KeyCache, id string, loads *atomic.Int64) *DataKey {
	t.Helper()
	k, release, err := c.Get(context.Background(), id, func(context.Context) (*DataKey, error) {
		loads.Add(1)
		return newCacheKey(t), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	release()
	return k
}

func TestCacheBound(t *testing.T) {
	c, clock := cacheWithClock(2, time.Hour)
	var loads atomic.Int64
	a := get(t, c, "a", &loads)
	clock.Advance(time.Second)
	b := get(t, c, "b", &loads)
	clock.Advance(time.Second)
	if get(t, c, "a", &loads) != a { // a is now the most recently used
		t.Fatal("hit returned another key")
	}
	clock.Advance(time.Second)
	get(t, c, "c", &loads)
	if s := c.Stats(); s.Entries != 2 || s.Evictions != 1 || s.Misses != 3 || s.Hits != 1 {
		t.Fatalf("stats %+v, want 2 entries, 1 eviction, 3 misses, 1 hit", s)
	}
	if !destroyed(b) || destroyed(a) {
		t.Fatalf("evicted the wrong key: a destroyed %v, b destroyed %v", destroyed(a), destroyed(b))
	}
	get(t, c, "a", &loads)
	if loads.Load() != 3 {
		t.Fatalf("%d loads, want 3", loads.Load())
	}
}

// TestCacheTTL: an entry is dropped at its TTL by its timer, whether or
// not anyone asks for it.
func TestCacheTTL(t *testing.T) {
	c, clock := cacheWithClock(10, time.Minute)
	var loads atomic.Int64
	a := get(t, c, "a", &loads)
	clock.Advance(time.Minute - time.Nanosecond)
	if get(t, c, "a", &loads) != a || loads.Load() != 1 || destroyed(a) {
		t.Fatal("entry expired before its TTL")
	}
	clock.Advance(time.Nanosecond)
	if !destroyed(a) {
		t.Fatal("key not destroyed at its TTL")
	}
	if s := c.Stats(); s.Evictions != 1 || s.Entries != 0 {
		t.Fatalf("stats %+v, want 1 eviction, 0 entries", s)
	}
	if get(t, c, "a", &loads) == a || loads.Load() != 2 {
		t.Fatal("expired entry served")
	}
	// Removing an entry stops its timer: a later entry under the same id
	// keeps its own TTL.
	c.Remove("a")
	clock.Advance(30 * time.Second)
	b := get(t, c, "a", &loads)
	clock.Advance(59 * time.Second)
	if destroyed(b) {
		t.Fatal("a removed entry's timer dropped its successor")
	}
	clock.Advance(time.Second)
	if !destroyed(b) {
		t.Fatal("key not destroyed at its TTL")
	}
}

// TestCacheLease: a key handed out by Get stays usable while leased, even
// when evicted, removed or closed, and is destroyed on release.
func TestCacheLease(t *testing.T) {
	c, _ := cacheWithClock(1, time.Hour)
	var loads atomic.Int64
	k, release, err := c.Get(context.Background(), "a", func(context.Context) (*DataKey, error) { return newCacheKey(t), nil })
	if err != nil {
		t.Fatal(err)
	}
	get(t, c, "b", &loads) // evicts a
	blob, err := SealWithKeyID(k, []byte("a"), []byte("m"), nil)
	if err != nil || destroyed(k) {
		t.Fatalf("leased key unusable after eviction: %v", err)
	}
	if _, err := OpenWithKey(k, blob, nil); err != nil {
		t.Fatal(err)
	}
	release()
	if !destroyed(k) {
		t.Fatal("evicted key not destroyed on release")
	}
	if _, err := OpenWithKey(k, blob, nil); err != ErrKeyDestroyed {
		t.Fatalf("OpenWithKey after release: %v", err)
	}

	k, release, err = c.Get(context.Background(), "b", nil) // a hit: load is not called
	if err != nil {
		t.Fatal(err)
	}
	c.Remove("b")
	if destroyed(k) {
		t.Fatal("leased key destroyed by Remove")
	}
	release()
	if !destroyed(k) {
		t.Fatal("removed key not destroyed on release")
	}
}

func TestCacheClose(t *testing.T) {
	c, _ := cacheWithClock(10, time.Hour)
	var loads atomic.Int64
	a, b := get(t, c, "a", &loads), get(t, c, "b", &loads)
	c.Close()
	c.Close()
	if !destroyed(a) || !destroyed(b) {
		t.Fatal("Close left keys usable")
	}
	if _, _, err := c.Get(context.Background(), "a", nil); err != ErrClosed {
		t.Fatalf("Get after Close: %v", err)
	}
}

// TestCacheCoalesce: 64 concurrent misses on one id run one load and share
// its key; a load error reaches the waiters and is not cached.
func TestCacheCoalesce(t *testing.T) {
	c, _ := cacheWithClock(10, time.Hour)
	gate := make(chan struct{})
	var loads atomic.Int64
	var fail atomic.Bool
	load := func(context.Context) (*DataKey, error) {
		loads.Add(1)
		<-gate
		if fail.Load() {
			return nil, errTest
		}
		return newCacheKey(t), nil
	}
	run := func() ([]*DataKey, []error) {
		const n = 64
		keys, errs := make([]*DataKey, n), make([]error, n)
		var started, done sync.WaitGroup
		started.Add(n)
		for i := range n {
			done.Go(func() {
				started.Done()
				k, release, err := c.Get(context.Background(), "id", load)
				keys[i], errs[i] = k, err
				if err == nil {
					release()
				}
			})
		}
		started.Wait()
		close(gate)
		done.Wait()
		return keys, errs
	}
	fail.Store(true)
	_, errs := run()
	for _, err := range errs {
		if !errors.Is(err, errTest) {
			t.Fatalf("waiter got %v, want the load error", err)
		}
	}
	// Callers that arrive after a failed load has finished load again (errors
	// are not cached), so the failing case has no exact count.
	failed := loads.Load()
	fail.Store(false)
	gate = make(chan struct{})
	keys, errs := run()
	for i := range keys {
		if errs[i] != nil || keys[i] != keys[0] {
			t.Fatalf("waiter %d: %v, same key %v", i, errs[i], keys[i] == keys[0])
		}
	}
	if loads.Load() != failed+1 {
		t.Fatalf("%d successful loads, want 1 (the error was cached, or misses were not coalesced)", loads.Load()-failed)
	}
}

// TestCacheLoadPanic: a panicking load does not strand the entry.
func TestCacheLoadPanic(t *testing.T) {
	c, _ := cacheWithClock(10, time.Hour)
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("panic not propagated")
			}
		}()
		c.Get(context.Background(), "a", func(context.Context) (*DataKey, error) { panic("load") })
	}()
	var loads atomic.Int64
	get(t, c, "a", &loads)
	if loads.Load() != 1 {
		t.Fatal("entry stranded by a panicking load")
	}
	if _, _, err := c.Get(context.Background(), "b", func(context.Context) (*DataKey, error) { return nil, nil }); err == nil {
		t.Fatal("a load returning no key and no error succeeded")
	}
	if _, _, err := c.Get(context.Background(), "b", nil); err == nil {
		t.Fatal("a miss with a nil load succeeded")
	}
}

// TestDecryptCoalesce: 64 goroutines decrypting with a cold cache cause one
// Unwrap, later decryptions none, and the unwrapped DEK bytes are cleared.
func TestDecryptCoalesce(t *testing.T) {
	kek := &countingKEK{KEKProvider: newKEK(t, "dec")}
	blob := mustEncrypt(t, newTestEnvelope(t, kek), []byte("m"), []byte("aad"))
	kek.gate = make(chan struct{})
	e := newTestEnvelope(t, kek)
	var started, done sync.WaitGroup
	started.Add(64)
	for range 64 {
		done.Go(func() {
			started.Done()
			if pt, err := e.Decrypt(context.Background(), blob, []byte("aad")); err != nil || string(pt) != "m" {
				t.Errorf("Decrypt: %q, %v", pt, err)
			}
		})
	}
	started.Wait()
	close(kek.gate)
	done.Wait()
	for range 100 {
		if _, err := e.Decrypt(context.Background(), blob, []byte("aad")); err != nil {
			t.Fatal(err)
		}
	}
	if got := kek.unwraps.Load(); got != 1 {
		t.Fatalf("%d Unwrap calls, want 1", got)
	}
	if dek := kek.returned.Load(); dek == nil || len(*dek) != DEKSize || !isZero(*dek) {
		t.Fatal("the DEK the provider returned was not cleared")
	}
	if s := e.cache.Stats(); s.Misses != 1 || s.Entries != 1 {
		t.Fatalf("cache stats %+v", s)
	}
}

// TestDecryptErrors: an outage is reported as such, not as ErrDecrypt.
func TestDecryptErrors(t *testing.T) {
	kek := &countingKEK{KEKProvider: newKEK(t, "err")}
	blob := mustEncrypt(t, newTestEnvelope(t, kek), []byte("m"), nil)
	e := newTestEnvelope(t, kek)
	kek.setFail(&provider.Error{Provider: "local", Op: "unwrap", Kind: provider.ErrUnavailable})
	if _, err := e.Decrypt(context.Background(), blob, nil); !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("Decrypt during an outage: %v", err)
	}
	kek.fail.Store(nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.Decrypt(ctx, blob, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Decrypt with canceled ctx: %v", err)
	}
	if pt, err := e.Decrypt(context.Background(), blob, nil); err != nil || string(pt) != "m" {
		t.Fatalf("Decrypt after the outage: %v", err)
	}
}

// TestCacheRemoveCloseWhileLoading: a load that finishes after Remove hands
// its key to its caller without caching it; one that finishes after Close
// destroys its key and returns ErrClosed.
func TestCacheRemoveCloseWhileLoading(t *testing.T) {
	for _, closing := range []bool{false, true} {
		c, _ := cacheWithClock(10, time.Hour)
		entered, gate := make(chan struct{}), make(chan struct{})
		var loaded *DataKey
		type result struct {
			k       *DataKey
			release func()
			err     error
		}
		res := make(chan result)
		go func() {
			k, release, err := c.Get(context.Background(), "a", func(context.Context) (*DataKey, error) {
				close(entered)
				<-gate
				loaded = newCacheKey(t)
				return loaded, nil
			})
			res <- result{k, release, err}
		}()
		<-entered
		if closing {
			c.Close()
		} else {
			c.Remove("a")
		}
		close(gate)
		r := <-res
		if closing {
			if r.err != ErrClosed || !destroyed(loaded) {
				t.Fatalf("load finishing after Close: %v, key destroyed %v", r.err, destroyed(loaded))
			}
			continue
		}
		if r.err != nil || destroyed(r.k) {
			t.Fatalf("load finishing after Remove: %v", r.err)
		}
		r.release()
		if !destroyed(r.k) || c.Stats().Entries != 0 {
			t.Fatal("a key loaded across Remove was cached or not destroyed on release")
		}
	}
}
