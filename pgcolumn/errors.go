package pgcolumn

import "errors"

// Sentinel errors; test with errors.Is. A value that does not open is
// envelope.ErrDecrypt, as everywhere in keybroker.
var (
	// ErrInvalidArgument: a declaration, option or argument is out of
	// range or malformed.
	ErrInvalidArgument = errors.New("pgcolumn: invalid argument")
	// ErrNotDeclared: the column is not installed (run Install, or
	// `keybroker column install`, as the migrating role).
	ErrNotDeclared = errors.New("pgcolumn: column not installed")
	// ErrLegacyRefused: a value is not sealed and the column no longer
	// accepts legacy values (its migration finished and legacy acceptance
	// was switched off), or the reader was given no legacy decoder.
	ErrLegacyRefused = errors.New("pgcolumn: unsealed value refused")
	// ErrStaleKey: the column's fence trigger refused a sealed value
	// because its data key was retired (a concurrent Reencrypt) or removed
	// after the value was sealed. Nothing was written; seal the value again
	// and redo the write (Write does). See Encrypted.Refused.
	ErrStaleKey = errors.New("pgcolumn: data key retired before the write (seal again)")
	// ErrMisdirected: the fence trigger refused a value that starts like an
	// envelope but is not a column envelope, or that names a data key of
	// another project or column (sealed for another row's project, or
	// copied from another column). Sealing it again for the right project
	// and row is the fix; retrying the same bytes is not.
	ErrMisdirected = errors.New("pgcolumn: value sealed for another project or column")
	// ErrVerify: a freshly sealed value did not open to the plaintext it
	// was made from; nothing was written.
	ErrVerify = errors.New("pgcolumn: verification failed")
)
