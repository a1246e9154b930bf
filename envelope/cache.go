package envelope

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// KeyCache is a bounded cache of unwrapped DataKeys, keyed by a caller's
// string id (for example a data-key id from a store). Safe for concurrent
// use; a hit takes only a read lock and atomics.
//
// Every key Get returns is leased: it is not dropped while the lease is
// held, even if the entry is evicted, removed or the cache closed in the
// meantime. Call the release function Get returns exactly once when done
// with the key; the key is dropped (see DataKey.Destroy) when its entry has
// left the cache and no lease is outstanding.
//
// An entry is dropped ttl after it was loaded, however often it is used,
// by a timer (time.AfterFunc), so idle keys do not linger. When a load makes
// the cache exceed maxEntries, the least recently used of up to
// evictSample entries (all of them in a cache that small; otherwise a
// sample, where Go's map iteration starts at random) is dropped: an
// approximate LRU whose cost per load stays constant however large the
// cache, so a full cache of 100,000 keys does not make every miss scan
// them all.
type KeyCache struct {
	max   int
	ttl   time.Duration
	clock clock
	tick  atomic.Int64 // recency counter for LRU

	mu      sync.RWMutex
	entries map[string]*cacheEntry
	ready   int // entries holding a key (not loading)
	closed  bool

	hits, misses, evictions atomic.Uint64
}

type cacheEntry struct {
	// key, stop and err are written under KeyCache.mu (write) before done
	// is closed; key is nil while the entry is loading.
	key  *DataKey
	stop func() bool // cancels the TTL timer
	err  error
	done chan struct{}
	used atomic.Int64 // KeyCache.tick at the last use, for LRU
}

// CacheStats counts a KeyCache's activity. Evictions counts entries dropped
// for capacity or age, not by Remove or Close.
type CacheStats struct {
	Hits, Misses, Evictions uint64
	Entries                 int // entries holding a key now
}

// NewKeyCache returns a cache of at most maxEntries keys (at least 1 is
// kept), each for at most ttl (a ttl ≤ 0 is one minute).
func NewKeyCache(maxEntries int, ttl time.Duration) *KeyCache {
	if maxEntries < 1 {
		maxEntries = 1
	}
	if ttl <= 0 {
		ttl = time.Minute
	}
	return &KeyCache{max: maxEntries, ttl: ttl, clock: realClock{}, entries: map[string]*cacheEntry{}}
}

// Get returns the key cached under id, leased, and its release function.
// On a miss it calls load (which must not be nil then) once, however many goroutines ask for id at the
// same time; the others wait for that load (or their own ctx). A load
// error is returned to the caller that ran it and to the waiters, except
// that a waiter whose loader's ctx ended retries with its own. After Close,
// Get returns ErrClosed.
func (c *KeyCache) Get(ctx context.Context, id string, load func(context.Context) (*DataKey, error)) (*DataKey, func(), error) {
	for {
		c.mu.RLock()
		k, release, ok := c.hit(c.entries[id])
		c.mu.RUnlock()
		if ok {
			return k, release, nil
		}

		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, nil, ErrClosed
		}
		e := c.entries[id]
		if e != nil && e.key != nil {
			if k, release, ok := c.hit(e); ok {
				c.mu.Unlock()
				return k, release, nil
			}
			c.dropLocked(id, e) // destroyed behind the cache's back
			e = nil
		}
		if e == nil {
			if load == nil {
				c.mu.Unlock()
				return nil, nil, errors.New("envelope: key cache: miss with a nil load function")
			}
			e = &cacheEntry{done: make(chan struct{})}
			c.entries[id] = e
			c.misses.Add(1)
			c.mu.Unlock()
			return c.load(ctx, id, e, load)
		}
		c.mu.Unlock()
		select {
		case <-e.done:
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("envelope: key cache: %w", ctx.Err())
		}
		if e.err != nil && !errors.Is(e.err, context.Canceled) && !errors.Is(e.err, context.DeadlineExceeded) {
			return nil, nil, e.err
		}
	}
}

