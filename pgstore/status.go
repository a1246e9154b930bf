package pgstore

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/pgstore/hierarchy"
	"github.com/profullstack/keybroker/provider"
)

// Status summarises what the database holds. Store.Status reads only the
// database (no key service), so it works when a provider is unreachable;
// Store.CheckProviders adds what the key services say.
type Status struct {
	// Versions lists every KEK version the kek table records, oldest
	// first, with the data keys wrapped under it and the secrets under
	// those data keys.
	Versions []VersionStatus
	// OldestInUse is the oldest version still wrapping a data key; nil if
	// there are no data keys.
	OldestInUse *VersionStatus
	// DataKeys counts data keys by state ("active", "spent", "retired").
	DataKeys map[string]int64
	Secrets  int64 // secrets in all projects
	Projects int64 // projects with at least one data key
	// Budget is this Store's per-data-key budget; MaxActiveUse is the
	// highest budget use (data_keys.messages) among active data keys.
	Budget       int64
	MaxActiveUse int64
	// ProjectKEKs lists the projects bound to a KEK of their own
	// (SetProjectKEK), with their data keys not yet moved to it.
	ProjectKEKs []ProjectKEKStatus
	// Recovery lists the recovery keys of the deployment's chain of
	// intermediate keys (AddRecovery), each with the number of its
	// IntermediateKeys it can recover.
	Recovery         []hierarchy.RecoveryKey
	IntermediateKeys int64

	// Filled only by CheckProviders, which asks the key services:
	//
	// RetiredLive lists versions the kek table records as retired that a
	// provider.Describer of the keyring still lists as live: a retire
	// interrupted after its database commit. RetireKEK finishes it.
	RetiredLive []KEKVersion
	// UnrecordedPrimary lists primary versions of the keyring's
	// Describers that the kek table does not record: a rotation not yet
	// (or, killed, never) recorded. PrimaryVersion or Rewrap records it.
	UnrecordedPrimary []KEKVersion
}

// VersionStatus is one KEK version's line in Status.
type VersionStatus struct {
	KEKVersion
	CreatedAt time.Time
	RetiredAt *time.Time // nil unless retired
	DataKeys  int64
	Secrets   int64
	// IntermediateKeys counts the intermediate keys wrapped under the
	// version (a version of the deployment's KEK, with the hierarchy).
	IntermediateKeys int64
}

// CheckProviders compares st (from Status) with what the keyring's
// providers that are provider.Describers report, and fills st.RetiredLive
// and st.UnrecordedPrimary. It returns the first Describe error, after
// checking the other providers.
func (s *Store) CheckProviders(ctx context.Context, st *Status) error {
	st.RetiredLive, st.UnrecordedPrimary = nil, nil
	var first error
	for _, p := range s.dek.Providers() {
		d, ok := p.(provider.Describer)
		if !ok {
			continue
		}
		ps, err := d.Describe(ctx)
		if err != nil {
			if first == nil {
				first = fmt.Errorf("pgstore: status: %w", err)
			}
			continue
		}
		ref := p.Ref()
		recorded := false
		for _, v := range st.Versions {
			if v.Provider != ref.Provider || v.KeyID != ref.KeyID {
				continue
			}
			recorded = recorded || v.Version == ps.PrimaryVersion
			if v.RetiredAt != nil && slices.Contains(ps.Versions, v.Version) {
				st.RetiredLive = append(st.RetiredLive, v.KEKVersion)
			}
		}
		if !recorded && ps.PrimaryVersion != "" {
			st.UnrecordedPrimary = append(st.UnrecordedPrimary, KEKVersion{Provider: ref.Provider, KeyID: ref.KeyID, Version: ps.PrimaryVersion})
		}
	}
	return first
}

// Status reports counts of data keys and secrets per KEK version, data
// keys by state, and budget use. It needs a role that row-level security
// does not restrict: under one it sees no project's rows, and returns an
// error matching ErrRowSecurity (after the database answered) instead of
// counts.
func (s *Store) Status(ctx context.Context) (*Status, error) {
	// Checked on every call, like New does once: FORCE ROW LEVEL SECURITY
	// may have been added since.
	var restricted bool
	if err := s.pool.QueryRow(ctx, `SELECT row_security_active($1::regclass) OR row_security_active($2::regclass)`,
		pgx.Identifier{s.schema, "data_keys"}.Sanitize(), pgx.Identifier{s.schema, "encrypted_secrets"}.Sanitize()).Scan(&restricted); err != nil {
		return nil, fmt.Errorf("pgstore: status: %w", err)
	}
	if restricted {
		return nil, ErrRowSecurity
	}
	st := &Status{DataKeys: map[string]int64{}, Budget: s.budget}
	rows, err := s.pool.Query(ctx, `SELECT k.provider, k.key_id, k.key_version, k.created_at, k.retired_at,
  count(d.id), coalesce(sum(sc.n), 0)::bigint,
  (SELECT count(*) FROM `+s.q+`.intermediate_keys i WHERE i.kek_id = k.id)
FROM `+s.q+`.kek k
LEFT JOIN `+s.q+`.data_keys d ON d.kek_id = k.id
LEFT JOIN (SELECT data_key_id, count(*) AS n FROM `+s.q+`.encrypted_secrets GROUP BY 1) sc ON sc.data_key_id = d.id
GROUP BY k.id ORDER BY k.created_at, k.id`)
	if err != nil {
		return nil, fmt.Errorf("pgstore: status: %w", err)
	}
	var v VersionStatus
	if _, err := pgx.ForEachRow(rows, []any{&v.Provider, &v.KeyID, &v.Version, &v.CreatedAt, &v.RetiredAt, &v.DataKeys, &v.Secrets, &v.IntermediateKeys}, func() error {
		st.Versions = append(st.Versions, v)
		v.RetiredAt = nil
		return nil
	}); err != nil {
		return nil, fmt.Errorf("pgstore: status: %w", err)
	}
	for i := range st.Versions {
		if st.Versions[i].DataKeys > 0 || st.Versions[i].IntermediateKeys > 0 {
			st.OldestInUse = &st.Versions[i]
			break
		}
	}
	rows, err = s.pool.Query(ctx, `SELECT state, count(*), coalesce(max(messages) FILTER (WHERE state = 'active'), 0) FROM `+s.q+`.data_keys GROUP BY state`)
	if err != nil {
		return nil, fmt.Errorf("pgstore: status: %w", err)
	}
	var state string
	var n, maxUse int64
	if _, err := pgx.ForEachRow(rows, []any{&state, &n, &maxUse}, func() error {
		st.DataKeys[state] = n
		st.MaxActiveUse = max(st.MaxActiveUse, maxUse)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("pgstore: status: %w", err)
	}
	if err := s.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM `+s.q+`.encrypted_secrets), (SELECT count(DISTINCT project_id) FROM `+s.q+`.data_keys)`).
		Scan(&st.Secrets, &st.Projects); err != nil {
		return nil, fmt.Errorf("pgstore: status: %w", err)
	}
	if err := s.tenantStatus(ctx, st); err != nil {
		return nil, err
	}
	return st, nil
}
