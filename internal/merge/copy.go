package merge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/internal/sparse"
)

// copyChunk is the most copy_file_range moves between two checks of the
// context.
const copyChunk = 32 << 20

// allocated returns the bytes in path's data segments: what a sparse copy
// of the file reads and writes.
func allocated(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	var n int64
	err = sparse.Segments(f, 0, fi.Size(), func(_, k int64) error { n += k; return nil })
	return n, err
}

// canClone reports whether the filesystem of src's folder clones src
// (FICLONE, a reflink: shared extents, no data copied). It clones into an
// unnamed O_TMPFILE, so nothing is left behind whatever happens.
func canClone(src string) bool {
	in, err := os.Open(src)
	if err != nil {
		return false
	}
	defer in.Close()
	fd, err := unix.Open(filepath.Dir(src), unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return unix.IoctlFileClone(fd, int(in.Fd())) == nil
}

// copySparse copies src into a new file dst (never an existing one): a
// clone when the filesystem can, else only src's data segments
// (copy_file_range, read/write where that is refused), so holes stay
// holes. dst is fsynced. It returns the bytes copied (0 for a clone).
func copySparse(ctx context.Context, src, dst string) (copied int64, cloned bool, err error) {
	in, err := os.Open(src) // read-only: src is a committed image
	if err != nil {
		return 0, false, err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return 0, false, err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return 0, false, err
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = cerr
		}
	}()
	if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil {
		return 0, true, out.Sync()
	}
	if err := out.Truncate(fi.Size()); err != nil {
		return 0, false, err
	}
	useCFR := true
	buf := make([]byte, 1<<20)
	err = sparse.Segments(in, 0, fi.Size(), func(off, n int64) error {
		for n > 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
			k := min(n, copyChunk)
			if useCFR {
				roff, woff := off, off
				m, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(k), 0)
				switch {
				case err == nil && m > 0:
					off, n, copied = off+int64(m), n-int64(m), copied+int64(m)
					continue
				case err == nil: // 0 bytes: src shrank under us
					return fmt.Errorf("%s changed while it was copied", src)
				case errors.Is(err, unix.EXDEV), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.EINVAL):
					useCFR = false
				default:
					return err
				}
			}
			k = min(k, int64(len(buf)))
			m, err := in.ReadAt(buf[:k], off)
			if err != nil && !(errors.Is(err, io.EOF) && int64(m) == k) {
				return err
			}
			if _, err := out.WriteAt(buf[:m], off); err != nil {
				return err
			}
			off, n, copied = off+int64(m), n-int64(m), copied+int64(m)
		}
		return nil
	})
	if err != nil {
		return copied, false, err
	}
	return copied, false, out.Sync()
}

// syncFile fsyncs a file (qemu-img's own flush at close is not relied on).
func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// syncDir fsyncs a folder, so a created, renamed or removed name in it is
// durable.
func syncDir(path string) error {
	d, err := os.Open(path)
	if err != nil {
		return err
	}
	if err := d.Sync(); err != nil {
		d.Close()
		return err
	}
	return d.Close()
}

// punchZeros frees the all-zero 4 KiB pieces of the file at path
// (sparse.Puncher); the caller syncs it.
func punchZeros(ctx context.Context, path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	p := sparse.NewPuncher(f)
	if err := p.Zeros(ctx, 0, fi.Size()); err != nil {
		return err
	}
	return p.Flush()
}
