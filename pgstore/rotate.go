package pgstore

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
)

// KEKVersion names one version of a KEK.
type KEKVersion struct {
	Provider string // backend scheme, as in provider.KeyRef
	KeyID    string
	Version  string
}

func (v KEKVersion) String() string { return v.Provider + ":" + v.KeyID + "@" + v.Version }

// ErrNotSupported: the primary provider cannot do what was asked (for
// example rotate: rotate the key in the key service, then call Rewrap).
var ErrNotSupported = errors.New("pgstore: not supported by the provider")

// DefaultBatchSize is the rows per transaction of Rewrap, Reencrypt and
// MigratePlaintext when their options leave it zero.
const DefaultBatchSize = 1000

// PrimaryVersion returns the version new data keys are wrapped under (with
// the key hierarchy, the current intermediate key's):
// what the primary provider's Describe reports or, for a provider that is
// not a provider.Describer, the version of a throwaway key it wraps. It
// records the version in the kek table.
func (s *Store) PrimaryVersion(ctx context.Context) (KEKVersion, error) {
	v, _, err := s.primary(ctx)
	return v, err
}

// KEKPrimaryVersion returns the deployment KEK's primary version (as
// PrimaryVersion finds it), the one intermediate keys are wrapped under;
// with DirectKEK it is PrimaryVersion.
func (s *Store) KEKPrimaryVersion(ctx context.Context) (KEKVersion, error) {
	v, _, err := s.primaryOf(ctx, s.keyring.Primary())
	return v, err
}

func (s *Store) primary(ctx context.Context) (KEKVersion, int64, error) {
	return s.primaryOf(ctx, s.dek.Primary())
}

// primaryOf is primary for provider p (the data keys' primary, or the
// deployment KEK's).
func (s *Store) primaryOf(ctx context.Context, p provider.KEKProvider) (KEKVersion, int64, error) {
	ref := p.Ref()
	v := KEKVersion{Provider: ref.Provider, KeyID: ref.KeyID}
	if d, ok := p.(provider.Describer); ok {
		st, err := d.Describe(ctx)
		if err != nil {
			return v, 0, fmt.Errorf("pgstore: primary key version: %w", err)
		}
		v.Version = st.PrimaryVersion
	}
	if v.Version == "" {
		probe := make([]byte, 32)
		if _, err := rand.Read(probe); err != nil {
			return v, 0, fmt.Errorf("pgstore: primary key version: %w", err)
		}
		wk, err := p.Wrap(ctx, probe, []byte("keybroker/probe/v1"))
		provider.Clear(probe)
		if err != nil {
			return v, 0, fmt.Errorf("pgstore: primary key version: %w", err)
		}
		v.Version = wk.Version
	}
	id, err := s.kekRowFor(ctx, s.pool, v.Provider, v.KeyID, v.Version)
	return v, id, err
}

// RotateKEK makes a new version of the deployment's primary KEK (the
// provider must be a provider.Rotator, else ErrNotSupported), records it
// in the kek table and the audit trail, and returns it. Without the key
// hierarchy new data keys are wrapped under it at once and existing ones
// stay under their version until Rewrap; with it, new intermediate keys
// are, and Rewrap rewraps the existing intermediate keys to it (one
// key-service call each), leaving data keys as they are.
func (s *Store) RotateKEK(ctx context.Context) (KEKVersion, error) {
	p := s.keyring.Primary()
	ref := p.Ref()
	r, ok := p.(provider.Rotator)
	if !ok {
		return KEKVersion{}, fmt.Errorf("%w: %s cannot rotate keys; rotate it in the key service, then rewrap", ErrNotSupported, ref)
	}
	ver, err := r.Rotate(ctx)
	if err != nil {
		return KEKVersion{}, fmt.Errorf("pgstore: rotate: %w", err)
	}
	v := KEKVersion{Provider: ref.Provider, KeyID: ref.KeyID, Version: ver}
	id, err := s.kekRowFor(ctx, s.pool, v.Provider, v.KeyID, v.Version)
	if err != nil {
		return v, err
	}
	if err := s.event(ctx, s.pool, "kek.rotate", "", id, nil, 1, map[string]any{"version": v.String()}); err != nil {
		return v, err
	}
	s.log.Info("pgstore: rotated KEK", "kek", v.String())
	return v, nil
}

