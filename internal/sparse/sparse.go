// Package sparse finds the data of a sparse file: the ranges its file
// system stores, as opposed to holes, which read as zeros and take no
// space. A copy that skips holes keeps them holes; a hash that knows them
// need not read them.
package sparse

import (
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Segments calls fn for each data segment of f within [off, end), in
// order (SEEK_DATA/SEEK_HOLE), clipped to that range. Everything else in
// the range is a hole. A file system without SEEK_DATA reports the whole
// range as data, which is always true of the bytes, only slower to use.
func Segments(f *os.File, off, end int64, fn func(off, n int64) error) error {
	fd := int(f.Fd())
	for off < end {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole remains
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return fn(off, end-off)
		}
		if err != nil {
			return err
		}
		if start >= end {
			return nil
		}
		stop, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		stop = min(stop, end)
		if stop > start {
			if err := fn(start, stop-start); err != nil {
				return err
			}
		}
		off = stop
	}
	return nil
}

// Allocated returns the bytes the file system stores for a file (its
// blocks, st_blocks × 512): less than its size when it has holes, a little
// more for its last block and metadata. ok is false where the file system
// does not say.
func Allocated(fi os.FileInfo) (n int64, ok bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return st.Blocks * 512, true
}
