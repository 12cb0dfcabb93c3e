package sparse

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// PieceSize is the grid on which a Puncher looks for zeros.
const PieceSize = 4096

// A Puncher frees the all-zero 4 KiB pieces of a file, on the file's 4 KiB
// grid, by punching holes into them (FALLOC_FL_PUNCH_HOLE): the file reads
// the same, its size stays, the space they took is freed. A file system
// that cannot punch holes frees nothing, without an error. The caller
// syncs the file when it wants the holes durable (they need not be: a
// piece not punched still reads as zeros).
type Puncher struct {
	f      *os.File
	buf    []byte
	run    [2]int64 // offset and length of zero pieces not yet punched
	freed  int64
	cannot bool // the file system refused a punch: punch no more
}

// NewPuncher returns a Puncher of f, which must be open for writing.
func NewPuncher(f *os.File) *Puncher {
	return &Puncher{f: f, buf: make([]byte, 1<<20)}
}

// Freed returns the bytes punched so far.
func (p *Puncher) Freed() int64 { return p.freed }

// Zeros reads the data segments of [lo, hi) (holes need no punch) and
// punches the whole pieces in it that hold only zeros. Ranges must come
// in increasing order; Flush punches what the last one left pending.
func (p *Puncher) Zeros(ctx context.Context, lo, hi int64) error {
	lo = (lo + PieceSize - 1) / PieceSize * PieceSize
	hi = hi / PieceSize * PieceSize
	if lo >= hi {
		return nil
	}
	err := Segments(p.f, lo, hi, func(off, n int64) error {
		from := off / PieceSize * PieceSize
		to := min(hi, (off+n+PieceSize-1)/PieceSize*PieceSize)
		for from < to && !p.cannot {
			if err := ctx.Err(); err != nil {
				return err
			}
			k := min(to-from, int64(len(p.buf)))
			if _, err := p.f.ReadAt(p.buf[:k], from); err != nil {
				return err
			}
			for i := int64(0); i < k; i += PieceSize {
				if IsZero(p.buf[i : i+PieceSize]) {
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
		return fmt.Errorf("sparse: %s: %w", p.f.Name(), err)
	}
	return nil
}

// add adds the zero piece at off, punching the run before when it does
// not extend it.
func (p *Puncher) add(off int64) error {
	if p.run[1] > 0 && p.run[0]+p.run[1] == off {
		p.run[1] += PieceSize
		return nil
	}
	if err := p.Flush(); err != nil {
		return err
	}
	p.run = [2]int64{off, PieceSize}
	return nil
}

// Flush punches the pending run of zero pieces.
func (p *Puncher) Flush() error {
	run := p.run
	p.run = [2]int64{}
	if run[1] == 0 || p.cannot {
		return nil
	}
	err := unix.Fallocate(int(p.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, run[0], run[1])
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		p.cannot = true
		return nil
	}
	if err != nil {
		return fmt.Errorf("sparse: %s: punching %d bytes at %d: %w", p.f.Name(), run[1], run[0], err)
	}
	p.freed += run[1]
	return nil
}

var zeroPiece [PieceSize]byte

// IsZero reports whether b holds only zero bytes.
func IsZero(b []byte) bool {
	for len(b) > 0 {
		k := min(len(b), PieceSize)
		if string(b[:k]) != string(zeroPiece[:k]) {
			return false
		}
		b = b[k:]
	}
	return true
}
