package pgstore

import "encoding/binary"

// Purpose strings bind every ciphertext to its role and to this schema's
// layout. A later incompatible layout changes the version suffix.
const (
	secretPurpose = "keybroker/secret/v1"
	dekPurpose    = "keybroker/dek/v1"
)

// secretAAD is the associated data of a secret's envelope: the purpose, the
// project id and the secret's name, each prefixed with its length as a u32
// big-endian (purpose included) so that no two (project, name) pairs encode
// alike; docs/STORAGE.md shows an example. A ciphertext copied to another row or
// project therefore fails to open.
func secretAAD(project, name string) []byte {
	return appendFields(make([]byte, 0, len(secretPurpose)+len(project)+len(name)+12), secretPurpose, project, name)
}

// wrapAAD is the associated data given to the KEK provider when wrapping a
// data key: the purpose, the project id and the data key's id (its 16 raw
// bytes), each prefixed with its length as a u32 big-endian. A wrapped DEK
// moved to another data_keys row or project fails to unwrap.
func wrapAAD(project string, id [16]byte) []byte {
	return appendFields(make([]byte, 0, len(dekPurpose)+len(project)+28), dekPurpose, project, string(id[:]))
}

func appendFields(b []byte, fields ...string) []byte {
	for _, f := range fields {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}
