package pgstore

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
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

// DefaultLockWait is how long a batch of Rewrap waits for a data key
// another transaction holds locked when RewrapOptions.LockWait is zero.
const DefaultLockWait = 10 * time.Second

// DefaultRewrapWorkers is the number of batches Rewrap has in flight at
// once when RewrapOptions.Workers is zero.
const DefaultRewrapWorkers = 2

// RewrapOptions configures Rewrap.
type RewrapOptions struct {
	// BatchSize is the data keys rewrapped per batch (one statement; for a
	// project bound to its own KEK, one transaction); DefaultBatchSize
	// when zero.
	BatchSize int
	// DryRun counts what would be rewrapped and changes nothing.
	DryRun bool
	// LockWait bounds each wait of a batch's update for a data key another
	// transaction holds locked: a Put reserving budget (a moment), a
	// shred, Reencrypt, or the open transaction of a worker that died.
	// Past it the batch is done again without waiting, locking its rows
	// FOR NO KEY UPDATE SKIP LOCKED, and the rows still held are left as
	// they are and counted in RewrapResult.Skipped (a later Rewrap does
	// them). DefaultLockWait when zero; negative: practically no wait
	// (1 ms). Rows another Rewrap is rewrapping are not skipped: the
	// update waits for that one to commit and then leaves the rows it did.
	LockWait time.Duration
	// Workers is the number of batches in flight at once, each in its own
	// goroutine, so that rewrapping in Go and the database's work overlap
	// (two workers on two shared cores: 1.3–1.8× one's rate,
	// docs/BENCHMARKS.md); DefaultRewrapWorkers when zero. A worker holds
	// one of the pool's connections only while one of its statements
	// runs, so a smaller pool slows Rewrap down but cannot deadlock it.
	// The data keys of projects bound to their own KEK are done after the
	// others, one batch at a time, their rows locked FOR NO KEY UPDATE.
	Workers int
	// Progress, when set, is called after each committed batch, from one
	// goroutine at a time.
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
	// ProjectKEKs counts those of Rewrapped that moved to (or within) the
	// chain of a project bound to a KEK of its own, not to Primary.
	ProjectKEKs int64
	// Skipped counts data keys still pending, other than Corrupt, that
	// another transaction held locked for longer than LockWait.
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
// Batches go through data_keys in id order. A batch reads its rows without
// locking them, rewraps them in Go, and writes them back with one
// compare-and-swap UPDATE (with its kek.rewrap event in the same
// statement) that changes a row only if its kek_id and wrapped_dek are
// still the ones read: a row another process rewrapped, a shred deleted or
// Reencrypt destroyed meanwhile is left alone, so each data key is
// rewrapped once however many Rewraps run, and a crash loses at most the
// batches in flight. RewrapOptions.Workers batches are in flight at once;
// several processes may run Rewrap together (they then duplicate some
// rewrapping in Go, never a write). Puts and Gets are not blocked beyond
// the moment an update takes; a row held locked longer than LockWait is
// skipped (RewrapResult.Skipped). Once a pass reaches the end of the
// table, one more starts from the beginning, for rows wrapped under an old
// version meanwhile, until a pass changes nothing.
//
// A data key that does not unwrap (provider.ErrInvalidCiphertext or
// envelope.ErrDecrypt) is reported in RewrapResult.Corrupt and never stops
// the others; any other provider error (unavailable, denied, key not
// found) stops Rewrap (the batches committed stay). The result's Remaining
// is recounted at the end: a caller is done only when it is zero, whatever
// other workers did. Rewrap needs a role that row-level security does not
// restrict.
func (s *Store) Rewrap(ctx context.Context, opts RewrapOptions) (RewrapResult, error) {
	var res RewrapResult
	batch := opts.BatchSize
	if batch == 0 {
		batch = DefaultBatchSize
	}
	if batch < 1 {
		return res, fmt.Errorf("%w: batch size %d", ErrInvalidArgument, batch)
	}
	workers := opts.Workers
	if workers == 0 {
		workers = DefaultRewrapWorkers
	}
	if workers < 1 {
		return res, fmt.Errorf("%w: workers %d", ErrInvalidArgument, workers)
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
	run := &rewrapRun{
		s: s, primary: primary, primaryID: primaryID, batch: batch, total: total,
		lockTimeout: fmt.Sprintf("%dms", max(wait.Milliseconds(), 1)), progress: opts.Progress,
		kekIDs: map[string]int64{primary.Version: primaryID}, exclude: []pgtype.UUID{},
		kekNames: map[int64]KEKVersion{primaryID: primary}, res: &res,
	}
	// Passes until one changes nothing: the first does the table; each
	// further one does rows wrapped under an old version meanwhile (by a
	// process whose keyring is behind) and rows a concurrent change made
	// this call's update pass over.
	for {
		changed, err := run.pass(ctx, workers)
		if err != nil {
			return res, err
		}
		if !changed {
			break
		}
	}
	if err := s.pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE id = ANY($2::uuid[])) FROM `+s.q+`.data_keys d WHERE kek_id <> $1 AND `+s.unbound("d"),
		primaryID, run.skipped).Scan(&res.Remaining, &res.Skipped); err != nil {
		return res, fmt.Errorf("pgstore: rewrap: recount: %w", err)
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

// rewrapRun is the state one Rewrap call's workers share. mu guards every
// field below it.
type rewrapRun struct {
	s           *Store
	primary     KEKVersion
	primaryID   int64
	batch       int
	total       int64
	lockTimeout string // lock_timeout of a batch's update
	progress    func(RewrapProgress)

	mu       sync.Mutex
	after    pgtype.UUID          // the keyset cursor: the highest id read in this pass
	end      bool                 // this pass read the last pending row
	changed  bool                 // this pass rewrapped, or found corrupt or skipped, a row
	kekIDs   map[string]int64     // kek row ids by version of the primary's key
	kekNames map[int64]KEKVersion // versions by kek row id
	exclude  []pgtype.UUID        // rows no further batch reads: corrupt or skipped
	skipped  []pgtype.UUID        // rows held locked past LockWait
	res      *RewrapResult
}

// rewrapRow is a data key a batch read.
type rewrapRow struct {
	id      pgtype.UUID
	project string
	kekID   int64
	wrapped []byte
}

// pass runs workers goroutines over the table once, from its start, and
// reports whether anything changed.
func (r *rewrapRun) pass(ctx context.Context, workers int) (bool, error) {
	r.after, r.end, r.changed = pgtype.UUID{}, false, false
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error // the first error is the cause; the others', if any, its cancellation
	)
	for range workers {
		wg.Go(func() {
			if err := r.work(ctx); err != nil {
				once.Do(func() { first = err; cancel() })
			}
		})
	}
	wg.Wait()
	if first != nil {
		return false, first
	}
	return r.changed, nil
}

// work does batches until the pass's end.
func (r *rewrapRun) work(ctx context.Context) error {
	for {
		todo, err := r.next(ctx)
		if err != nil || len(todo) == 0 {
			return err
		}
		if err := r.rewrapBatch(ctx, todo); err != nil {
			return err
		}
	}
}

// next reads the pass's next batch and moves the cursor past it, under mu
// so that batches of one pass never overlap. The read locks nothing.
func (r *rewrapRun) next(ctx context.Context) ([]rewrapRow, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.end {
		return nil, nil
	}
	s := r.s
	args := []any{r.primaryID, r.batch, r.exclude}
	from := ""
	if r.after.Valid {
		from, args = "AND d.id > $4 ", append(args, r.after)
	}
	rows, err := s.pool.Query(ctx, `SELECT d.id, d.project_id, d.kek_id, d.wrapped_dek FROM `+s.q+`.data_keys d
WHERE d.kek_id <> $1 AND d.id <> ALL($3::uuid[]) AND `+s.unbound("d")+` `+from+`ORDER BY d.id LIMIT $2`, args...)
	if err != nil {
		return nil, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	todo := make([]rewrapRow, 0, r.batch)
	var t rewrapRow
	if _, err := pgx.ForEachRow(rows, []any{&t.id, &t.project, &t.kekID, &t.wrapped}, func() error {
		todo = append(todo, t)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("pgstore: rewrap: %w", err)
	}
	if len(todo) < r.batch {
		r.end = true
	}
	if len(todo) > 0 {
		r.after = todo[len(todo)-1].id
	}
	for _, t := range todo {
		if _, ok := r.kekNames[t.kekID]; !ok {
			var v KEKVersion
			if err := s.pool.QueryRow(ctx, `SELECT provider, key_id, key_version FROM `+s.q+`.kek WHERE id = $1`, t.kekID).Scan(&v.Provider, &v.KeyID, &v.Version); err != nil {
				return nil, fmt.Errorf("pgstore: rewrap: kek version %d: %w", t.kekID, err)
			}
			r.kekNames[t.kekID] = v
		}
	}
	return todo, nil
}

// kekName returns the version of kek row id (next has looked it up).
func (r *rewrapRun) kekName(id int64) KEKVersion {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.kekNames[id]
}

// kekID returns the kek row id of version v of the primary's key,
// recording it if it is new (the primary rotated while Rewrap ran).
func (r *rewrapRun) kekID(ctx context.Context, v string) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if id, ok := r.kekIDs[v]; ok {
		return id, nil
	}
	id, err := r.s.kekRowFor(ctx, r.s.pool, r.primary.Provider, r.primary.KeyID, v)
	if err != nil {
		return 0, err
	}
	r.kekIDs[v] = id
	r.kekNames[id] = KEKVersion{Provider: r.primary.Provider, KeyID: r.primary.KeyID, Version: v}
	return id, nil
}

// rewrapBatch rewraps the rows of todo in Go and writes them back with a
// compare-and-swap update, then records the outcome in r.
func (r *rewrapRun) rewrapBatch(ctx context.Context, todo []rewrapRow) error {
	s := r.s
	var (
		u   casUpdate
		bad []CorruptKey
	)
	for i := range todo {
		t := &todo[i]
		old := r.kekName(t.kekID)
		wk := provider.WrappedKey{Provider: old.Provider, KeyID: old.KeyID, Version: old.Version, Ciphertext: t.wrapped}
		nwk, err := s.rewrapTo(ctx, s.dek, t.project, &wk, wrapAAD(t.project, t.id.Bytes))
		if isCorrupt(err) {
			s.log.Error("pgstore: rewrap: data key does not unwrap; left as it is", "project", t.project, "data_key", t.id.String(), "kek", old.String())
			bad = append(bad, CorruptKey{Project: t.project, DataKeyID: t.id.Bytes, KEKVersion: old})
			if err := s.event(ctx, s.pool, "dek.corrupt", t.project, 0, &t.id.Bytes, 1, map[string]any{"kek": old.String()}); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("pgstore: rewrap data key of project %q: %w", t.project, err)
		}
		if nwk.Provider != r.primary.Provider || nwk.KeyID != r.primary.KeyID {
			return fmt.Errorf("pgstore: rewrap: provider returned a key for %s, want %s:%s", nwk.Ref(), r.primary.Provider, r.primary.KeyID)
		}
		kid, err := r.kekID(ctx, nwk.Version)
		if err != nil {
			return err
		}
		u.add(t, nwk.Ciphertext, kid)
	}
	var n int64
	var held []pgtype.UUID
	if len(u.ids) > 0 {
		var err error
		n, err = r.swap(ctx, &u)
		if code := pgCode(err); code == "55P03" || code == "40P01" {
			// A row held past LockWait (lock_timeout), or a deadlock with
			// a transaction locking several of these rows in another
			// order (a shred): redo the batch without waiting.
			n, held, err = r.swapUnlocked(ctx, &u)
		}
		if err != nil {
			if pgCode(err) == sqlstateRetired {
				return fmt.Errorf("%w: %s: rewrap to it refused", ErrRetiredVersion, r.primary)
			}
			return fmt.Errorf("pgstore: rewrap: %w", err)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.res.Rewrapped += n
	r.res.Corrupt = append(r.res.Corrupt, bad...)
	for _, c := range bad {
		r.exclude = append(r.exclude, uuidParam(c.DataKeyID))
	}
	r.exclude = append(r.exclude, held...)
	r.skipped = append(r.skipped, held...)
	if n > 0 || len(bad) > 0 || len(held) > 0 {
		r.changed = true
	}
	if n > 0 {
		s.log.Info("pgstore: rewrapped data keys", "count", n, "done", r.res.Rewrapped, "to", r.primary.String())
		if r.progress != nil {
			r.progress(RewrapProgress{Done: r.res.Rewrapped, Total: r.total})
		}
	}
	return nil
}

// casUpdate is a batch's compare-and-swap update: for each row, its id,
// new wrapped key and kek row, and the kek row and wrapped key read.
type casUpdate struct {
	ids              []pgtype.UUID
	wrapped, oldWrap [][]byte
	keks, oldKeks    []int64
}

func (u *casUpdate) add(t *rewrapRow, wrapped []byte, kek int64) {
	u.ids, u.wrapped, u.keks = append(u.ids, t.id), append(u.wrapped, wrapped), append(u.keks, kek)
	u.oldKeks, u.oldWrap = append(u.oldKeks, t.kekID), append(u.oldWrap, t.wrapped)
}

// only returns the rows of u whose ids are in keep.
func (u *casUpdate) only(keep map[[16]byte]bool) casUpdate {
	var o casUpdate
	for i, id := range u.ids {
		if keep[id.Bytes] {
			o.ids, o.wrapped, o.keks = append(o.ids, id), append(o.wrapped, u.wrapped[i]), append(o.keks, u.keks[i])
			o.oldKeks, o.oldWrap = append(o.oldKeks, u.oldKeks[i]), append(o.oldWrap, u.oldWrap[i])
		}
	}
	return o
}

// casSQL updates the rows of $1..$5 still as read and, if it changed any,
// records one kek.rewrap event (count: rows changed; detail: the primary,
// and the rows changed by the version they were under); it returns the
// number of rows changed. One statement: the update and its event commit
// together. A row a concurrent transaction holds is waited for and then
// compared in its committed form (READ COMMITTED re-checks the WHERE on
// it), so a row rewrapped or deleted meanwhile is not matched.
func (r *rewrapRun) casSQL() string {
	q := r.s.q
	return `WITH u AS (
  UPDATE ` + q + `.data_keys d SET wrapped_dek = u.w, kek_id = u.k, rewrapped_at = now()
  FROM unnest($1::uuid[], $2::bytea[], $3::bigint[], $4::bigint[], $5::bytea[]) AS u(id, w, k, ok, ow)
  WHERE d.id = u.id AND d.kek_id = u.ok AND d.wrapped_dek = u.ow
  RETURNING u.ok),
f AS (SELECT ok, count(*) AS n FROM u GROUP BY ok),
e AS (
  INSERT INTO ` + q + `.key_events (event, kek_id, count, actor, detail)
  SELECT 'kek.rewrap', $6, sum(f.n), $7, jsonb_build_object('to', $8::text,
    'from', jsonb_object_agg(k.provider || ':' || k.key_id || '@' || k.key_version, f.n))
  FROM f JOIN ` + q + `.kek k ON k.id = f.ok HAVING count(*) > 0)
SELECT coalesce(sum(n), 0)::bigint FROM f`
}

func (r *rewrapRun) casArgs(u *casUpdate) []any {
	return []any{u.ids, u.wrapped, u.keks, u.oldKeks, u.oldWrap, r.primaryID, r.s.actorParam(), r.primary.String()}
}

// swap runs the batch's update with lock_timeout LockWait, in one round
// trip (a pipelined batch: one implicit transaction).
func (r *rewrapRun) swap(ctx context.Context, u *casUpdate) (int64, error) {
	b := &pgx.Batch{}
	b.Queue(`SELECT set_config('lock_timeout', $1, true)`, r.lockTimeout)
	var n int64
	b.Queue(r.casSQL(), r.casArgs(u)...).QueryRow(func(row pgx.Row) error { return row.Scan(&n) })
	err := r.s.pool.SendBatch(ctx, b).Close()
	return n, err
}

// swapUnlocked redoes the batch's update in a transaction that first locks
// the rows it can (FOR NO KEY UPDATE SKIP LOCKED) and updates only those;
// it returns the rows others held.
func (r *rewrapRun) swapUnlocked(ctx context.Context, u *casUpdate) (int64, []pgtype.UUID, error) {
	tx, err := r.s.pool.Begin(ctx)
	if err != nil {
		return 0, nil, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	rows, err := tx.Query(ctx, `SELECT id FROM `+r.s.q+`.data_keys WHERE id = ANY($1::uuid[]) ORDER BY id FOR NO KEY UPDATE SKIP LOCKED`, u.ids)
	if err != nil {
		return 0, nil, err
	}
	locked := map[[16]byte]bool{}
	var id pgtype.UUID
	if _, err := pgx.ForEachRow(rows, []any{&id}, func() error {
		locked[id.Bytes] = true
		return nil
	}); err != nil {
		return 0, nil, err
	}
	var held []pgtype.UUID
	for _, id := range u.ids {
		if !locked[id.Bytes] {
			held = append(held, id)
		}
	}
	var n int64
	if mine := u.only(locked); len(mine.ids) > 0 {
		if err := tx.QueryRow(ctx, r.casSQL(), r.casArgs(&mine)...).Scan(&n); err != nil {
			return 0, nil, err
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, nil, err
	}
	return n, held, nil
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
