package integrity

import (
	"context"
	"os"

	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/sparse"
)

// Compact frees the space of the all-zero parts of a sealable image's file
// outside its data records' bytes (the same ranges a seal reads: QCOW2
// metadata, the file's tail) by punching holes into them, and returns the
// bytes it freed. qemu writes a new L2 table and refcount block whole, in
// clusters of 2 MiB (internal/qemu.ImageOptions), although a small image
// uses a few KiB of each: without this, an empty overlay took 6 MiB and
// an incremental of one 64 KiB write 8 MiB, where they take a few hundred
// KiB with it.
//
// The file's content is unchanged: a hole reads as the zeros it replaces,
// for qemu and for a seal alike (seal version 2 hashes a hole and written
// zeros the same), so Compact may run before the image is sealed or at
// any time after. Its stamp changes (a punch is a write), so it runs
// before the stamp that a seal is recorded with. Only whole 4 KiB pieces
// on the file's 4 KiB grid are punched (sparse.Puncher). A file system
// that cannot punch holes frees nothing, without an error. An image that cannot be sealed
// gives an error wrapping ErrNotSealable.
func Compact(ctx context.Context, path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	// No qemu may write the image while its zeros are punched (a piece
	// read as zero could be written before its punch): a stray attempt's
	// qemu-nbd, say. One that serves it writable now makes this a no-op;
	// one that starts before the end fails to open it.
	release, err := qemu.HoldOffWriters(f)
	if err != nil {
		return 0, err
	}
	defer release()
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	_, covered, err := sealLayout(ctx, path, f, fi)
	if err != nil {
		return 0, err
	}
	p := sparse.NewPuncher(f)
	if err := gaps(covered, fi.Size(), func(off, end int64) error { return p.Zeros(ctx, off, end) }); err != nil {
		return p.Freed(), err
	}
	// The holes are not synced: a punch a crash undoes leaves the zeros
	// it would have freed, the same content.
	err = p.Flush()
	return p.Freed(), err
}
