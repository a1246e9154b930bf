package pgcolumn

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// Status describes a declared column's values by what they are sealed
// under, from the catalog and a count over the table; it decrypts nothing
// (Verify does).
type Status struct {
	Column       Column
	AcceptLegacy bool  // unsealed values may still be written
	Rows         int64 // rows of the table
	Null         int64 // NULL values
	Unsealed     int64 // values that are not sealed (legacy)
	// Malformed counts values that start like an envelope but are not a
	// column envelope; NoKey values naming a data key that is not one of
	// the row's project and the column's scope (destroyed, or never
	// there): neither can open.
	Malformed int64
	NoKey     int64
	// Keys counts the sealed values by the state of their data key and
	// the KEK version that wraps it.
	Keys []KeyRows
}

// KeyRows is one line of Status.Keys.
type KeyRows struct {
	State                    string // active, spent or retired
	Provider, KeyID, Version string // the KEK version wrapping the data keys
	DataKeys, Rows           int64
}

// Status reports on the column's values across every project. It needs a
// role that row-level security does not restrict (the operator's).
func (e *Encrypted) Status(ctx context.Context) (Status, error) {
	st := Status{Column: e.Column()}
	if e.ks.RowSecurity() {
		return st, fmt.Errorf("%w: status of %s.%s: the role is bound by row-level security", ErrInvalidArgument, e.col.Table, e.col.Value)
	}
	v := "t." + pgx.Identifier{e.col.Value}.Sanitize()
	p := "t." + pgx.Identifier{e.col.Project}.Sanitize() + "::text"
	err := pgx.BeginTxFunc(ctx, e.ks.Pool(), pgx.TxOptions{AccessMode: pgx.ReadOnly, IsoLevel: pgx.RepeatableRead}, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `SELECT accept_legacy FROM `+e.q()+`.columns WHERE id = $1`, e.id).Scan(&st.AcceptLegacy); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `WITH r AS (
  SELECT `+p+` AS project, `+v+` IS NULL AS null,
         substring(`+v+` FROM 1 FOR 4) = 'KBEN'::bytea AS sealed,
         CASE WHEN substring(`+v+` FROM 1 FOR 4) = 'KBEN'::bytea AND length(`+v+`) >= 56 AND get_byte(`+v+`, 4) = 1
               AND get_byte(`+v+`, 5) = 1 AND get_byte(`+v+`, 6) = 2 AND get_byte(`+v+`, 7) = 16
              THEN encode(substring(`+v+` FROM 9 FOR 16), 'hex')::uuid END AS key_id
  FROM `+e.quotedTable()+` t)
SELECT CASE WHEN r.null THEN 'null' WHEN NOT r.sealed THEN 'unsealed' WHEN r.key_id IS NULL THEN 'malformed'
            WHEN d.id IS NULL THEN 'nokey' ELSE d.state END,
       coalesce(k.provider, ''), coalesce(k.key_id, ''), coalesce(k.key_version, ''),
       count(DISTINCT d.id), count(*)
FROM r LEFT JOIN `+e.q()+`.data_keys d ON d.id = r.key_id AND d.project_id = r.project AND d.scope = $1
LEFT JOIN `+e.q()+`.kek k ON k.id = d.kek_id
GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4`, e.col.Scope())
		if err != nil {
			return err
		}
		var kr KeyRows
		_, err = pgx.ForEachRow(rows, []any{&kr.State, &kr.Provider, &kr.KeyID, &kr.Version, &kr.DataKeys, &kr.Rows}, func() error {
			st.Rows += kr.Rows
			switch kr.State {
			case "null":
				st.Null += kr.Rows
			case "unsealed":
				st.Unsealed += kr.Rows
			case "malformed":
				st.Malformed += kr.Rows
			case "nokey":
				st.NoKey += kr.Rows
			default:
				st.Keys = append(st.Keys, kr)
			}
			return nil
		})
		return err
	})
	if err != nil {
		return st, fmt.Errorf("pgcolumn: status of %s.%s: %w", e.col.Table, e.col.Value, err)
	}
	return st, nil
}
