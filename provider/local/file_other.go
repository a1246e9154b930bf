//go:build !unix

package local

import (
	"errors"
	"os"
	"runtime"
)

// fileID identifies a version of a file without reading it, as well as
// this platform allows: mode, size and modification time. The zero fileID
// stands for a file that could not be examined.
type fileID struct {
	mode  os.FileMode
	size  int64
	mtime int64
}

func idOfInfo(st os.FileInfo, err error) fileID {
	if err != nil {
		return fileID{}
	}
	return fileID{mode: st.Mode(), size: st.Size(), mtime: st.ModTime().UnixNano()}
}

func statID(path string) fileID  { return idOfInfo(os.Stat(path)) }
func fileIDOf(f *os.File) fileID { return idOfInfo(f.Stat()) }

// lockKeyring is not implemented here: without it writers could lose each
// other's updates, so Rotate, Retire and Save refuse.
func lockKeyring(string) (func(), error) {
	return nil, errors.New("locking keyring files is not supported on " + runtime.GOOS)
}
