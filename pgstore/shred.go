package pgstore

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgtype"
)

// ErrProjectShredded: the project was shredded (ShredProject, or the
// shred_project_trigger on the application's projects table), and the
// database refuses new data keys for it until ReopenProject. Nothing was
// written.
var ErrProjectShredded = errors.New("pgstore: project is shredded")

// sqlstateShredded is the SQLSTATE the data_keys_shred_fence trigger
// raises (migration project_shred) for a data key of a shredded project.
const sqlstateShredded = "KB002"

// shreddedError maps the database's refusal of a data key for a shredded
// project to ErrProjectShredded, and returns nil for any other error.
func shreddedError(err error, project string) error {
	if pgCode(err) != sqlstateShredded {
		return nil
	}
	return fmt.Errorf("%w: %q (ReopenProject to use the id again)", ErrProjectShredded, project)
}

// ShredResult counts what ShredProject destroyed.
type ShredResult struct {
	DataKeys int64 // data key rows deleted, every state
	Secrets  int64 // encrypted_secrets rows deleted
}

// ShredProject crypto-shreds project: in one transaction it deletes every
// data key of the project (whatever its state) and every secret in
// encrypted_secrets sealed under them, records a tombstone refusing new
// data keys for the project id, and writes one project.shred audit event
// with both counts. Values the application sealed into its own tables
// under those data keys can no longer be opened from this database.
//
// A write racing the shred either commits first and is destroyed with the
// rest, or fails with ErrProjectShredded; so does every later write to the
// project until ReopenProject. Shredding a project that has nothing, or
// is already shredded, succeeds with zero counts. It cannot be undone.
//
// ShredProject runs the SQL function <schema>.shred_project (SECURITY
// DEFINER), so the Store's role needs EXECUTE on it and nothing else
// (docs/OPERATIONS.md). Like the other key-management calls it runs on the
// Store's pool in a transaction of its own, also for a Store returned by
// In; to shred in the caller's transaction, with the application's own
// delete, run SELECT <schema>.shred_project($1, $2) there, or attach
// shred_project_trigger to the projects table. What old database backups still hold is in
// docs/SECURITY.md.
func (s *Store) ShredProject(ctx context.Context, project string) (ShredResult, error) {
	if err := checkProject(project); err != nil {
		return ShredResult{}, err
	}
	var (
		res ShredResult
		ids []pgtype.UUID
	)
	err := s.pool.QueryRow(ctx, `SELECT data_keys, secrets, data_key_ids FROM `+s.q+`.shred_project($1, $2)`,
		project, s.actorParam()).Scan(&res.DataKeys, &res.Secrets, &ids)
	if err != nil {
		return ShredResult{}, fmt.Errorf("pgstore: shred project %q: %w", project, err)
	}
	// This process's reservations (every scope) and cached keys of the
	// project go too; other processes drop theirs when a write finds its
	// key gone.
	s.res.mu.Lock()
	for k := range s.res.keys {
		if k.project == project {
			delete(s.res.keys, k)
		}
	}
	s.res.mu.Unlock()
	for _, id := range ids {
		s.cache.Remove(cacheID(project, id.Bytes))
	}
	s.log.Info("pgstore: shredded project", "project", project, "data_keys", res.DataKeys, "secrets", res.Secrets)
	return res, nil
}

// ReopenProject lifts the tombstone ShredProject left, so data keys can be
// created for project again, and records a project.reopen audit event.
// Nothing shredded comes back. It reports whether the project was
// shredded; reopening one that was not changes nothing. The Store's role
// needs EXECUTE on <schema>.reopen_project, which no migration grants.
func (s *Store) ReopenProject(ctx context.Context, project string) (bool, error) {
	if err := checkProject(project); err != nil {
		return false, err
	}
	var reopened bool
	if err := s.pool.QueryRow(ctx, `SELECT `+s.q+`.reopen_project($1, $2)`, project, s.actorParam()).Scan(&reopened); err != nil {
		return false, fmt.Errorf("pgstore: reopen project %q: %w", project, err)
	}
	if reopened {
		s.log.Info("pgstore: reopened project", "project", project)
	}
	return reopened, nil
}

// ShredPreview is what ShredProject would destroy now.
type ShredPreview struct {
	ShredResult
	Shredded bool // the project is already shredded
}

// PreviewShred counts project's data keys and secrets and reports whether
// it is shredded, changing nothing (the CLI's --dry-run). It reads
// <schema>.shredded_projects, which only the schema owner may; under a
// role row-level security binds it returns ErrRowSecurity rather than
// counts of nothing.
func (s *Store) PreviewShred(ctx context.Context, project string) (ShredPreview, error) {
	if err := checkProject(project); err != nil {
		return ShredPreview{}, err
	}
	if s.rls {
		return ShredPreview{}, fmt.Errorf("%w: preview shred of project %q", ErrRowSecurity, project)
	}
	var p ShredPreview
	err := s.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM `+s.q+`.data_keys WHERE project_id = $1),
	(SELECT count(*) FROM `+s.q+`.encrypted_secrets WHERE project_id = $1),
	EXISTS (SELECT 1 FROM `+s.q+`.shredded_projects WHERE project_id = $1)`, project).Scan(&p.DataKeys, &p.Secrets, &p.Shredded)
	if err != nil {
		return ShredPreview{}, fmt.Errorf("pgstore: preview shred of project %q: %w", project, err)
	}
	return p, nil
}
