package stacktest

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/lab"
)

// Pattern returns n bytes of pseudo-random data, the same for the same
// seed, without zero bytes (so no chunk of it is skipped as zeros).
func Pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64() | 0x0101010101010101
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n - n%8; i < n; i++ {
		b[i] = byte(r.UintN(255) + 1)
	}
	return b
}

// WriteDisk writes data at off on disk key of lab VM vm, failing t unless
// all of it is written.
func WriteDisk(t testing.TB, l *lab.Lab, vm string, key int32, off int64, data []byte) {
	t.Helper()
	if n, err := l.WriteDisk(vm, key, off, bytes.NewReader(data)); err != nil || n != int64(len(data)) {
		t.Fatalf("lab write %s/%d at %d: %d bytes, %v", vm, key, off, n, err)
	}
}

// Capture copies a lab disk's current content into a sparse file of the
// disk's capacity at path, failing t on an error: the disk's allocated
// extents are read, the rest stays a hole (the disk reads zeros there).
func Capture(t testing.TB, l *lab.Lab, vm string, key int32, path string) {
	t.Helper()
	capacity, err := l.DiskCapacity(vm, key)
	if err != nil {
		t.Fatal(err)
	}
	exts, err := l.DiskExtents(vm, key)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(capacity); err != nil {
		t.Fatal(err)
	}
	for _, e := range exts {
		if _, err := l.ReadDiskRange(vm, key, e.Offset, e.Length, io.NewOffsetWriter(f, e.Offset)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// DataRanges lists the data (non-hole) ranges [start, end) of a file of
// the given size, with SEEK_DATA and SEEK_HOLE.
func DataRanges(f *os.File, size int64) ([][2]int64, error) {
	var out [][2]int64
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return nil, err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		hole = min(hole, size)
		out = append(out, [2]int64{data, hole})
		off = hole
	}
	return out, nil
}

// SameContent compares two sparse files byte for byte, sizes included:
// every range that is data in either file is read from both and compared;
// every other range is a hole in both, which reads as zeros in both. It
// returns a description of the first difference ("sizes differ: …" or
// "first difference at byte N: …"), or "" when equal.
func SameContent(a, b string) (string, error) {
	fa, err := os.Open(a)
	if err != nil {
		return "", err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return "", err
	}
	defer fb.Close()
	sa, err := fa.Stat()
	if err != nil {
		return "", err
	}
	sb, err := fb.Stat()
	if err != nil {
		return "", err
	}
	if sa.Size() != sb.Size() {
		return fmt.Sprintf("sizes differ: %d and %d", sa.Size(), sb.Size()), nil
	}
	ra, err := DataRanges(fa, sa.Size())
	if err != nil {
		return "", err
	}
	rb, err := DataRanges(fb, sb.Size())
	if err != nil {
		return "", err
	}
	// The union of both files' data ranges, merged.
	all := append(append([][2]int64{}, ra...), rb...)
	slices.SortFunc(all, func(x, y [2]int64) int { return cmp.Compare(x[0], y[0]) })
	var union [][2]int64
	for _, r := range all {
		if n := len(union); n > 0 && r[0] <= union[n-1][1] {
			union[n-1][1] = max(union[n-1][1], r[1])
			continue
		}
		union = append(union, r)
	}
	bufA, bufB := make([]byte, 4<<20), make([]byte, 4<<20)
	for _, r := range union {
		for off := r[0]; off < r[1]; {
			n := min(int64(len(bufA)), r[1]-off)
			if _, err := fa.ReadAt(bufA[:n], off); err != nil {
				return "", err
			}
			if _, err := fb.ReadAt(bufB[:n], off); err != nil {
				return "", err
			}
			if !bytes.Equal(bufA[:n], bufB[:n]) {
				for i := int64(0); i < n; i++ {
					if bufA[i] != bufB[i] {
						return fmt.Sprintf("first difference at byte %d: %#02x and %#02x", off+i, bufA[i], bufB[i]), nil
					}
				}
			}
			off += n
		}
	}
	return "", nil
}

// FlipByte inverts the byte in the middle of a file, such as an image of
// the repository, to damage it on purpose.
func FlipByte(t testing.TB, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	off := fi.Size() / 2
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}
