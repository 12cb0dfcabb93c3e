package restore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/internal/qemu"
)

// Kind is what a restore target path names, as ClassifyTarget finds it.
type Kind string

// The kinds of target paths. Only KindMissing and KindRegular can take a
// file, and only KindBlockDevice a device; every other kind is refused
// before any data is converted.
const (
	KindMissing     Kind = "missing"      // nothing there; its folder exists
	KindNoFolder    Kind = "no folder"    // its parent folder is missing or not a folder
	KindRegular     Kind = "regular file" // an existing file
	KindBlockDevice Kind = "block device" // e.g. /dev/sdb, /dev/loop0
	KindDirectory   Kind = "directory"    // a folder, or a symlink to one
	KindFIFO        Kind = "named pipe (FIFO)"
	KindSocket      Kind = "socket"
	KindCharDevice  Kind = "character device" // e.g. /dev/null, a tty
	KindDangling    Kind = "dangling symbolic link"
	KindOther       Kind = "special file"
)

// Target is a restore target path as ClassifyTarget found it.
type Target struct {
	Path string // as given
	// Resolved is Path with symbolic links followed (Path when it is
	// missing): a file restore replaces the file a link names, not the
	// link, and /dev/disk/by-id/… links name their devices.
	Resolved string
	Kind     Kind
	Symlink  bool  // Path itself is a symbolic link
	Size     int64 // bytes of a regular file; 0 otherwise (see deviceSize)
}

// ClassifyTarget finds what path names, following symbolic links. The
// error is only for a path that cannot be examined (e.g. a folder it may
// not search); every kind of node, a missing one included, is a Kind.
func ClassifyTarget(path string) (Target, error) {
	t := Target{Path: path, Resolved: path}
	lfi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOTDIR) {
		t.Kind = KindMissing
		if !isDir(filepath.Dir(path)) {
			t.Kind = KindNoFolder
		}
		return t, nil
	}
	if err != nil {
		return t, fmt.Errorf("restore: %w", err)
	}
	fi := lfi
	if lfi.Mode()&fs.ModeSymlink != 0 {
		t.Symlink = true
		fi, err = os.Stat(path)
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOTDIR) {
			t.Kind = KindDangling
			return t, nil
		}
		if err != nil {
			return t, fmt.Errorf("restore: %w", err)
		}
		if t.Resolved, err = filepath.EvalSymlinks(path); err != nil {
			return t, fmt.Errorf("restore: %w", err)
		}
	}
	switch m := fi.Mode(); {
	case m.IsRegular():
		t.Kind, t.Size = KindRegular, fi.Size()
	case m.IsDir():
		t.Kind = KindDirectory
	case m&fs.ModeNamedPipe != 0:
		t.Kind = KindFIFO
	case m&fs.ModeSocket != 0:
		t.Kind = KindSocket
	case m&fs.ModeDevice != 0 && m&fs.ModeCharDevice != 0:
		t.Kind = KindCharDevice
	case m&fs.ModeDevice != 0:
		t.Kind = KindBlockDevice
	default:
		t.Kind = KindOther
	}
	return t, nil
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

// CheckTarget classifies o's target and refuses it unless a restore with
// o may write it: a missing path in an existing folder (or, with Force,
// an existing regular file) for a file; a block device for o.Device. It
// reads no data of the restore point, so callers run it before anything
// else (restore.Disk runs it again right before writing). The error names
// the path and what it is.
func CheckTarget(o Options) (Target, error) {
	if o.To == "" {
		return Target{}, refused("restore: no output file given")
	}
	t, err := ClassifyTarget(o.To)
	if err != nil {
		return t, err
	}
	what := article(string(t.Kind)) + " " + string(t.Kind)
	switch {
	case t.Kind == KindDangling:
		dest, _ := os.Readlink(o.To)
		what = fmt.Sprintf("a symbolic link to %s, which does not exist", dest)
	case t.Symlink:
		what = fmt.Sprintf("a symbolic link to %s, %s", t.Resolved, what)
	}
	if o.Device {
		switch t.Kind {
		case KindBlockDevice:
			return t, nil
		case KindMissing, KindNoFolder:
			return t, refused("restore: device %s does not exist", o.To)
		case KindRegular:
			return t, refused("restore: %s is %s, not a block device (write a file with --to)", o.To, what)
		}
		return t, refused("restore: %s is %s, not a block device", o.To, what)
	}
	switch t.Kind {
	case KindMissing:
		return t, nil
	case KindNoFolder:
		return t, refused("restore: cannot write %s: its folder %s does not exist or is not a folder", o.To, filepath.Dir(o.To))
	case KindRegular:
		if o.Force {
			return t, nil
		}
		return t, refused("restore: %s exists (%s of %d bytes); give --force to replace it", o.To, what, t.Size)
	case KindBlockDevice:
		return t, refused("restore: %s is %s: write a block device in place with --to-device, not --to", o.To, what)
	case KindDirectory:
		return t, refused("restore: %s is %s: give the path of a file to write, e.g. %s", o.To, what, filepath.Join(o.To, "disk.raw"))
	}
	return t, refused("restore: %s is %s, not a regular file: refused", o.To, what)
}

