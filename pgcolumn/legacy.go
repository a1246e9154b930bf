package pgcolumn

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/profullstack/keybroker/envelope"
	"github.com/profullstack/keybroker/provider"
)

// ErrLegacyRemaining: RefuseLegacy found unsealed values in the column and
// left legacy acceptance on; run MigrateLegacy (again) first.
var ErrLegacyRemaining = errors.New("pgcolumn: unsealed values remain")

// acceptsLegacy reports whether the column's registry row still accepts
// unsealed values, reading it from the database every time until it says
// no, then never again (the switch is one-way). A reader therefore accepts
// a legacy value only after the database confirmed, after the value was
// read, that RefuseLegacy had not committed: there is no window in which a
// process keeps accepting legacy values it was told to refuse.
func (e *Encrypted) acceptsLegacy(ctx context.Context) (bool, error) {
	if e.legacyOff.Load() {
		return false, nil
	}
	var accept bool
	err := e.ks.Pool().QueryRow(ctx, `SELECT accept_legacy FROM `+pgx.Identifier{e.ks.Schema()}.Sanitize()+`.columns WHERE id = $1`, e.id).Scan(&accept)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, fmt.Errorf("%w: %s.%s", ErrNotDeclared, e.col.Table, e.col.Value)
	}
	if err != nil {
		return false, fmt.Errorf("pgcolumn: read column registry: %w", err)
	}
	if !accept {
		e.legacyOff.Store(true)
	}
	return accept, nil
}

// openLegacy decodes an unsealed value with the handle's legacy decoder,
// if the column still accepts legacy values; checked says the registry
// already confirmed that in this call (OpenMany checks once).
func (e *Encrypted) openLegacy(ctx context.Context, stored []byte, checked bool) ([]byte, error) {
	if e.legacy == nil {
		return nil, fmt.Errorf("%w: %s.%s (the reader accepts no legacy values: Options.Legacy is unset)", ErrLegacyRefused, e.col.Table, e.col.Value)
	}
	if !checked {
		ok, err := e.acceptsLegacy(ctx)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("%w: %s.%s (legacy values were refused by RefuseLegacy)", ErrLegacyRefused, e.col.Table, e.col.Value)
		}
	}
	if len(stored) > maxLegacyStoredLen {
		return nil, envelope.ErrDecrypt
	}
	pt, ok, err := e.legacy.Decode(stored)
	switch {
	case errors.Is(err, envelope.ErrDecrypt):
		return nil, envelope.ErrDecrypt
	case err != nil:
		return nil, fmt.Errorf("pgcolumn: legacy decoder: %w", err)
	case !ok:
		return nil, fmt.Errorf("%w: %s.%s (no legacy decoder claims the value)", ErrLegacyRefused, e.col.Table, e.col.Value)
	case len(pt) > MaxValueLen:
		provider.Clear(pt)
		return nil, envelope.ErrDecrypt
	}
	return pt, nil
}

// maxLegacyStoredLen bounds an unsealed value a reader or the migration
// decodes: the base64 of MaxValueLen bytes and a header (legacy v1 values
// are longer than their plaintext).
const maxLegacyStoredLen = MaxValueLen/3*4 + 4 + 1024

// RefuseLegacy switches legacy acceptance off for the column, for good,
// once no unsealed value remains: afterwards the fence trigger refuses
// every unsealed write (SQLSTATE KB003) and readers refuse unsealed
// values (ErrLegacyRefused), whatever decoder they were given.
//
// The race with application writes is closed in the database. In one
// transaction RefuseLegacy first sets accept_legacy to false on the
// registry row, then counts the column's unsealed values. The fence
// trigger reads that row FOR SHARE before it accepts an unsealed value, so
// the UPDATE waits for every transaction that wrote one to commit (and the
// count, a later statement, sees those writes), and a trigger running
// after the UPDATE waits for RefuseLegacy to end. If the count is not zero
// RefuseLegacy rolls back — acceptance stays on, the waiting writers go on
// — and returns ErrLegacyRemaining with the count; otherwise it commits
// with a column.refuse_legacy audit event, and the waiting writers are
// refused. Legacy writers are held up for as long as the count takes (one
// scan of the table).
//
// Calling it again after it succeeded counts again and returns nil or
// ErrLegacyRemaining; it never switches acceptance back on. It needs
// UPDATE on keybroker's columns table (the migrating role).
func (e *Encrypted) RefuseLegacy(ctx context.Context) error {
	q := pgx.Identifier{e.ks.Schema()}.Sanitize()
	var remaining int64
	err := pgx.BeginFunc(ctx, e.ks.Pool(), func(tx pgx.Tx) error {
		ct, err := tx.Exec(ctx, `UPDATE `+q+`.columns SET accept_legacy = false, legacy_refused_at = coalesce(legacy_refused_at, now()) WHERE id = $1`, e.id)
		if err != nil {
			return err
		}
		if ct.RowsAffected() != 1 {
			return fmt.Errorf("%w: %s.%s", ErrNotDeclared, e.col.Table, e.col.Value)
		}
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM `+e.quotedTable()+` WHERE `+e.unsealedSQL("")).Scan(&remaining); err != nil {
			return err
		}
		if remaining > 0 {
			return ErrLegacyRemaining
		}
		return e.ks.Event(ctx, tx, "column.refuse_legacy", "", nil, 0, map[string]any{"column": e.col.Scope()})
	})
	switch {
	case errors.Is(err, ErrLegacyRemaining):
		return fmt.Errorf("%w: %s.%s holds %d unsealed values; legacy acceptance left on (run the migration first)", ErrLegacyRemaining, e.col.Table, e.col.Value, remaining)
	case errors.Is(err, ErrNotDeclared):
		return err
	case err != nil:
		return fmt.Errorf("pgcolumn: refuse legacy %s.%s: %w", e.col.Table, e.col.Value, err)
	}
	e.legacyOff.Store(true)
	return nil
}

// unsealedSQL is the condition "the row's value is unsealed" (alias: the
// table's alias and a dot, or ""): not NULL and not starting with the
// envelope magic, as sealed() decides in Go and the fence trigger in SQL.
func (e *Encrypted) unsealedSQL(alias string) string {
	v := alias + pgx.Identifier{e.col.Value}.Sanitize()
	return v + ` IS NOT NULL AND substring(` + v + ` FROM 1 FOR 4) <> 'KBEN'::bytea`
}
