package pgstore

import (
	"context"
	"fmt"

	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
)

// AddRecovery wraps each intermediate key of the deployment's chain under
// rec as well (a recovery, or break-glass, key: an offline keyring kept in
// a safe, a KMS key in another account or region), so that Recover can
// restore service if the deployment's KEK is lost; see
// hierarchy.Provider.AddRecovery. One call per intermediate key, whatever
// the number of data keys; resumable; each wrap is checked and recorded as
// an ik.recovery.add event. Keys made by later rotations need another
// AddRecovery (Status.Recovery shows what each recovery key covers).
// Projects bound to their own KEK are left out on purpose: a recovery wrap
// held by the deployment would undo the crypto-shredding their owners get
// by destroying their key. ErrNotSupported with Config.DirectKEK, where
// data keys are under the KEK itself.
func (s *Store) AddRecovery(ctx context.Context, rec provider.KEKProvider) (hierarchy.RecoveryResult, error) {
	if s.direct {
		return hierarchy.RecoveryResult{}, fmt.Errorf("%w: recovery wraps need the key hierarchy (Config.DirectKEK is set)", ErrNotSupported)
	}
	res, err := s.ik.AddRecovery(ctx, rec)
	if err != nil {
		return res, fmt.Errorf("pgstore: %w", err)
	}
	return res, nil
}

// RecoverResult is what Recover did.
type RecoverResult struct {
	hierarchy.RecoveryResult
	// DirectDataKeys counts data keys of unbound projects wrapped directly
	// under a KEK rather than under an intermediate key (a database from
	// before the hierarchy not yet rewrapped, or DirectKEK): recovery wraps
	// do not cover them, and they are lost with their KEK.
	DirectDataKeys int64
}

// Recover restores the deployment's chain of intermediate keys with the
// recovery key rec after the KEK that wrapped them was lost: each one the
// Store's KEK keyring cannot unwrap is unwrapped from its recovery wrap
// and wrapped under the keyring's primary (the new KEK), with an
// ik.recover event; see hierarchy.Provider.Recover. Data keys and secrets
// are not touched. Resumable: call it again after an interruption.
func (s *Store) Recover(ctx context.Context, rec provider.KEKProvider) (RecoverResult, error) {
	var res RecoverResult
	if s.direct {
		return res, fmt.Errorf("%w: recovery wraps need the key hierarchy (Config.DirectKEK is set)", ErrNotSupported)
	}
	r, err := s.ik.Recover(ctx, rec)
	res.RecoveryResult = r
	if err != nil {
		return res, fmt.Errorf("pgstore: %w", err)
	}
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM `+s.q+`.data_keys d JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE k.provider <> $1 AND `+s.unbound("d"), hierarchy.Scheme).Scan(&res.DirectDataKeys); err != nil {
		return res, fmt.Errorf("pgstore: recover: %w", err)
	}
	s.log.Warn("pgstore: recovered intermediate keys under the new KEK", "recovered", r.Done, "total", r.Total, "direct_data_keys", res.DirectDataKeys)
	return res, nil
}
