package pgstore

import (
	"context"
	"fmt"
	"maps"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/profullstack/keybroker/provider"
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
// The values are opened like Get's, with the cached data keys; the call is
// one round trip, cached or not (each row brings its data key's wrapped
// form), and a data key missing from the cache costs one unwrap, once per
// call however many of the secrets share it (local, under the key
// hierarchy). The call is all or
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
	if len(names) == 0 {
		return map[string][]byte{}, nil
	}
	if s.read != nil {
		if out, missing, ok := s.getManyReplica(ctx, project, names); ok {
			if len(missing) == 0 {
				return out, nil
			}
			rest, err := s.getManyPrimary(ctx, project, missing)
			if err != nil {
				for _, v := range out {
					clear(v)
				}
				return nil, err
			}
			maps.Copy(out, rest)
			return out, nil
		}
	}
	return s.getManyPrimary(ctx, project, names)
}

// getManyPrimary is getMany on the Store's db, after the checks.
func (s *Store) getManyPrimary(ctx context.Context, project string, names []string) (map[string][]byte, error) {
	out := make(map[string][]byte, len(names))
	// The primary key makes each (project, name) one row, so duplicates in
	// names cannot return a row twice.
	//
	// Each row carries its data key's wrapped form (LEFT JOINs, as in Get),
	// so a data key missing from the cache costs a local unwrap under the
	// key hierarchy, not a second query. A data key row that is missing
	// leaves the columns NULL; open then reads it, finds nothing and
	// reports ErrDecrypt.
	type primaryRow struct {
		sealed
		wrapped              []byte
		prov, keyID, version pgtype.Text
	}
	var rows []primaryRow
	err := s.scopedOn(ctx, s.db, project, func(b *pgx.Batch) {
		b.Queue(`SELECT s.name, s.encrypted_data, s.nonce, s.data_key_id, d.wrapped_dek, k.provider, k.key_id, k.key_version
FROM `+s.q+`.encrypted_secrets s
LEFT JOIN `+s.q+`.data_keys d ON d.id = s.data_key_id AND d.project_id = s.project_id
LEFT JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE s.project_id = $1 AND s.name = ANY($2) ORDER BY s.data_key_id`,
			project, names).Query(func(r pgx.Rows) error {
			var row primaryRow
			_, err := pgx.ForEachRow(r, []any{&row.name, &row.blob, &row.nonce, &row.id, &row.wrapped, &row.prov, &row.keyID, &row.version}, func() error {
				rows = append(rows, row) // each scan allocates the row's byte slices afresh
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
		var wk *provider.WrappedKey
		if row.wrapped != nil && row.prov.Valid && row.keyID.Valid && row.version.Valid {
			wk = &provider.WrappedKey{Provider: row.prov.String, KeyID: row.keyID.String, Version: row.version.String, Ciphertext: row.wrapped}
		}
		pt, err := s.open(ctx, project, row.id.Bytes, wk, row.blob, row.nonce, secretAAD(project, row.name))
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
