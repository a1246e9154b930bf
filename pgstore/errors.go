package pgstore

import (
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"
)

// Sentinel errors; test with errors.Is. Errors carrying more detail are
// reachable with errors.As (*InUseError).
var (
	// ErrNotFound: no secret by that project and name.
	ErrNotFound = errors.New("pgstore: secret not found")
	// ErrInvalidArgument: a Config, option or argument is out of range or
	// malformed (empty project or name, bad identifier, ...).
	ErrInvalidArgument = errors.New("pgstore: invalid argument")
	// ErrSchemaVersion: the schema is missing or at another version than
	// this build's; run Migrate.
	ErrSchemaVersion = errors.New("pgstore: schema version mismatch")
	// ErrRetiredVersionInUse: a KEK version cannot be retired while data
	// keys are still wrapped under it (rewrap first).
	ErrRetiredVersionInUse = errors.New("pgstore: key version still in use")
	// ErrPrimaryVersion: the primary (current) KEK version cannot be retired.
	ErrPrimaryVersion = errors.New("pgstore: key version is the primary")
	// ErrUnknownVersion: no kek row records that provider, key and version.
	ErrUnknownVersion = errors.New("pgstore: unknown key version")
	// ErrSource: the plaintext table to migrate is missing, lacks a column,
	// has a column of an unusable type, or holds rows that cannot be
	// migrated (NULL project or name). Reported before any write.
	ErrSource = errors.New("pgstore: migration source")
	// ErrVerify: a freshly written ciphertext did not decrypt to the
	// plaintext it was made from; the batch was rolled back.
	ErrVerify = errors.New("pgstore: verification failed")
	// ErrRetiredVersion: the database refused a data key wrapped under a
	// retired KEK version (another process retired it), and wrapping again
	// after provider.Keyring.Refresh still gave a retired version: this
	// process's key configuration is stale; restart it or fix the keyring.
	// Nothing was written.
	ErrRetiredVersion = errors.New("pgstore: primary KEK version is retired")
	// ErrNoActiveKey: a write found its project's data key retired or gone
	// at commit time (a concurrent Reencrypt, or a data key row removed
	// behind pgstore's back) on every one of its bounded attempts, each
	// under a fresh data key reservation. Nothing was written; retrying
	// later is safe.
	ErrNoActiveKey = errors.New("pgstore: no usable data key at commit")
	// ErrRetireIncomplete: RetireKEK committed the retirement in the
	// database but could not retire the version in the key service
	// (unreachable, refused, read-only keyring). New data keys can no
	// longer use the version; call RetireKEK again to finish.
	ErrRetireIncomplete = errors.New("pgstore: retired in the database, not yet in the key service (retire again to finish)")
	// ErrRowSecurity: Status (or PreviewShred) was asked of a Store whose role row-level
	// security binds; it would count only the rows of the project its
	// statements name (none), so it refuses rather than report zeros.
	ErrRowSecurity = errors.New("pgstore: counts need a role row-level security does not restrict")
	// ErrPooler: the pool reaches PostgreSQL through a connection pooler
	// (PgBouncer, Supavisor), and the call cannot work through one: New
	// with a pool in a mode that keeps server-side statements (see
	// ParseConfig), Migrate at all.
	ErrPooler = errors.New("pgstore: connection pooler")
)

// sqlstateRetired is the SQLSTATE the data_keys_kek_fence trigger raises
// (migration 003) for a data key under a retired KEK version.
const sqlstateRetired = "KB001"

// maxWriteAttempts bounds how often a write is redone under a fresh data
// key reservation when the database refuses its key (ErrNoActiveKey).
const maxWriteAttempts = 4

// InUseError details ErrRetiredVersionInUse.
type InUseError struct {
	Provider, KeyID, Version string
	DataKeys                 int64 // data keys still wrapped under the version
}

func (e *InUseError) Error() string {
	return fmt.Sprintf("pgstore: key version %s:%s version %q still wraps %d data key(s): rewrap first", e.Provider, e.KeyID, e.Version, e.DataKeys)
}

// Is makes errors.Is(err, ErrRetiredVersionInUse) true.
func (e *InUseError) Is(target error) bool { return target == ErrRetiredVersionInUse }

func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

func isUndefinedTable(err error) bool { return pgCode(err) == "42P01" || pgCode(err) == "3F000" }