// lookup is Get's hit path for an id held as bytes: indexing the map with
// string(id) does not allocate.
func (c *KeyCache) lookup(id []byte) (*DataKey, func(), bool) {
	c.mu.RLock()
	k, release, ok := c.hit(c.entries[string(id)])
	c.mu.RUnlock()
	return k, release, ok
}

// hit leases e's key if e is loaded. c.mu must be held.
func (c *KeyCache) hit(e *cacheEntry) (*DataKey, func(), bool) {
	if e == nil || e.key == nil || !e.key.lease() {
		return nil, nil, false
	}
	e.used.Store(c.tick.Add(1))
	c.hits.Add(1)
	return e.key, e.key.releaseFn, true
}

// load runs load for the loading entry e and publishes the result. It
// finishes e even if load panics, so waiters are never stranded.
func (c *KeyCache) load(ctx context.Context, id string, e *cacheEntry, load func(context.Context) (*DataKey, error)) (k *DataKey, release func(), err error) {
	finished := false
	defer func() {
		if !finished {
			c.finish(id, e, nil, errors.New("envelope: key cache: load panicked"))
		}
	}()
	k, err = load(ctx)
	if err == nil && k == nil {
		err = errors.New("envelope: key cache: load returned no key")
	}
	finished = true
	return c.finish(id, e, k, err)
}

func (c *KeyCache) finish(id string, e *cacheEntry, k *DataKey, err error) (*DataKey, func(), error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer close(e.done)
	if err == nil && !k.lease() {
		err = ErrKeyDestroyed
	}
	if err != nil {
		e.err = err
		if c.entries[id] == e {
			delete(c.entries, id)
		}
		return nil, nil, err
	}
	if c.closed || c.entries[id] != e {
		// Closed or removed while loading: not cached, so drop the key as
		// soon as the loader's lease is released.
		k.Destroy()
		if c.closed {
			k.release()
			e.err = ErrClosed
			return nil, nil, ErrClosed
		}
		return k, k.releaseFn, nil
	}
	e.key = k
	e.used.Store(c.tick.Add(1))
	e.stop = c.clock.AfterFunc(c.ttl, func() { c.expire(id, e) })
	c.ready++
	c.evictLocked(e)
	return k, k.releaseFn, nil
}

// expire is e's TTL timer.
func (c *KeyCache) expire(id string, e *cacheEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries[id] == e && e.key != nil {
		c.dropLocked(id, e)
		c.evictions.Add(1)
	}
}

// evictSample is how many entries eviction compares (Redis samples 5; more
// is closer to exact LRU and still constant time).
const evictSample = 64

// evictLocked drops least recently used entries until the cache is within
// its bound. keep (the entry just loaded) stays.
func (c *KeyCache) evictLocked(keep *cacheEntry) {
	for c.ready > c.max {
		var oldID string
		var old *cacheEntry
		seen := 0
		for id, e := range c.entries {
			if e != keep && e.key != nil && (old == nil || e.used.Load() < old.used.Load()) {
				oldID, old = id, e
			}
			if seen++; seen >= evictSample && old != nil {
				break
			}
		}
		if old == nil {
			return
		}
		c.dropLocked(oldID, old)
		c.evictions.Add(1)
	}
}

func (c *KeyCache) dropLocked(id string, e *cacheEntry) {
	delete(c.entries, id)
	c.ready--
	e.stop()
	e.key.Destroy()
}

// Remove drops the entry for id, if any (a load in progress still returns
// its key to the callers waiting for it, but does not cache it).
func (c *KeyCache) Remove(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[id]; e != nil {
		if e.key != nil {
			c.dropLocked(id, e)
		} else {
			delete(c.entries, id)
		}
	}
}

// Close drops every entry. Keys still leased are dropped on release. Later
// Gets return ErrClosed. Close is idempotent.
func (c *KeyCache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for id, e := range c.entries {
		if e.key != nil {
			c.dropLocked(id, e)
		} else {
			delete(c.entries, id)
		}
	}
}

// Stats returns the cache's counters.
func (c *KeyCache) Stats() CacheStats {
	c.mu.RLock()
	n := c.ready
	c.mu.RUnlock()
	return CacheStats{Hits: c.hits.Load(), Misses: c.misses.Load(), Evictions: c.evictions.Load(), Entries: n}
}
