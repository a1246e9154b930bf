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
)
