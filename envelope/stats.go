package envelope

// Stats is a snapshot of an Envelope's data-key use, for metrics and
// health reports. It holds counts only, never key material.
type Stats struct {
	// Cache counts the decryption cache's hits, misses and evictions.
	Cache CacheStats
	// ActiveMessages is how many messages the current encryption DEK has
	// sealed (0 before the first Encrypt and after Close); MaxMessages is
	// the budget (WithMaxMessages) after which a fresh DEK is made.
	ActiveMessages, MaxMessages uint64
}

// Stats returns e's current counts. It takes no lock on the encrypt or
// decrypt path.
func (e *Envelope) Stats() Stats {
	s := Stats{Cache: e.cache.Stats(), MaxMessages: e.cfg.maxMessages}
	if a := e.active.Load(); a != nil {
		// sealed counts refused reservations too, so it can pass the budget.
		s.ActiveMessages = min(a.key.sealed.Load(), e.cfg.maxMessages)
	}
	return s
}
