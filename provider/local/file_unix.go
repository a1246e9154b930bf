//go:build unix

package local

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// fileID identifies a version of a file without reading it: a keybroker
// write replaces the file by rename (a new inode), and an editor writing in
// place changes its size, mtime or ctime, chmod its mode and ctime. The
// zero fileID stands for a file that could not be examined.
type fileID struct {
	dev, ino     uint64
	mode         uint32
	size         int64
	mtime, ctime int64 // nanoseconds since the epoch
}

func idOf(st *unix.Stat_t) fileID {
	return fileID{
		dev: uint64(st.Dev), ino: uint64(st.Ino), mode: uint32(st.Mode), size: st.Size,
		mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano(),
	}
}

// statID examines the file at path: one stat system call.
func statID(path string) fileID {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return fileID{}
	}
	return idOf(&st)
}

// fileIDOf examines the open file f.
func fileIDOf(f *os.File) fileID {
	var st unix.Stat_t
	var err error
	rc, cerr := f.SyscallConn()
	if cerr != nil {
		return fileID{}
	}
	if cerr = rc.Control(func(fd uintptr) { err = unix.Fstat(int(fd), &st) }); cerr != nil || err != nil {
		return fileID{}
	}
	return idOf(&st)
}

// lockKeyring takes an exclusive flock on the lock file beside keyring
// (created empty with mode 0600 if missing, never followed if a symbolic
// link), waiting for another holder to finish. Closing the file, which
// unlock does, releases the lock; so does the process exiting.
func lockKeyring(keyring string) (unlock func(), err error) {
	name := lockName(keyring)
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock file: %w", err)
	}
	rc, err := f.SyscallConn()
	if err == nil {
		cerr := rc.Control(func(fd uintptr) {
			for {
				if err = unix.Flock(int(fd), unix.LOCK_EX); err != unix.EINTR {
					return
				}
			}
		})
		if err == nil {
			err = cerr
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", name, err)
	}
	return func() { f.Close() }, nil
}
