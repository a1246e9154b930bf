package pgstore

import "github.com/profullstack/keybroker/envelope"

// CacheStats returns the counters of this Store's cache of unwrapped data
// keys (hits, misses, evictions, entries), for metrics. It does not touch
// the database.
func (s *Store) CacheStats() envelope.CacheStats { return s.cache.Stats() }
