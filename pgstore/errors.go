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
	// ErrRowSecurity: Status was asked of a Store whose role row-level
	// security binds; it would count only the rows of the project its
	// statements name (none), so it refuses rather than report zeros.
	ErrRowSecurity = errors.New("pgstore: counts need a role row-level security does not restrict")
)

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
