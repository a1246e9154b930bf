package pgstore

import "context"

// Observer is told of each Put, Get and GetMany, for metrics and traces,
// without this package depending on a telemetry library. Start is called
// before the operation with "put", "get" or "getmany" (once per GetMany
// call, however many names); it may return a derived ctx (carrying a
// span, for instance) that the operation then uses, and a function the
// Store calls once with the operation's error (nil on success). Neither
// receives the project, the names or the values. Implementations must be
// safe for concurrent use and must not block.
type Observer interface {
	Start(ctx context.Context, op string) (context.Context, func(error))
}

// Put stores value as the secret name of project, replacing any previous
// value. The value is encrypted under the project's data key with
// associated data binding project and name; the write is one statement.
func (s *Store) Put(ctx context.Context, project, name string, value []byte) error {
	if s.obs == nil {
		return s.put(ctx, project, name, value)
	}
	ctx, done := s.obs.Start(ctx, "put")
	err := s.put(ctx, project, name, value)
	done(err)
	return err
}

// Get returns the secret name of project, or an error matching ErrNotFound.
// Every failure to decrypt that is about the stored rows — a ciphertext,
// nonce or header altered or moved, a data key whose wrapped form or kek
// row was altered or moved, or that the keyring has no key version for, a
// data_keys row that is missing — yields the same error, matching
// envelope.ErrDecrypt, and no plaintext. Errors that say nothing about the
// rows are returned as themselves: the database's, ctx's, and the key
// service's provider.ErrUnavailable, ErrAccessDenied and ErrKeyDisabled.
func (s *Store) Get(ctx context.Context, project, name string) ([]byte, error) {
	if s.obs == nil {
		return s.get(ctx, project, name)
	}
	ctx, done := s.obs.Start(ctx, "get")
	v, err := s.get(ctx, project, name)
	done(err)
	return v, err
}
