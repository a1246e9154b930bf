package hierarchy

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/provider"
)

// RecoveryResult is what AddRecovery or Recover did.
type RecoveryResult struct {
	Done  int // intermediate keys wrapped (AddRecovery) or recovered (Recover) by this call
	Total int // intermediate keys of the chain
	// Already counts the keys that needed nothing: already wrapped under
	// the recovery key (AddRecovery), or already unwrapping under the
	// KEK's primary (Recover).
	Already int
}

// RecoveryKey is one recovery key of a chain, as RecoveryStatus reports it.
type RecoveryKey struct {
	Provider string
	KeyID    string
	// IntermediateKeys counts the chain's intermediate keys wrapped under
	// it; fewer than the chain's total means some (made after the last
	// AddRecovery) cannot be recovered with it.
	IntermediateKeys int64
}

// ErrNoRecoveryWrap: an intermediate key has no recovery wrap under the
// recovery key Recover was given.
var ErrNoRecoveryWrap = errors.New("hierarchy: no recovery wrap under that key")

// listRows reads the chain's intermediate keys, oldest first.
func (p *Provider) listRows(ctx context.Context) ([]row, error) {
	rows, err := p.pool.Query(ctx, p.rowQuery("ORDER BY i.version"), p.keyID)
	if err != nil {
		return nil, err
	}
	var out []row
	for rows.Next() {
		r, err := p.scanRow(rows)
		if err != nil {
			rows.Close()
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// AddRecovery wraps every intermediate key of the chain that has no
// recovery wrap under rec's key yet under it as well (the same associated
// data as its primary wrap, so a wrap only opens as the key and version it
// was made for), checks that rec unwraps it back to the same key, and
// records it in intermediate_key_recovery with an ik.recovery.add event:
// one unwrap at the KEK and a wrap and an unwrap at rec per key. Each key
// commits on its own, so an interrupted call is resumed by calling it
// again; concurrent calls insert each wrap once. Intermediate keys made
// later (rotation) are not covered until AddRecovery runs again:
// RecoveryStatus tells.
func (p *Provider) AddRecovery(ctx context.Context, rec provider.KEKProvider) (RecoveryResult, error) {
	var res RecoveryResult
	ref := rec.Ref()
	rows, err := p.listRows(ctx)
	if err != nil {
		return res, fmt.Errorf("hierarchy: add recovery: %w", err)
	}
	res.Total = len(rows)
	for _, r := range rows {
		var have bool
		if err := p.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+p.q+`.intermediate_key_recovery
WHERE key_id = $1 AND version = $2 AND provider = $3 AND recovery_key_id = $4)`, p.keyID, int32(r.version), ref.Provider, ref.KeyID).Scan(&have); err != nil {
			return res, fmt.Errorf("hierarchy: add recovery: %w", err)
		}
		if have {
			res.Already++
			continue
		}
		if err := p.addRecoveryWrap(ctx, rec, r); err != nil {
			return res, err
		}
		res.Done++
	}
	return res, nil
}

func (p *Provider) addRecoveryWrap(ctx context.Context, rec provider.KEKProvider, r row) error {
	aad := ikAAD(p.keyID, r.version)
	raw, err := p.kek.Unwrap(ctx, &r.wk, aad)
	if err != nil {
		return fmt.Errorf("hierarchy: add recovery: unwrap intermediate key %s@%d: %w", p.keyID, r.version, err)
	}
	defer provider.Clear(raw)
	wk, err := rec.Wrap(ctx, raw, aad)
	if err != nil {
		return fmt.Errorf("hierarchy: add recovery: wrap intermediate key %s@%d under %s: %w", p.keyID, r.version, rec.Ref(), err)
	}
	back, err := rec.Unwrap(ctx, wk, aad)
	if err != nil {
		return fmt.Errorf("hierarchy: add recovery: check the recovery wrap of %s@%d: %w", p.keyID, r.version, err)
	}
	same := subtle.ConstantTimeCompare(back, raw) == 1
	provider.Clear(back)
	if !same {
		return fmt.Errorf("hierarchy: add recovery: %s unwrapped the recovery wrap of %s@%d to another key", rec.Ref(), p.keyID, r.version)
	}
	_, err = p.pool.Exec(ctx, `WITH ins AS (
  INSERT INTO `+p.q+`.intermediate_key_recovery (key_id, version, provider, recovery_key_id, key_version, wrapped_key)
  VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1)
INSERT INTO `+p.q+`.key_events (event, kek_id, count, actor, detail)
SELECT 'ik.recovery.add', $7, 1, $8, jsonb_build_object('version', 'intermediate:' || $1 || '@' || $2, 'recovery', $9::text) FROM ins`,
		p.keyID, int32(r.version), wk.Provider, wk.KeyID, wk.Version, wk.Ciphertext, r.kekID, p.actor, wk.Ref().String()+"@"+wk.Version)
	if err != nil {
		return fmt.Errorf("hierarchy: add recovery: record the recovery wrap of %s@%d: %w", p.keyID, r.version, err)
	}
	p.log.Info("hierarchy: added recovery wrap", "key", p.keyID, "version", r.version, "recovery", wk.Ref().String())
	return nil
}

// Recover restores the chain when the KEK that wraps its intermediate
// keys is lost (destroyed, disabled, its account gone): for each
// intermediate key that the KEK keyring cannot unwrap, it unwraps the
// key's recovery wrap with rec, wraps the key under the keyring's primary
// (the new KEK) and replaces the key's primary wrap with it, with an
// ik.recover event. Data keys are not touched: they stay wrapped under the
// same intermediate keys, whose bytes do not change. Keys the primary
// unwraps already are left alone, so an interrupted Recover is resumed by
// calling it again. A key without a recovery wrap under rec is
// ErrNoRecoveryWrap, after the others were recovered.
func (p *Provider) Recover(ctx context.Context, rec provider.KEKProvider) (RecoveryResult, error) {
	var res RecoveryResult
	ref := rec.Ref()
	p.load.Lock()
	defer p.load.Unlock()
	rows, err := p.listRows(ctx)
	if err != nil {
		return res, fmt.Errorf("hierarchy: recover: %w", err)
	}
	res.Total = len(rows)
	var missing []uint32
	for _, r := range rows {
		aad := ikAAD(p.keyID, r.version)
		if raw, err := p.kek.Unwrap(ctx, &r.wk, aad); err == nil {
			provider.Clear(raw)
			res.Already++
			continue
		} else if ctx.Err() != nil {
			return res, fmt.Errorf("hierarchy: recover: %w", ctx.Err())
		}
		var rwk provider.WrappedKey
		err := p.pool.QueryRow(ctx, `SELECT provider, recovery_key_id, key_version, wrapped_key FROM `+p.q+`.intermediate_key_recovery
WHERE key_id = $1 AND version = $2 AND provider = $3 AND recovery_key_id = $4`, p.keyID, int32(r.version), ref.Provider, ref.KeyID).
			Scan(&rwk.Provider, &rwk.KeyID, &rwk.Version, &rwk.Ciphertext)
		if errors.Is(err, pgx.ErrNoRows) {
			missing = append(missing, r.version)
			continue
		}
		if err != nil {
			return res, fmt.Errorf("hierarchy: recover: %w", err)
		}
		if err := p.recoverOne(ctx, rec, r, &rwk, aad); err != nil {
			return res, err
		}
		res.Done++
	}
	if len(missing) > 0 {
		return res, fmt.Errorf("%w: intermediate keys %s@%v do not unwrap under the KEK and have no recovery wrap under %s", ErrNoRecoveryWrap, p.keyID, missing, ref)
	}
	return res, nil
}

func (p *Provider) recoverOne(ctx context.Context, rec provider.KEKProvider, r row, rwk *provider.WrappedKey, aad []byte) error {
	raw, err := rec.Unwrap(ctx, rwk, aad)
	if err != nil {
		return fmt.Errorf("hierarchy: recover: unwrap the recovery wrap of %s@%d: %w", p.keyID, r.version, err)
	}
	defer provider.Clear(raw)
	nwk, err := p.kek.Wrap(ctx, raw, aad)
	if err != nil {
		return fmt.Errorf("hierarchy: recover: wrap %s@%d under the new KEK: %w", p.keyID, r.version, err)
	}
	kid, err := p.recordKEK(ctx, nwk.Provider, nwk.KeyID, nwk.Version)
	if err != nil {
		return fmt.Errorf("hierarchy: recover: %w", err)
	}
	from := r.wk.Ref().String() + "@" + r.wk.Version
	to := nwk.Ref().String() + "@" + nwk.Version
	// Only if the row still holds the wrap this call found unusable: a
	// concurrent Recover's result stands.
	var n int
	err = p.pool.QueryRow(ctx, `WITH u AS (
  UPDATE `+p.q+`.intermediate_keys SET wrapped_key = $3, kek_id = $4, rewrapped_at = now()
  WHERE key_id = $1 AND version = $2 AND kek_id = $5 AND wrapped_key = $6 RETURNING version),
e AS (INSERT INTO `+p.q+`.key_events (event, kek_id, count, actor, detail)
  SELECT 'ik.recover', $4, 1, $7, jsonb_build_object('version', 'intermediate:' || $1 || '@' || $2, 'from', $8::text, 'to', $9::text, 'recovery', $10::text) FROM u)
SELECT count(*) FROM u`, p.keyID, int32(r.version), nwk.Ciphertext, kid, r.kekID, r.wk.Ciphertext, p.actor, from, to, rwk.Ref().String()+"@"+rwk.Version).Scan(&n)
	if err != nil {
		return fmt.Errorf("hierarchy: recover %s@%d: %w", p.keyID, r.version, err)
	}
	if n > 0 {
		p.log.Warn("hierarchy: recovered intermediate key with its recovery wrap", "key", p.keyID, "version", r.version, "from", from, "to", to, "recovery", rwk.Ref().String())
	}
	return nil
}

// RecoveryStatus lists the recovery keys of the chain, each with the
// number of its intermediate keys it wraps, and the chain's number of
// intermediate keys. It reads the database only.
func (p *Provider) RecoveryStatus(ctx context.Context) ([]RecoveryKey, int64, error) {
	var total int64
	if err := p.pool.QueryRow(ctx, `SELECT count(*) FROM `+p.q+`.intermediate_keys WHERE key_id = $1`, p.keyID).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("hierarchy: recovery status: %w", err)
	}
	rows, err := p.pool.Query(ctx, `SELECT provider, recovery_key_id, count(*) FROM `+p.q+`.intermediate_key_recovery
WHERE key_id = $1 GROUP BY 1, 2 ORDER BY 1, 2`, p.keyID)
	if err != nil {
		return nil, 0, fmt.Errorf("hierarchy: recovery status: %w", err)
	}
	var (
		out []RecoveryKey
		k   RecoveryKey
	)
	if _, err := pgx.ForEachRow(rows, []any{&k.Provider, &k.KeyID, &k.IntermediateKeys}, func() error { out = append(out, k); return nil }); err != nil {
		return nil, 0, fmt.Errorf("hierarchy: recovery status: %w", err)
	}
	return out, total, nil
}
