package pgstore

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/profullstack/keybroker/internal/keys"
	"github.com/profullstack/keybroker/provider"
)

// ReencryptOptions configures Reencrypt.
type ReencryptOptions struct {
	// BatchSize is the secrets re-encrypted per transaction;
	// DefaultBatchSize when zero.
	BatchSize int
	// DryRun counts what would be re-encrypted and changes nothing.
	DryRun bool
	// Resume continues an interrupted call: it re-encrypts the secrets
	// still under retired data keys without retiring the current one.
	Resume bool
	// Wait is how long Reencrypt keeps retrying, with growing pauses, to
	// re-encrypt what is still under the retired data keys and destroy
	// them while some remain referenced. Zero: one pass (RemainingKeys
	// then says what is left).
	Wait time.Duration
	// Progress, when set, is called after each committed batch.
	Progress func(ReencryptProgress)
}

// ReencryptProgress reports Reencrypt's progress.
type ReencryptProgress struct {
	Done  int64 // secrets re-encrypted so far by this call
	Total int64 // secrets to re-encrypt when the call started
}

// ReencryptResult is what Reencrypt did, or (DryRun) would do.
type ReencryptResult struct {
	Pending       int64 // secrets to re-encrypt when the call started
	Reencrypted   int64 // secrets re-encrypted by this call
	RetiredKeys   int64 // data keys this call retired
	DestroyedKeys int64 // retired data keys deleted because no secret needs them any more
	RemainingKeys int64 // retired data keys still referenced when the call returned (re-run with Resume, or a longer Wait)
}

// Reencrypt re-encrypts every secret of project under a fresh data key, for
// when a data key may have been exposed. It first retires the project's
// data keys (state 'retired'; new writes then get a fresh key), then, in
// batches, each its own transaction, decrypts every secret still under a
// retired key, encrypts it under the project's new active key, checks that
// the new ciphertext decrypts to the same bytes, and only then updates the
// row. Finally it deletes every retired data key no secret references: its
// wrapped form is gone, so nothing it encrypted can ever be decrypted.
//
// Writers in every process are fenced by the database: a Put (and
// MigratePlaintext, and Reencrypt's own update) stores an envelope only if
// its data key is not retired when the statement runs, reading the key's
// row FOR KEY SHARE; the retire locks the keys FOR UPDATE, so a write
// racing it waits and then sees the committed state.
// Once the retiring transaction has committed, no process stores anything
// under the retired keys; writers whose reservation was on them redo the
// encryption under the project's new key.
//
// A failing batch is rolled back, leaving its secrets as they were; the
// retired keys stay retired and still decrypt, and a call with Resume
// finishes the work. Retired keys still referenced at the end (after
// retrying for up to ReencryptOptions.Wait) are reported through
// RemainingKeys. Run one Reencrypt per project at a time.
func (s *Store) Reencrypt(ctx context.Context, project string, opts ReencryptOptions) (ReencryptResult, error) {
	var res ReencryptResult
	if err := checkProject(project); err != nil {
		return res, err
	}
	batch := opts.BatchSize
	if batch == 0 {
		batch = DefaultBatchSize
	}
	if batch < 1 {
		return res, fmt.Errorf("%w: batch size %d", ErrInvalidArgument, batch)
	}
	states := []string{"retired"}
	if !opts.Resume {
		states = append(states, "active", "spent")
	}
	err := s.scoped(ctx, project, func(b *pgx.Batch) {
		b.Queue(`SELECT count(*) FROM `+s.q+`.encrypted_secrets s JOIN `+s.q+`.data_keys d ON d.id = s.data_key_id
WHERE s.project_id = $1 AND d.state = ANY($2)`, project, states).QueryRow(func(r pgx.Row) error { return r.Scan(&res.Pending) })
	})
	if err != nil {
		return res, fmt.Errorf("pgstore: reencrypt: %w", err)
	}
	if opts.DryRun {
		return res, nil
	}
	if !opts.Resume {
		err := WithProject(ctx, s.pool, project, func(tx pgx.Tx) error {
			// FOR UPDATE first: the writers' fence reads the key FOR KEY
			// SHARE, which a non-key UPDATE alone would not make wait.
			if _, err := tx.Exec(ctx, `SELECT id FROM `+s.q+`.data_keys WHERE project_id = $1 AND scope = '' AND state IN ('active', 'spent') FOR UPDATE`, project); err != nil {
				return err
			}
			ct, err := tx.Exec(ctx, `UPDATE `+s.q+`.data_keys SET state = 'retired' WHERE project_id = $1 AND scope = '' AND state IN ('active', 'spent')`, project)
			if err != nil {
				return err
			}
			res.RetiredKeys = ct.RowsAffected()
			return s.event(ctx, tx, "dek.retire", project, 0, nil, res.RetiredKeys, map[string]any{"reason": "reencrypt"})
		})
		if err != nil {
			return res, fmt.Errorf("pgstore: reencrypt: retire data keys: %w", err)
		}
		s.dropReservation(project, secretsScope)
	}
	deadline := time.Now().Add(opts.Wait)
	for pause := 10 * time.Millisecond; ; pause = min(2*pause, time.Second) {
		if err := s.reencryptPass(ctx, project, batch, &res, opts.Progress); err != nil {
			return res, err
		}
		destroyed, remaining, err := s.destroyRetired(ctx, project)
		res.DestroyedKeys += destroyed
		res.RemainingKeys = remaining
		if err != nil {
			return res, err
		}
		if remaining == 0 || !time.Now().Add(pause).Before(deadline) {
			break
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return res, ctx.Err()
		case <-t.C:
		}
	}
	s.log.Info("pgstore: re-encrypted project", "project", project, "secrets", res.Reencrypted,
		"destroyed_keys", res.DestroyedKeys, "remaining_keys", res.RemainingKeys)
	return res, nil
}

