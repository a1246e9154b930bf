package pgstore

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// MaxGetMany is the most names one GetMany call accepts, counted before
// duplicates are removed.
const MaxGetMany = 1000

// GetMany returns the secrets of project that names names, read with one
// statement in one round trip: a map from each name that is set to its
// value. A name that is not set is absent from the map (there is no
// ErrNotFound); a name given more than once is read once. No names is an
// empty map, without touching the database. More than MaxGetMany names, an
// invalid project or any invalid name (as Get checks them) is an error
// matching ErrInvalidArgument, before any database work.
//
// The values are opened like Get's, with the cached data keys; a data key
// missing from the cache costs one more round trip and one unwrap, once
// per call however many of the secrets share it. The call is all or
// nothing: if any value fails to decrypt, for any of the reasons Get
// lists, it returns only an error matching envelope.ErrDecrypt (the same
// opaque error as Get's, naming no secret) and no values (those already
// opened are zeroed); the database's, ctx's and the key service's errors
// are returned as Get returns them. names is only read. The map and the
// values are the caller's: the Store keeps no reference to them. The
// Observer sees the call as one operation "getmany".
func (s *Store) GetMany(ctx context.Context, project string, names []string) (map[string][]byte, error) {
	if s.obs == nil {
		return s.getMany(ctx, project, names)
	}
	ctx, done := s.obs.Start(ctx, "getmany")
	v, err := s.getMany(ctx, project, names)
	done(err)
	return v, err
}

// sealed is one encrypted_secrets row as GetMany reads it.
type sealed struct {
	name        string
	blob, nonce []byte
	id          pgtype.UUID
}

// getMany is GetMany without the Observer.
func (s *Store) getMany(ctx context.Context, project string, names []string) (map[string][]byte, error) {
	if err := checkProject(project); err != nil {
		return nil, err
	}
	if len(names) > MaxGetMany {
		return nil, fmt.Errorf("%w: %d secret names, more than %d", ErrInvalidArgument, len(names), MaxGetMany)
	}
	for _, name := range names {
		if err := checkName(name); err != nil {
			return nil, err
		}
	}
	out := make(map[string][]byte, len(names))
	if len(names) == 0 {
		return out, nil
	}
	// The primary key makes each (project, name) one row, so duplicates in
	// names cannot return a row twice.
	var rows []sealed
	err := s.scopedOn(ctx, s.db, project, func(b *pgx.Batch) {
		b.Queue(`SELECT name, encrypted_data, nonce, data_key_id FROM `+s.q+`.encrypted_secrets WHERE project_id = $1 AND name = ANY($2) ORDER BY data_key_id`,
			project, names).Query(func(r pgx.Rows) error {
			var row sealed
			_, err := pgx.ForEachRow(r, []any{&row.name, &row.blob, &row.nonce, &row.id}, func() error {
				rows = append(rows, row)
				return nil
			})
			return err
		})
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: get many: %w", err)
	}
	// The rows come grouped by data key, so each key is looked up in (or
	// loaded into) the cache once and then found there by the rest of its
	// group, however small the cache.
	for _, row := range rows {
		pt, err := s.open(ctx, project, row.id.Bytes, nil, row.blob, row.nonce, secretAAD(project, row.name))
		if err != nil {
			for _, v := range out {
				clear(v)
			}
			return nil, fmt.Errorf("pgstore: get many: %w", err)
		}
		out[row.name] = pt
	}
	return out, nil
}
