package pgstore

import (
	"context"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/internal/keys"
)

// The layered packages (pgcolumn) reach a Store's data keys through
// internal/keys; see that package.
func init() {
	keys.Of = func(v any) (keys.Store, bool) {
		s, ok := v.(*Store)
		if !ok || s == nil {
			return nil, false
		}
		return layered{s}, true
	}
}

// layered adapts a Store to keys.Store.
type layered struct{ s *Store }

func (l layered) Pool() *pgxpool.Pool               { return l.s.pool }
func (l layered) Schema() string                    { return l.s.schema }
func (l layered) RowSecurity() bool                 { return l.s.rls }
func (l layered) CheckProject(project string) error { return checkProject(project) }

func (l layered) Seal(ctx context.Context, project, scope string, plaintext, aad []byte) ([16]byte, []byte, error) {
	id, blob, _, err := l.s.seal(ctx, project, scope, plaintext, aad)
	return id, blob, err
}

// Open has no nonce column to compare with the header's (encrypted columns
// store only the envelope), so it compares the header's with itself.
func (l layered) Open(ctx context.Context, project string, id [16]byte, blob, aad []byte) ([]byte, error) {
	h, err := envelope.ParseHeader(blob)
	if err != nil {
		return nil, envelope.ErrDecrypt
	}
	return l.s.open(ctx, project, id, nil, blob, h.Nonce, aad)
}

func (l layered) DataKey(ctx context.Context, project string, id [16]byte) (*envelope.DataKey, func(), error) {
	return l.s.dataKey(ctx, project, id, nil)
}

func (l layered) Forget(project, scope string, id [16]byte) { l.s.forget(project, scope, id) }
func (l layered) DropReservation(project, scope string)     { l.s.dropReservation(project, scope) }
func (l layered) Uncache(project string, id [16]byte)       { l.s.cache.Remove(cacheID(project, id)) }

func (l layered) Event(ctx context.Context, db keys.Execer, event, project string, dataKey *[16]byte, count int64, detail map[string]any) error {
	return l.s.event(ctx, db, event, project, 0, dataKey, count, detail)
}