// RotateIntermediate makes a new intermediate key version (one
// key-service call, to wrap it), the one new data keys are wrapped under
// from now on, in every process within its Config.CacheTTL; Rewrap then
// moves existing data keys to it locally. ErrNotSupported with
// Config.DirectKEK.
func (s *Store) RotateIntermediate(ctx context.Context) (KEKVersion, error) {
	if s.direct {
		return KEKVersion{}, fmt.Errorf("%w: the key hierarchy is off (Config.DirectKEK)", ErrNotSupported)
	}
	ver, err := s.ik.Rotate(ctx)
	if err != nil {
		return KEKVersion{}, fmt.Errorf("pgstore: rotate intermediate key: %w", err)
	}
	ref := s.ik.Ref()
	v := KEKVersion{Provider: ref.Provider, KeyID: ref.KeyID, Version: ver}
	id, err := s.kekRowFor(ctx, s.pool, v.Provider, v.KeyID, v.Version)
	if err != nil {
		return v, err
	}
	if err := s.event(ctx, s.pool, "ik.rotate", "", id, nil, 1, map[string]any{"version": v.String()}); err != nil {
		return v, err
	}
	s.log.Info("pgstore: rotated intermediate key", "version", v.String())
	return v, nil
}

// DefaultLockWait is how long Rewrap waits for a data key another
// transaction holds locked when RewrapOptions.LockWait is zero.
const DefaultLockWait = 10 * time.Second

// RewrapOptions configures Rewrap.
type RewrapOptions struct {
	// BatchSize is the data keys rewrapped per transaction;
	// DefaultBatchSize when zero.
	BatchSize int
	// DryRun counts what would be rewrapped and changes nothing.
	DryRun bool
	// LockWait is how long Rewrap waits for each data key another
	// transaction holds locked (another Rewrap's batch, or the open
	// transaction of a worker that died) once it has done every unlocked
	// one, before giving up on it and counting it in
	// RewrapResult.Skipped. DefaultLockWait when zero; negative: no wait.
	LockWait time.Duration
	// Progress, when set, is called after each committed batch.
	Progress func(RewrapProgress)
}

// RewrapProgress reports Rewrap's progress.
type RewrapProgress struct {
	Done  int64 // data keys this call has rewrapped so far
	Total int64 // data keys that needed rewrapping when the call started
}

// VersionCount is a number of data keys under one KEK version.
type VersionCount struct {
	KEKVersion
	DataKeys int64
}

// CorruptKey names a data key whose wrapped form does not unwrap (altered,
// truncated, or not wrapped for this row): Rewrap leaves it as it is.
type CorruptKey struct {
	Project   string
	DataKeyID [16]byte
	KEKVersion
}

// RewrapResult is what Rewrap did, or (DryRun) would do.
type RewrapResult struct {
	Primary KEKVersion // the version data keys were rewrapped to
	// IntermediateKeys counts the intermediate keys rewrapped to the
	// deployment KEK's primary version (after RotateKEK or a move between
	// backends): one key-service call each. Always 0 in a dry run.
	IntermediateKeys int
	Pending          []VersionCount // data keys not under Primary when the call started, by version
	Rewrapped        int64          // data keys rewrapped by this call (0 in a dry run)
	// Skipped counts data keys still pending, other than Corrupt, after
	// another transaction held them locked for longer than LockWait.
	Skipped int64
	// Corrupt lists the data keys that failed to unwrap, each also logged
	// and recorded as a dek.corrupt event; the others were rewrapped.
	Corrupt []CorruptKey
	// Remaining counts the data keys not under Primary when the call
	// returned, recounted then (so it includes Skipped, Corrupt and keys
	// other processes wrapped under older versions meanwhile). Rewrap is
	// done only when it is zero; in a dry run it is the pending total.
	Remaining int64
}

