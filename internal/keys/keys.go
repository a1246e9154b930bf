// Package keys gives the keybroker packages layered on pgstore (pgcolumn)
// a Store's data keys — budget reservations, the fenced creation of a
// project's active key, the cache of unwrapped keys — and its audit trail,
// without making them part of pgstore's public API. pgstore sets Of; only
// keybroker's own packages can import this one.
package keys

import (
	"context"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/envelope"
)

// Store is the part of a *pgstore.Store that layered packages use. Every
// data key it hands out belongs to one project and one scope (the
// data_keys.scope column): pgstore's own secrets use "", each encrypted
// column its own, so that re-encrypting one scope never retires or destroys
// another's keys.
type Store interface {
	// Pool is the Store's pool; Schema its unquoted schema name;
	// RowSecurity whether row-level security binds the pool's role (then
	// every statement on data_keys must run with keybroker.project_id set
	// for its transaction).
	Pool() *pgxpool.Pool
	Schema() string
	RowSecurity() bool
	// CheckProject validates a project id as pgstore does.
	CheckProject(project string) error
	// Seal encrypts plaintext with associated data aad under the active
	// data key of project's scope, taking one encryption from the
	// process's reservation (creating the key when there is none). The
	// envelope's external key reference is the data key's 16 id bytes.
	Seal(ctx context.Context, project, scope string, plaintext, aad []byte) (id [16]byte, envelope []byte, err error)
	// Open decrypts envelope (whose header must name data key id) with
	// associated data aad, unwrapping the key from data_keys on a cache
	// miss. Every failure about the bytes or the key's row is the bare
	// envelope.ErrDecrypt.
	Open(ctx context.Context, project string, id [16]byte, envelope, aad []byte) ([]byte, error)
	// DataKey returns data key id of project, unwrapped (from the cache,
	// or loaded and unwrapped on a miss), and the function releasing the
	// cache's lease on it, for a caller opening many envelopes under one
	// key. A key that does not exist for project or does not unwrap is the
	// bare envelope.ErrDecrypt.
	DataKey(ctx context.Context, project string, id [16]byte) (*envelope.DataKey, func(), error)
	// Forget drops the process's reservation on data key id of project's
	// scope and its cached unwrapped form (after a write found it retired
	// or gone). DropReservation drops the reservation whatever key it is
	// on (after retiring the scope's keys).
	Forget(project, scope string, id [16]byte)
	DropReservation(project, scope string)
	// Uncache removes data key id of project from the cache (destroyed).
	Uncache(project string, id [16]byte)
	// Event records an audit event in key_events through db (a
	// transaction, so it commits with what it records).
	Event(ctx context.Context, db Execer, event, project string, dataKey *[16]byte, count int64, detail map[string]any) error
}

// Execer runs one statement (a pgx.Tx, a pool, a connection).
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Of returns the Store behind v, a *pgstore.Store, and false for anything
// else. pgstore sets it in its init.
var Of func(v any) (Store, bool)

// ReencryptPasses runs batch (one batch of a re-encryption: how many rows
// it read, how many it changed) until a batch reads nothing or three in a
// row change nothing (rows rewritten meanwhile by other writers, which the
// next read would find again). It returns the rows changed and calls
// progress, when set, with the running total after each batch that
// changed some.
func ReencryptPasses(batch func() (read, changed int64, err error), progress func(done int64)) (int64, error) {
	var done int64
	for idle := 0; idle < 3; {
		read, n, err := batch()
		done += n
		if err != nil || read == 0 {
			return done, err
		}
		if n == 0 {
			idle++
			continue
		}
		idle = 0
		if progress != nil {
			progress(done)
		}
	}
	return done, nil
}
