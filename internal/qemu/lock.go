package qemu

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// qemu's image locking (its file driver, raw-posix): a process that holds
// a permission on an image file takes a shared OFD lock on byte 100 + the
// permission's bit, and on byte 200 + the bit of each permission it does
// not share with others; before it takes a permission it tests byte 200 +
// its bit (someone refuses to share it), and before it refuses to share
// one it tests byte 100 + its bit (someone holds it).
const (
	lockBasePerm   = 100
	lockBaseShared = 200
	permWriteBit   = 1 // BLK_PERM_WRITE = 1 << 1
)

// ErrImageWritten is returned by HoldOffWriters when a process holds the
// image open for writing (a qemu-nbd serving it, qemu-img writing it).
var ErrImageWritten = errors.New("qemu: a process holds the image open for writing")

// HoldOffWriters keeps qemu processes from writing the image open as f
// until release is called: it refuses, as qemu does, to share the write
// permission, so that a qemu-nbd or qemu-img that would write the image
// fails to open it (`Failed to get "write" lock`). It returns
// ErrImageWritten, holding nothing, when such a process has the image
// open already. The lock is released with f's last close at the latest.
func HoldOffWriters(f *os.File) (release func(), err error) {
	fd := int(f.Fd())
	shared := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: lockBaseShared + permWriteBit, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &shared); err != nil {
		return nil, err
	}
	release = func() {
		un := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: lockBaseShared + permWriteBit, Len: 1}
		_ = unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &un)
	}
	// Taken first, then tested: a writer that starts from now on fails,
	// and one that started before is seen here.
	writer := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: lockBasePerm + permWriteBit, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &writer); err != nil {
		release()
		return nil, err
	}
	if writer.Type != unix.F_UNLCK {
		release()
		return nil, ErrImageWritten
	}
	return release, nil
}