func article(s string) string {
	switch s[0] {
	case 'a', 'e', 'i', 'o', 'u':
		return "an"
	}
	return "a"
}

// writeTarget writes the disk whose chain starts at top (virtual size
// bytes) to o's target, checked again here because the path may have
// changed since the caller's first check.
func writeTarget(ctx context.Context, top string, size int64, o Options) error {
	t, err := CheckTarget(o)
	if err != nil {
		return err
	}
	if o.Device {
		return writeDevice(ctx, top, size, t, o)
	}
	return writeFile(ctx, top, size, t, o)
}

// convertOptions is the qemu-img convert of the chain at top into target.
// A device is written with -n (qemu-img must not create or truncate it)
// and, since it is not known to read as zeros, every zero area of the
// disk is written as zeros too: qemu-img assumes a zeroed target only for
// a file it created.
func convertOptions(top, target, format string, device bool) qemu.ConvertOptions {
	return qemu.ConvertOptions{Source: top, SourceFormat: "qcow2", Target: target, TargetFormat: format, NoCreate: device}
}

// writeFile writes a regular file: into a temporary file in the target's
// folder, synced, then renamed over the target, so the target appears (or
// is replaced) only when complete. Without Force the rename refuses a
// target that appeared meanwhile.
func writeFile(ctx context.Context, top string, size int64, t Target, o Options) error {
	dst := t.Resolved // a link's file is replaced, the link stays
	dir := filepath.Dir(dst)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".partial-*")
	if err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	tmpName := tmp.Name()
	tmp.Close()
	os.Remove(tmpName) // qemu-img creates it
	defer os.Remove(tmpName)
	if err := convert(ctx, convertOptions(top, tmpName, o.Format, false), size, o); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	if err := syncFile(tmpName); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	if o.Force {
		err = os.Rename(tmpName, dst)
	} else {
		err = renameNoReplace(tmpName, dst)
	}
	if errors.Is(err, fs.ErrExist) {
		return refused("restore: %s appeared while the disk was restored; give --force to replace it", o.To)
	}
	if err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	// The rename is durable only once the folder is.
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("restore: sync %s: %w", dir, err)
	}
	return nil
}

// renameNoReplace renames old to new unless new exists. Filesystems
// without RENAME_NOREPLACE get a check before a plain rename (a small
// window in which a file created at new is replaced).
func renameNoReplace(old, new string) error {
	err := unix.Renameat2(unix.AT_FDCWD, old, unix.AT_FDCWD, new, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EEXIST) {
		return &os.LinkError{Op: "rename", Old: old, New: new, Err: fs.ErrExist}
	}
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) {
		if err != nil {
			return &os.LinkError{Op: "rename", Old: old, New: new, Err: err}
		}
		return nil
	}
	if _, err := os.Lstat(new); err == nil {
		return &os.LinkError{Op: "rename", Old: old, New: new, Err: fs.ErrExist}
	}
	return os.Rename(old, new)
}

// writeDevice writes a block device in place: every byte up to the disk's
// size, zeros included, then flushes the device. It cannot be atomic: a
// failed restore leaves the device partly written.
func writeDevice(ctx context.Context, top string, size int64, t Target, o Options) error {
	if o.Format != "raw" {
		return refused("restore: a block device is written raw, not %s", o.Format)
	}
	devSize, err := deviceSize(t.Resolved)
	if err != nil {
		return fmt.Errorf("restore: %s: %w", o.To, err)
	}
	if devSize < size {
		return refused("restore: block device %s holds %d bytes, the disk is %d bytes", o.To, devSize, size)
	}
	if err := convert(ctx, convertOptions(top, t.Resolved, "raw", true), size, o); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	// qemu-img may leave its writes in the page cache; fsync of the device
	// writes them out and flushes the device's own cache.
	if err := syncFile(t.Resolved); err != nil {
		return fmt.Errorf("restore: sync %s: %w", o.To, err)
	}
	return nil
}

// deviceSize returns the size of a block device. It opens the device
// exclusively (O_EXCL on a block device): a device that is mounted or held
// by another exclusive user (LVM, md, a running restore) is refused.
func deviceSize(path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_EXCL, 0)
	if errors.Is(err, unix.EBUSY) {
		return 0, errors.New("the device is in use (mounted, or held by LVM, md or another program)")
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return f.Seek(0, io.SeekEnd)
}

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