// dropReservation forgets this process's reservation on project's key of
// scope.
func (s *Store) dropReservation(project, scope string) {
	pk := s.project(project, scope)
	pk.mu.Lock()
	pk.valid = false
	pk.mu.Unlock()
}

// errStaleKey aborts a write whose new data key was retired or removed
// before its statement ran: it is redone under a fresh one.
var errStaleKey = errors.New("pgstore: data key retired or removed concurrently")

// reencryptPass re-encrypts, batch by batch, the project's secrets under
// retired data keys (keys.ReencryptPasses: until a read finds none or
// three batches in a row change nothing).
func (s *Store) reencryptPass(ctx context.Context, project string, batch int, res *ReencryptResult, progress func(ReencryptProgress)) error {
	before := res.Reencrypted
	var report func(int64)
	if progress != nil {
		report = func(done int64) { progress(ReencryptProgress{Done: before + done, Total: res.Pending}) }
	}
	n, err := keys.ReencryptPasses(func() (int64, int64, error) { return s.reencryptBatch(ctx, project, batch) }, report)
	res.Reencrypted += n
	return err
}

// reencryptBatch re-encrypts up to batch secrets still under retired keys
// and returns how many it read and how many it changed. It holds no lock
// while it decrypts and encrypts: the read takes none, and the update, in
// one statement, replaces only rows still holding the envelope read (same
// data key and nonce), under a new key that is not retired then (the same
// fence as Put's). A row a writer changed meanwhile is left to
// the writer, whose fence kept it off the retired keys. Writers never wait
// for this batch's decryption, encryption or key service calls.
func (s *Store) reencryptBatch(ctx context.Context, project string, batch int) (read, n int64, err error) {
	for attempt := 1; ; attempt++ {
		read, n, err = s.reencryptOnce(ctx, project, batch)
		if !errors.Is(err, errStaleKey) {
			return read, n, err
		}
		s.dropReservation(project, secretsScope)
		if attempt == maxWriteAttempts {
			return read, 0, fmt.Errorf("%w: reencrypt project %q: new data key retired or removed on each of %d attempts", ErrNoActiveKey, project, attempt)
		}
	}
}