// Rewrap first (unless DryRun) rewraps every
// intermediate key not under the deployment KEK's primary version to it
// (hierarchy.Provider.RewrapKEK: O(intermediate keys) key-service calls).
// It then rewraps every data key not wrapped under the data keys' primary
// version — the current intermediate key, or with DirectKEK the KEK's
// primary version — (an older version, another provider of the keyring,
// or directly under the KEK in a database from before the hierarchy) to
// it, with provider.Keyring.Rewrap: locally from one intermediate key to
// another, inside the key service when it can, else by unwrapping and
// wrapping again. It changes only data_keys rows: secrets
// are not touched, so the work is proportional to data keys, not secrets.
//
// Each batch is its own transaction, with its kek.rewrap event, and locks
// its rows with FOR NO KEY UPDATE SKIP LOCKED, so several processes can
// share the work (each skipping the others' rows), Puts and Gets are not
// blocked, and a crash loses at most the uncommitted batch. Once no
// unlocked row is left, Rewrap waits (RewrapOptions.LockWait) for the rows
// others hold: a concurrent worker's rows are then done by it, a dead
// worker's are done by this call. A data key that does not unwrap
// (provider.ErrInvalidCiphertext or envelope.ErrDecrypt) is reported in
// RewrapResult.Corrupt and never stops the others; any other provider
// error (unavailable, denied, key not found) stops Rewrap. The result's
// Remaining is recounted at the end: a caller is done only when it is zero,
// whatever other workers did. Rewrap needs a role that row-level security
// does not restrict.
func (s *Store) Rewrap(ctx context.Context, opts RewrapOptions) (RewrapResult, error) {
	var res RewrapResult
	batch := opts.BatchSize
	if batch == 0 {
		batch = DefaultBatchSize
	}
	if batch < 1 {
		return res, fmt.Errorf("%w: batch size %d", ErrInvalidArgument, batch)
	}
	wait := opts.LockWait
	if wait == 0 {
		wait = DefaultLockWait
	}
	if !opts.DryRun {
		ir, err := s.ik.RewrapKEK(ctx)
		if err != nil {
			return res, fmt.Errorf("pgstore: %w", err)
		}
		res.IntermediateKeys = ir.Rewrapped
	}
	primary, primaryID, err := s.primary(ctx)
	if err != nil {
		return res, err
	}
	res.Primary = primary
	rows, err := s.pool.Query(ctx, `SELECT k.provider, k.key_id, k.key_version, count(*)
FROM `+s.q+`.data_keys d JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE d.kek_id <> $1 AND `+s.unbound("d")+` GROUP BY 1, 2, 3 ORDER BY 1, 2, 3`, primaryID)
	if err != nil {
		return res, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	var vc VersionCount
	_, err = pgx.ForEachRow(rows, []any{&vc.Provider, &vc.KeyID, &vc.Version, &vc.DataKeys}, func() error {
		res.Pending = append(res.Pending, vc)
		return nil
	})
	if err != nil {
		return res, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	var total int64
	for _, p := range res.Pending {
		total += p.DataKeys
	}
	if opts.DryRun || total == 0 {
		res.Remaining = total
		return res, s.rewrapTenants(ctx, opts, batch, &res)
	}
	kekIDs := map[string]int64{primary.Version: primaryID}
	corrupt := []pgtype.UUID{}
	// blocking: every unlocked row is done; wait for those others hold.
	blocking, timedOut := false, false
	// after: the highest id the last batch looked at. Batches go through
	// the table in id order from there (keyset pagination), so a batch
	// does not scan past the rows earlier ones did, which made a rewrap of
	// n data keys cost O(n²/batch) index reads; a pass that reaches the end
	// starts once more from the beginning, for rows skipped or wrapped
	// under an old version meanwhile, before Rewrap waits or stops.
	var after pgtype.UUID
	for {
		var lockWait time.Duration
		if blocking {
			lockWait = wait
		}
		n, bad, last, err := s.rewrapBatch(ctx, primary, primaryID, kekIDs, batch, corrupt, after, lockWait)
		if blocking && pgCode(err) == "55P03" { // lock_timeout
			timedOut = true
			break
		}
		if err != nil {
			return res, err
		}
		res.Rewrapped += n
		for _, c := range bad {
			corrupt = append(corrupt, uuidParam(c.DataKeyID))
			res.Corrupt = append(res.Corrupt, c)
		}
		if n > 0 {
			s.log.Info("pgstore: rewrapped data keys", "count", n, "done", res.Rewrapped, "to", primary.String())
			if opts.Progress != nil {
				opts.Progress(RewrapProgress{Done: res.Rewrapped, Total: total})
			}
		}
		if n > 0 || len(bad) > 0 {
			blocking, after = false, last
			continue
		}
		if after.Valid {
			after = pgtype.UUID{} // the end of this pass: once more from the start
			continue
		}
		if blocking || wait < 0 {
			break
		}
		blocking = true
	}
	if err := s.pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE id <> ALL($2::uuid[])) FROM `+s.q+`.data_keys d WHERE kek_id <> $1 AND `+s.unbound("d"),
		primaryID, corrupt).Scan(&res.Remaining, &res.Skipped); err != nil {
		return res, fmt.Errorf("pgstore: rewrap: recount: %w", err)
	}
	if !timedOut && wait >= 0 {
		// Keys left, if any, were wrapped under an old version after this
		// call looked: not skipped, but still Remaining.
		res.Skipped = 0
	}
	return res, s.rewrapTenants(ctx, opts, batch, &res)
}

// unbound is the SQL condition that data_keys row alias's project is not
// bound to a KEK of its own (rewrapTenants does those).
func (s *Store) unbound(alias string) string {
	return `NOT EXISTS (SELECT 1 FROM ` + s.q + `.project_keks b WHERE b.project_id = ` + alias + `.project_id)`
}

// isCorrupt reports whether err says a wrapped data key itself is bad, as
// opposed to the key service failing or refusing.
func isCorrupt(err error) bool {
	return errors.Is(err, provider.ErrInvalidCiphertext) || errors.Is(err, envelope.ErrDecrypt)
}

// rewrapBatch rewraps up to batch data keys with ids above after (any,
// when after is not Valid), other than those in exclude, in one
// transaction and returns how many it committed, which failed to unwrap,
// and the highest id it selected. With lockWait zero it skips rows other
// transactions hold; otherwise it waits up to lockWait for each (then
// fails with SQLSTATE 55P03).
func (s *Store) rewrapBatch(ctx context.Context, primary KEKVersion, primaryID int64, kekIDs map[string]int64, batch int, exclude []pgtype.UUID, after pgtype.UUID, lockWait time.Duration) (n int64, bad []CorruptKey, last pgtype.UUID, err error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return 0, nil, last, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	lock := "SKIP LOCKED"
	if lockWait > 0 {
		lock = ""
		if _, err := tx.Exec(ctx, `SELECT set_config('lock_timeout', $1, true)`, fmt.Sprintf("%dms", max(lockWait.Milliseconds(), 1))); err != nil {
			return 0, nil, last, fmt.Errorf("pgstore: rewrap: %w", err)
		}
	}
	type row struct {
		id      pgtype.UUID
		project string
		wk      provider.WrappedKey
	}
	args := []any{primaryID, batch, exclude}
	from := ""
	if after.Valid {
		from, args = "AND d.id > $4 ", append(args, after)
	}
	rows, err := tx.Query(ctx, `SELECT d.id, d.project_id, d.wrapped_dek, k.provider, k.key_id, k.key_version
FROM `+s.q+`.data_keys d JOIN `+s.q+`.kek k ON k.id = d.kek_id
WHERE d.kek_id <> $1 AND d.id <> ALL($3::uuid[]) AND `+s.unbound("d")+` `+from+`ORDER BY d.id LIMIT $2 FOR NO KEY UPDATE OF d `+lock, args...)
	if err != nil {
		return 0, nil, last, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	var r row
	var todo []row
	_, err = pgx.ForEachRow(rows, []any{&r.id, &r.project, &r.wk.Ciphertext, &r.wk.Provider, &r.wk.KeyID, &r.wk.Version}, func() error {
		todo = append(todo, r)
		return nil
	})
	if err != nil {
		return 0, nil, last, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	if len(todo) == 0 {
		return 0, nil, last, nil
	}
	last = todo[len(todo)-1].id
	var (
		ids     []pgtype.UUID
		wrapped [][]byte
		keks    []int64
	)
	fromVersions := map[string]int64{}
	for i := range todo {
		t := &todo[i]
		old := KEKVersion{Provider: t.wk.Provider, KeyID: t.wk.KeyID, Version: t.wk.Version}
		nwk, err := s.rewrapTo(ctx, s.dek, t.project, &t.wk, wrapAAD(t.project, t.id.Bytes))
		if isCorrupt(err) {
			s.log.Error("pgstore: rewrap: data key does not unwrap; left as it is", "project", t.project, "data_key", t.id.String(), "kek", old.String())
			bad = append(bad, CorruptKey{Project: t.project, DataKeyID: t.id.Bytes, KEKVersion: old})
			if err := s.event(ctx, tx, "dek.corrupt", t.project, 0, &t.id.Bytes, 1, map[string]any{"kek": old.String()}); err != nil {
				return 0, nil, last, err
			}
			continue
		}
		if err != nil {
			return 0, nil, last, fmt.Errorf("pgstore: rewrap data key of project %q: %w", t.project, err)
		}
		if nwk.Provider != primary.Provider || nwk.KeyID != primary.KeyID {
			return 0, nil, last, fmt.Errorf("pgstore: rewrap: provider returned a key for %s, want %s:%s", nwk.Ref(), primary.Provider, primary.KeyID)
		}
		kid, ok := kekIDs[nwk.Version]
		if !ok { // the primary rotated while we worked
			if kid, err = s.kekRowFor(ctx, s.pool, nwk.Provider, nwk.KeyID, nwk.Version); err != nil {
				return 0, nil, last, err
			}
			kekIDs[nwk.Version] = kid
		}
		ids, wrapped, keks = append(ids, t.id), append(wrapped, nwk.Ciphertext), append(keks, kid)
		fromVersions[old.String()]++
	}
	if len(ids) > 0 {
		if _, err := tx.Exec(ctx, `UPDATE `+s.q+`.data_keys d SET wrapped_dek = u.w, kek_id = u.k, rewrapped_at = now()
FROM unnest($1::uuid[], $2::bytea[], $3::bigint[]) AS u(id, w, k) WHERE d.id = u.id`, ids, wrapped, keks); err != nil {
			if pgCode(err) == sqlstateRetired {
				return 0, nil, last, fmt.Errorf("%w: %s: rewrap to it refused", ErrRetiredVersion, primary)
			}
			return 0, nil, last, fmt.Errorf("pgstore: rewrap: %w", err)
		}
		if err := s.event(ctx, tx, "kek.rewrap", "", primaryID, nil, int64(len(ids)), map[string]any{"to": primary.String(), "from": fromVersions}); err != nil {
			return 0, nil, last, err
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, nil, last, fmt.Errorf("pgstore: rewrap: commit: %w", err)
	}
	return int64(len(ids)), bad, last, nil
}

// RetireKEK retires KEK version v — a version of the deployment's KEK or
// an intermediate key version: refused with ErrPrimaryVersion for the
// primary version (of the data keys, or of the deployment KEK), with
// ErrUnknownVersion if the kek table does not record it, and with an
// *InUseError (matching ErrRetiredVersionInUse) while any data key or
// intermediate key is still wrapped under it (Rewrap first).
//
// The database side commits first: one transaction locks the kek row FOR
// UPDATE (the data_keys trigger of migration 003 reads it FOR SHARE, so no
// data key can be created or rewrapped under v meanwhile, nor afterwards),
// counts the data keys under it, sets retired_at and records kek.retire.
// Only then, if the keyring has a provider for v's key that is a
// provider.Retirer, is the version retired in the key service, recorded
// as kek.retire.provider. A process killed in between leaves v retired in
// the database but live in the key service, which Store.CheckProviders
// reports; RetireKEK then fails with ErrRetireIncomplete, and calling it
// again finishes the work. Retiring a version that is
// retired on both sides is harmless and records nothing.
func (s *Store) RetireKEK(ctx context.Context, v KEKVersion) error {
	primary, _, err := s.primary(ctx)
	if err != nil {
		return err
	}
	if v == primary {
		return fmt.Errorf("%w: %s", ErrPrimaryVersion, v)
	}
	if !s.direct && v.Provider != hierarchy.Scheme {
		kekPrimary, _, err := s.primaryOf(ctx, s.keyring.Primary())
		if err != nil {
			return err
		}
		if v == kekPrimary {
			return fmt.Errorf("%w: %s wraps the intermediate keys", ErrPrimaryVersion, v)
		}
	}
	if err := s.checkTenantRetire(ctx, v); err != nil {
		return err
	}
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: retire: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	var id, inUse int64
	var wasRetired bool
	err = tx.QueryRow(ctx, `SELECT id, retired_at IS NOT NULL FROM `+s.q+`.kek WHERE provider = $1 AND key_id = $2 AND key_version = $3 FOR UPDATE`,
		v.Provider, v.KeyID, v.Version).Scan(&id, &wasRetired)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("%w: %s", ErrUnknownVersion, v)
	}
	if err != nil {
		return fmt.Errorf("pgstore: retire: %w", err)
	}
	var ikInUse int64
	if err := tx.QueryRow(ctx, `SELECT (SELECT count(*) FROM `+s.q+`.data_keys WHERE kek_id = $1),
  (SELECT count(*) FROM `+s.q+`.intermediate_keys WHERE kek_id = $1)`, id).Scan(&inUse, &ikInUse); err != nil {
		return fmt.Errorf("pgstore: retire: %w", err)
	}
	if inUse > 0 || ikInUse > 0 {
		return &InUseError{Provider: v.Provider, KeyID: v.KeyID, Version: v.Version, DataKeys: inUse, IntermediateKeys: ikInUse}
	}
	if !wasRetired {
		if _, err := tx.Exec(ctx, `UPDATE `+s.q+`.kek SET retired_at = now() WHERE id = $1`, id); err != nil {
			return fmt.Errorf("pgstore: retire: %w", err)
		}
		if err := s.event(ctx, tx, "kek.retire", "", id, nil, 1, map[string]any{"version": v.String()}); err != nil {
			return err
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("pgstore: retire: commit: %w", err)
	}
	r, live, err := s.liveAtProvider(ctx, v)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrRetireIncomplete, v, err)
	}
	if live {
		if err := r.Retire(ctx, v.Version); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrRetireIncomplete, v, err)
		}
		if err := s.event(ctx, s.pool, "kek.retire.provider", "", id, nil, 1, map[string]any{"version": v.String()}); err != nil {
			return err
		}
	}
	s.log.Info("pgstore: retired KEK version", "kek", v.String())
	return nil
}

// liveAtProvider returns the keyring's Retirer for v's key and whether v
// still needs retiring there: true unless the provider is a Describer that
// lists its live versions without v. With no Retirer for the key, nothing
// is to be done (live false).
func (s *Store) liveAtProvider(ctx context.Context, v KEKVersion) (provider.Retirer, bool, error) {
	if c, ok, err := s.tenantVersion(ctx, v); err != nil || ok {
		if err != nil {
			return nil, false, err
		}
		st, err := c.ik.Describe(ctx)
		if err != nil {
			return nil, false, err
		}
		return c.ik, slices.Contains(st.Versions, v.Version), nil
	}
	for _, p := range s.dek.Providers() {
		if p.Ref() != (provider.KeyRef{Provider: v.Provider, KeyID: v.KeyID}) {
			continue
		}
		r, ok := p.(provider.Retirer)
		if !ok {
			return nil, false, nil
		}
		if d, ok := p.(provider.Describer); ok {
			st, err := d.Describe(ctx)
			if err != nil {
				return nil, false, err
			}
			if len(st.Versions) > 0 && !slices.Contains(st.Versions, v.Version) {
				return r, false, nil
			}
		}
		return r, true, nil
	}
	return nil, false, nil
}

type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// event appends to the audit trail. detail must hold no secret material.
func (s *Store) event(ctx context.Context, db execer, event, project string, kekID int64, dataKey *[16]byte, n int64, detail map[string]any) error {
	d, err := json.Marshal(detail)
	if err != nil {
		return fmt.Errorf("pgstore: audit: %w", err)
	}
	var dk pgtype.UUID
	if dataKey != nil {
		dk = uuidParam(*dataKey)
	}
	_, err = db.Exec(ctx, `INSERT INTO `+s.q+`.key_events (event, project_id, kek_id, data_key_id, count, actor, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7)`, event, pgtype.Text{String: project, Valid: project != ""},
		pgtype.Int8{Int64: kekID, Valid: kekID != 0}, dk, n, s.actorParam(), d)
	if err != nil {
		return fmt.Errorf("pgstore: audit: %w", err)
	}
	return nil
}
