package pgstore

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/provider"
)

// Reads from a hot standby (Config.ReadPool). A standby replays the
// primary's WAL in commit order, so any one statement on it sees a state
// the primary had: a secret row is never there without the data key row it
// names (the key's row commits first, or in the same transaction). Each read
// therefore takes the secret and its data key's wrapped form in one
// statement, one snapshot of the standby, rather than the secret first and
// the data key later (which the standby may by then have replaced by a
// rewrap, or a re-encryption may have deleted). What the standby lacks or
// cannot open is read again from the primary:
//
//   - a secret it does not have (yet): a Put the standby has not replayed,
//     or a name that does not exist (which costs the second round trip);
//   - a secret that does not open there: its data key is wrapped, at the
//     standby's replay position, under a KEK version since retired (the
//     primary has it rewrapped), or anything else the primary would report
//     as tampering (envelope.ErrDecrypt, which the primary then reports);
//   - any error of the standby's (unreachable, recovery conflict, ctx).
//
// The primary's answer is the one returned. A read thus returns what the
// primary holds now, or what it held at the standby's replay position:
// never a value the primary never held, never an error the primary would
// not give.

// replicaSealed is a secret row with its data key's wrapped form.
type replicaSealed struct {
	sealed
	wk provider.WrappedKey
}

// replicaQuery selects replicaSealed columns for secrets of project $1;
// the caller adds the name condition.
func (s *Store) replicaQuery() string {
	return `SELECT s.name, s.encrypted_data, s.nonce, s.data_key_id, d.wrapped_dek, k.provider, k.key_id, k.key_version
FROM ` + s.q + `.encrypted_secrets s
JOIN ` + s.q + `.data_keys d ON d.id = s.data_key_id AND d.project_id = s.project_id
JOIN ` + s.q + `.kek k ON k.id = d.kek_id
WHERE s.project_id = $1 AND `
}

func scanReplicaRows(r pgx.Rows, out *[]replicaSealed) error {
	var row replicaSealed
	_, err := pgx.ForEachRow(r, []any{&row.name, &row.blob, &row.nonce, &row.id, &row.wk.Ciphertext, &row.wk.Provider, &row.wk.KeyID, &row.wk.Version},
		func() error {
			*out = append(*out, row) // each scan allocates the row's byte slices afresh
			return nil
		})
	return err
}

// getReplica reads name from the read pool; ok is false when the primary
// must answer instead (see above).
func (s *Store) getReplica(ctx context.Context, project, name string) (pt []byte, ok bool) {
	var rows []replicaSealed
	err := s.scopedOn(ctx, s.read, project, func(b *pgx.Batch) {
		b.Queue(s.replicaQuery()+`s.name = $2`, project, name).Query(func(r pgx.Rows) error { return scanReplicaRows(r, &rows) })
	})
	if err != nil || len(rows) != 1 {
		return nil, false
	}
	row := rows[0]
	pt, err = s.open(ctx, project, row.id.Bytes, &row.wk, row.blob, row.nonce, secretAAD(project, name))
	return pt, err == nil
}

// getManyReplica reads names from the read pool. ok false: the primary
// must answer for all of them (a row did not open, or the standby failed);
// otherwise out holds what the standby had and missing the names it did
// not, which the primary must be asked for.
func (s *Store) getManyReplica(ctx context.Context, project string, names []string) (out map[string][]byte, missing []string, ok bool) {
	var rows []replicaSealed
	err := s.scopedOn(ctx, s.read, project, func(b *pgx.Batch) {
		b.Queue(s.replicaQuery()+`s.name = ANY($2) ORDER BY s.data_key_id`, project, names).
			Query(func(r pgx.Rows) error { return scanReplicaRows(r, &rows) })
	})
	if err != nil {
		return nil, nil, false
	}
	out = make(map[string][]byte, len(names))
	for _, row := range rows {
		pt, err := s.open(ctx, project, row.id.Bytes, &row.wk, row.blob, row.nonce, secretAAD(project, row.name))
		if err != nil {
			for _, v := range out {
				clear(v)
			}
			return nil, nil, false
		}
		out[row.name] = pt
	}
	for _, n := range names {
		if _, found := out[n]; !found {
			missing = append(missing, n)
		}
	}
	return out, missing, true
}