func (s *Store) reencryptOnce(ctx context.Context, project string, batch int) (read, n int64, err error) {
	type row struct {
		name        string
		blob, nonce []byte
		id          pgtype.UUID
		wk          provider.WrappedKey
	}
	var todo []row
	err = s.scoped(ctx, project, func(b *pgx.Batch) {
		b.Queue(`SELECT s.name, s.encrypted_data, s.nonce, s.data_key_id, d.wrapped_dek, k.provider, k.key_id, k.key_version
FROM `+s.q+`.encrypted_secrets s
JOIN `+s.q+`.data_keys d ON d.id = s.data_key_id
JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE s.project_id = $1 AND d.state = 'retired'
ORDER BY s.name LIMIT $2`, project, batch).Query(func(rows pgx.Rows) error {
			var r row
			_, err := pgx.ForEachRow(rows, []any{&r.name, &r.blob, &r.nonce, &r.id, &r.wk.Ciphertext, &r.wk.Provider, &r.wk.KeyID, &r.wk.Version}, func() error {
				todo = append(todo, r)
				return nil
			})
			return err
		})
	})
	if err != nil || len(todo) == 0 {
		if err != nil {
			err = fmt.Errorf("pgstore: reencrypt project %q: %w", project, err)
		}
		return 0, 0, err
	}
	names := make([]string, len(todo))
	blobs := make([][]byte, len(todo))
	nonces := make([][]byte, len(todo))
	ids := make([]pgtype.UUID, len(todo))
	oldIDs := make([]pgtype.UUID, len(todo))
	oldNonces := make([][]byte, len(todo))
	for i := range todo {
		t := &todo[i]
		aad := secretAAD(project, t.name)
		pt, err := s.open(ctx, project, t.id.Bytes, &t.wk, t.blob, t.nonce, aad)
		if err != nil {
			return 0, 0, fmt.Errorf("pgstore: reencrypt project %q: secret %q: %w", project, t.name, err)
		}
		id, blob, nonce, err := s.sealVerified(ctx, project, pt, aad)
		provider.Clear(pt)
		if err != nil {
			return 0, 0, fmt.Errorf("pgstore: reencrypt project %q: secret %q: %w", project, t.name, err)
		}
		names[i], blobs[i], nonces[i], ids[i] = t.name, blob, nonce, uuidParam(id)
		oldIDs[i], oldNonces[i] = t.id, t.nonce
	}
	var keys int64
	err = WithProject(ctx, s.pool, project, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `WITH k AS (SELECT id FROM `+s.q+`.data_keys
  WHERE project_id = $1 AND id = ANY($5::uuid[]) AND state <> 'retired' FOR KEY SHARE),
upd AS (UPDATE `+s.q+`.encrypted_secrets s
  SET encrypted_data = u.b, nonce = u.n, data_key_id = u.k, updated_at = now()
  FROM unnest($2::text[], $3::bytea[], $4::bytea[], $5::uuid[], $6::uuid[], $7::bytea[]) AS u(name, b, n, k, old, oldn)
  JOIN k ON k.id = u.k
  WHERE s.project_id = $1 AND s.name = u.name AND s.data_key_id = u.old AND s.nonce = u.oldn
  RETURNING 1)
SELECT (SELECT count(*) FROM k), (SELECT count(*) FROM upd)`, project, names, blobs, nonces, ids, oldIDs, oldNonces).Scan(&keys, &n); err != nil {
			return err
		}
		if keys == 0 {
			return errStaleKey
		}
		if n == 0 {
			return nil
		}
		return s.event(ctx, tx, "dek.reencrypt", project, 0, nil, n, nil)
	})
	if errors.Is(err, errStaleKey) {
		return int64(len(todo)), 0, err
	}
	if err != nil {
		return int64(len(todo)), 0, fmt.Errorf("pgstore: reencrypt project %q: %w", project, err)
	}
	return int64(len(todo)), n, nil
}

// sealVerified encrypts pt under the project's active data key and checks
// that the result decrypts to pt, through the same path Get takes.
func (s *Store) sealVerified(ctx context.Context, project string, pt, aad []byte) ([16]byte, []byte, []byte, error) {
	id, blob, nonce, err := s.seal(ctx, project, secretsScope, pt, aad)
	if err != nil {
		return id, nil, nil, err
	}
	back, err := s.open(ctx, project, id, nil, blob, nonce, aad)
	if err != nil {
		return id, nil, nil, fmt.Errorf("%w: %v", ErrVerify, err)
	}
	same := subtle.ConstantTimeCompare(back, pt) == 1 && len(back) == len(pt)
	provider.Clear(back)
	if !same {
		return id, nil, nil, ErrVerify
	}
	return id, blob, nonce, nil
}

// destroyRetired deletes the project's retired data keys that no secret
// references and counts those left. The foreign key from encrypted_secrets
// makes the delete fail rather than orphan a secret written concurrently;
// then it is retried with a fresh snapshot that sees the new reference.
func (s *Store) destroyRetired(ctx context.Context, project string) (destroyed, remaining int64, err error) {
	for attempt := 0; ; attempt++ {
		var gone []pgtype.UUID
		err = WithProject(ctx, s.pool, project, func(tx pgx.Tx) error {
			rows, err := tx.Query(ctx, `DELETE FROM `+s.q+`.data_keys d WHERE project_id = $1 AND scope = '' AND state = 'retired'
AND NOT EXISTS (SELECT 1 FROM `+s.q+`.encrypted_secrets s WHERE s.project_id = d.project_id AND s.data_key_id = d.id) RETURNING id`, project)
			if err != nil {
				return err
			}
			if gone, err = pgx.CollectRows(rows, pgx.RowTo[pgtype.UUID]); err != nil {
				return err
			}
			if err := tx.QueryRow(ctx, `SELECT count(*) FROM `+s.q+`.data_keys WHERE project_id = $1 AND scope = '' AND state = 'retired'`, project).Scan(&remaining); err != nil {
				return err
			}
			for _, id := range gone {
				if err := s.event(ctx, tx, "dek.destroy", project, 0, &id.Bytes, 1, nil); err != nil {
					return err
				}
			}
			return nil
		})
		if pgCode(err) == "23503" && attempt < 3 {
			continue
		}
		if err != nil {
			return 0, 0, fmt.Errorf("pgstore: reencrypt: destroy retired data keys: %w", err)
		}
		for _, id := range gone {
			s.cache.Remove(cacheID(project, id.Bytes))
		}
		return int64(len(gone)), remaining, nil
	}
}
