package integrity

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

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
// on the file's 4 KiB grid are punched. A file system that cannot punch
// holes frees nothing, without an error. An image that cannot be sealed
// gives an error wrapping ErrNotSealable.
func Compact(ctx context.Context, path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	_, covered, err := sealLayout(ctx, path, f, fi)
	if err != nil {
		return 0, err
	}
	p := &puncher{f: f, buf: make([]byte, 1<<20)}
	at := int64(0)
	for _, c := range append(covered, span{fi.Size(), 0}) {
		if c.off > at {
			if err := p.zeros(ctx, at, min(c.off, fi.Size())); err != nil {
				return p.freed, err
			}
		}
		at = max(at, c.off+c.n)
	}
	if err := p.flush(); err != nil {
		return p.freed, err
	}
	if p.freed > 0 {
		if err := f.Sync(); err != nil {
			return p.freed, err
		}
	}
	return p.freed, nil
}

// puncher punches the all-zero pieces of a file, a run of them at a time.
type puncher struct {
	f      *os.File
	buf    []byte
	run    span // zero pieces found and not yet punched
	freed  int64
	cannot bool // the file system refused a punch: punch no more
}

// zeros finds the all-zero whole pieces of [lo, hi) in its data segments
// (holes need no punch) and punches them.
func (p *puncher) zeros(ctx context.Context, lo, hi int64) error {
	lo = (lo + pieceSize - 1) / pieceSize * pieceSize
	hi = hi / pieceSize * pieceSize
	if lo >= hi {
		return nil
	}
	err := sparse.Segments(p.f, lo, hi, func(off, n int64) error {
		from := off / pieceSize * pieceSize
		to := min(hi, (off+n+pieceSize-1)/pieceSize*pieceSize)
		for from < to && !p.cannot {
			if err := ctx.Err(); err != nil {
				return err
			}
			k := min(to-from, int64(len(p.buf)))
			if _, err := p.f.ReadAt(p.buf[:k], from); err != nil {
				return err
			}
			for i := int64(0); i < k; i += pieceSize {
				if isZero(p.buf[i : i+pieceSize]) {
					if err := p.add(from + i); err != nil {
						return err
					}
				}
			}
			from += k
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("integrity: compact %s: %w", p.f.Name(), err)
	}
	return nil
}

// add adds the zero piece at off, punching the run before when it does
// not extend it.
func (p *puncher) add(off int64) error {
	if p.run.n > 0 && p.run.off+p.run.n == off {
		p.run.n += pieceSize
		return nil
	}
	if err := p.flush(); err != nil {
		return err
	}
	p.run = span{off, pieceSize}
	return nil
}

// flush punches the pending run.
func (p *puncher) flush() error {
	run := p.run
	p.run = span{}
	if run.n == 0 || p.cannot {
		return nil
	}
	err := unix.Fallocate(int(p.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, run.off, run.n)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		p.cannot = true
		return nil
	}
	if err != nil {
		return fmt.Errorf("integrity: compact %s: punching %d bytes at %d: %w", p.f.Name(), run.n, run.off, err)
	}
	p.freed += run.n
	return nil
}
