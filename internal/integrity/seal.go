package integrity

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/qemu"
)

// A backup's image is recorded in the catalog with one of two proofs:
//
//   - the SHA-256 of the whole file (64 hex digits): images a prune merged,
//     and those of transfers without a digest file;
//   - a seal ("seal1:" and 64 hex digits), for images a transfer wrote with
//     a digest file (internal/digest). The transfer knows the SHA-256 of
//     every range it wrote as it streamed it; only the rest of the file
//     (the QCOW2 metadata, the parts of clusters qemu filled from the
//     backing file or with zeros, the file's tail) is read to seal it: a
//     few MiB, where hashing the whole file read the backup's data again.
//
// The seal is SHA-256 over "cbtflow image seal 1\n", the file's size (u64,
// big-endian), the SHA-256 of the digest file, and, in the file's order,
// every range of the file that holds no byte of a data record — its offset
// and length (u64 each) and its bytes. Where a data record's bytes lie in
// the file is read from the image's own mapping (qemu-img map of the image
// alone), which the QCOW2 metadata holds, which the seal covers. A data
// record's all-zero blocks (which the copier skips on a fresh image and
// writes as NBD zeroes on an overlay) have no bytes in the file: the same
// mapping says the image reads them as zeros (a zero cluster, or a cluster
// an image without a backing file does not allocate), and a check hashes
// zeros for them. A record that the image does not hold itself (its
// backing file's data shows through) makes the image unsealable.
//
// So every byte of the file is proven: a byte outside the records' ranges
// by the seal, a byte inside by its record's SHA-256 in the digest file,
// whose own SHA-256 the seal covers (and the catalog records apart). A
// check of a seal reads the whole file once, as a full SHA-256 would.

// SealPrefix starts a recorded seal.
const SealPrefix = "seal1:"

const sealDomain = "cbtflow image seal 1\n"

// IsSeal reports whether a recorded proof is a seal.
func IsSeal(recorded string) bool { return strings.HasPrefix(recorded, SealPrefix) }

// ErrNotSealable is wrapped by Seal when the image cannot be sealed: its
// digest file is not complete, or the image does not hold a range a data
// record names. The caller records the file's SHA-256 instead.
var ErrNotSealable = errors.New("integrity: the image cannot be sealed")

// beatEvery is how often Seal and VerifySeal call their beat.
var beatEvery = time.Second

// span is a range of the image file.
type span struct{ off, n int64 }

// Seal returns the size and the seal of the QCOW2 image at path, whose
// complete digest file lies beside it (digest.PathOf). beat, when set, is
// called about every second with the bytes read so far.
func Seal(ctx context.Context, path string, beat func(done int64)) (int64, string, error) {
	df, err := digest.Read(digest.PathOf(path))
	if err != nil {
		return 0, "", fmt.Errorf("%w: %v", ErrNotSealable, err)
	}
	if !df.Complete || df.Header.Image != filepath.Base(path) {
		return 0, "", fmt.Errorf("%w: digest file %s is not the complete one of this image", ErrNotSealable, digest.PathOf(path))
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, "", err
	}
	ext, err := mapOf(ctx, path, fi)
	if err != nil {
		return 0, "", err
	}
	backing, err := backingOf(f, path)
	if d := (*Damage)(nil); errors.As(err, &d) {
		return 0, "", fmt.Errorf("%w: %v", ErrNotSealable, err)
	}
	if err != nil {
		return 0, "", err
	}
	covered, err := recordSpans(df.Records, ext, backing == "")
	if err != nil {
		return 0, "", fmt.Errorf("%w: %v", ErrNotSealable, err)
	}
	sum, err := sealOf(ctx, f, fi.Size(), df.SHA256, covered, beat)
	if err != nil {
		return 0, "", err
	}
	return fi.Size(), sum, nil
}

// VerifySeal proves the QCOW2 image at path against its recorded seal: the
// file's bytes outside the digest file's data records by the seal, and the
// data of every record by its SHA-256. A *Damage error says what differs;
// other errors (I/O, a canceled ctx, qemu-img failing to run) say nothing
// about the image. beat is called as in Seal.
func VerifySeal(ctx context.Context, path, recorded string, beat func(done int64)) error {
	if !IsSeal(recorded) {
		return fmt.Errorf("integrity: %q is not a seal", recorded)
	}
	dpath := digest.PathOf(path)
	df, err := digest.Read(dpath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return &Damage{path, fmt.Sprintf("its digest file %s, which its seal covers, is missing", dpath)}
	case errors.Is(err, digest.ErrFormat):
		return &Damage{path, fmt.Sprintf("its digest file %s, which its seal covers, is malformed: %v", dpath, err)}
	case err != nil:
		return err
	case !df.Complete:
		return &Damage{path, fmt.Sprintf("its digest file %s, which its seal covers, has no end record", dpath)}
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	ext, err := mapOf(ctx, path, fi)
	if err != nil {
		if errors.Is(err, errReplaced) {
			return err
		}
		return mapFailure(ctx, f, path, err)
	}
	backing, err := backingOf(f, path)
	if err != nil {
		return err
	}
	covered, err := recordSpans(df.Records, ext, backing == "")
	if err != nil {
		return &Damage{path, err.Error()}
	}
	// sealOf reports the bytes it read so far; the records' reads follow.
	var done int64
	progress := func(n int64) {
		done = n
		if beat != nil {
			beat(done)
		}
	}
	got, err := sealOf(ctx, f, fi.Size(), df.SHA256, covered, progress)
	if err != nil {
		return err
	}
	if got != recorded {
		return &Damage{path, fmt.Sprintf("has seal %s, %s was recorded at commit: the SHA-256 of its QCOW2 metadata, of the bytes no data record covers, or of its digest file %s differs", got, recorded, dpath)}
	}
	// The records' data, where the mapping puts it, and the zeros it says
	// the image reads in their blocks it holds no data for.
	buf := make([]byte, digest.BlockSize)
	zeros := make([]byte, 64<<10)
	last := time.Now()
	for _, r := range df.Records {
		if r.Kind != digest.KindData {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		h := sha256.New()
		for _, p := range recordParts(r.Offset, r.Length, ext, backing == "") {
			s := p.span
			if p.zero {
				for ; s.n > 0; s.n -= min(s.n, int64(len(zeros))) {
					h.Write(zeros[:min(s.n, int64(len(zeros)))])
				}
				continue
			}
			for s.n > 0 {
				k := min(s.n, int64(len(buf)))
				if _, err := f.ReadAt(buf[:k], s.off); err != nil {
					return fmt.Errorf("integrity: %s: %w", path, err)
				}
				h.Write(buf[:k])
				s.off, s.n = s.off+k, s.n-k
				done += k
			}
		}
		if got := h.Sum(nil); string(got) != string(r.Sum[:]) {
			return &Damage{path, fmt.Sprintf("holds other data at disk offset %d (%d bytes) than the backup wrote there (SHA-256 %x, recorded %x in %s)",
				r.Offset, r.Length, got, r.Sum, dpath)}
		}
		if beat != nil && time.Since(last) >= beatEvery {
			beat(done)
			last = time.Now()
		}
	}
	return nil
}

// errReplaced is wrapped when the file at an image's path was replaced
// while it was read: the mapping qemu-img read by the path and the bytes
// read from the file opened before are not of one file. It says nothing
// about either file; a check again reads the one there.
var errReplaced = errors.New("integrity: the image file was replaced while it was read")

// mapOf maps the QCOW2 image at path (qemu.MapLayer), which must still be
// the file opened before, whose FileInfo is fi: qemu-img opens the path.
func mapOf(ctx context.Context, path string, fi os.FileInfo) ([]qemu.MapExtent, error) {
	ext, err := qemu.MapLayer(ctx, path)
	now, serr := os.Stat(path)
	if serr != nil {
		return nil, fmt.Errorf("%w: %s: %v", errReplaced, path, serr)
	}
	if !os.SameFile(fi, now) {
		return nil, fmt.Errorf("%w: %s", errReplaced, path)
	}
	return ext, err
}

// mapFailure is the error of a check whose qemu-img map of the image at
// path (open as f) failed with err. Only qemu-img that ran to its end and
// refused the image says the image is damaged (its metadata is not a
// QCOW2 qemu reads), and then only when the file itself reads back whole:
// qemu-img that could not start (missing, not executable, no memory for
// a process), that a signal ended (the OOM killer, a canceled ctx), or an
// I/O error of the storage says nothing about the image, and must not
// mark a chain damaged.
func mapFailure(ctx context.Context, f *os.File, path string, err error) error {
	var exit *exec.ExitError
	if ctx.Err() != nil || !errors.As(err, &exit) || !exit.Exited() {
		return err
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); ; {
		if cerr := ctx.Err(); cerr != nil {
			return cerr
		}
		n, rerr := f.ReadAt(buf, off)
		off += int64(n)
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			return fmt.Errorf("%w; reading %s: %v", err, path, rerr)
		}
	}
	return &Damage{path, fmt.Sprintf("its QCOW2 mapping cannot be read: %v", err)}
}

// Verify proves the file at path against the proof recorded at commit: a
// seal (VerifySeal) or the file's SHA-256. A *Damage error names what
// differs.
func Verify(ctx context.Context, path, recorded string, beat func(done int64)) error {
	if IsSeal(recorded) {
		return VerifySeal(ctx, path, recorded, beat)
	}
	_, sum, err := Hash(ctx, path, beat)
	if err != nil {
		return err
	}
	if sum != recorded {
		return &Damage{path, fmt.Sprintf("has SHA-256 %s, %s was recorded at commit", sum, recorded)}
	}
	return nil
}

// recordSpans returns the ranges of the image file that hold the data
// records' bytes, sorted and merged. Every byte of every data record must
// be the image's own (recordParts): its data, or zeros its metadata says
// it reads there. zeroUnallocated says the image has no backing file.
func recordSpans(recs []digest.Record, ext []qemu.MapExtent, zeroUnallocated bool) ([]span, error) {
	var out []span
	for _, r := range recs {
		if r.Kind != digest.KindData {
			continue
		}
		var n, data int64
		for _, p := range recordParts(r.Offset, r.Length, ext, zeroUnallocated) {
			n += p.n
			if !p.zero {
				out = append(out, p.span)
				data += p.n
			}
		}
		if n != r.Length {
			return nil, fmt.Errorf("holds %d of the %d bytes its digest file records the backup wrote at disk offset %d", n, r.Length, r.Offset)
		}
		if data == 0 {
			// The copier makes a zero record of an all-zero piece: data it
			// wrote that the image reads as zeros was lost.
			return nil, fmt.Errorf("holds none of the %d bytes its digest file records the backup wrote at disk offset %d", r.Length, r.Offset)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].off < out[j].off })
	merged := out[:0]
	for _, s := range out {
		if k := len(merged); k > 0 && merged[k-1].off+merged[k-1].n >= s.off {
			if e := s.off + s.n; e > merged[k-1].off+merged[k-1].n {
				merged[k-1].n = e - merged[k-1].off
			}
			continue
		}
		merged = append(merged, s)
	}
	return merged, nil
}

// part is a piece of a data record's disk range as the image holds it:
// data at a range of the file, or (zero) n bytes the image reads as zeros
// by its own metadata — a zero cluster, or, in an image without a backing
// file, a cluster it does not allocate: an all-zero block of the copy,
// skipped on a fresh image, written as NBD zeroes on an overlay. The
// mapping that says so lies in the metadata, which the seal covers.
type part struct {
	span
	zero bool
}

// recordParts returns the parts of the disk range [off, off+n) the image
// holds itself, in disk order (with gaps where it does not: its backing
// file's data, a compressed cluster). ext is sorted by Start.
func recordParts(off, n int64, ext []qemu.MapExtent, zeroUnallocated bool) []part {
	end := off + n
	i := sort.Search(len(ext), func(i int) bool { return ext[i].End() > off })
	var out []part
	for ; i < len(ext) && ext[i].Start < end; i++ {
		e := ext[i]
		s, t := max(off, e.Start), min(end, e.End())
		if s >= t || e.Depth != 0 {
			continue
		}
		switch {
		case e.Data && e.HasOffset:
			out = append(out, part{span{e.Offset + s - e.Start, t - s}, false})
		case e.Data:
			// Data without a place in the file (compressed): its bytes
			// are not the file's.
		case e.Zero && (e.Present || zeroUnallocated):
			out = append(out, part{span{0, t - s}, true})
		}
	}
	return out
}

// sealOf hashes the seal of a file of size bytes whose ranges covered hold
// the data records (sorted, merged), reading every other byte of it.
func sealOf(ctx context.Context, f *os.File, size int64, digestSHA string, covered []span, beat func(int64)) (string, error) {
	dsum, err := hex.DecodeString(digestSHA)
	if err != nil || len(dsum) != sha256.Size {
		return "", fmt.Errorf("integrity: digest file SHA-256 %q", digestSHA)
	}
	h := sha256.New()
	h.Write([]byte(sealDomain))
	writeU64(h, uint64(size))
	h.Write(dsum)
	buf := make([]byte, 1<<20)
	var done int64
	last := time.Now()
	at := int64(0)
	hashRange := func(off, n int64) error {
		if n <= 0 {
			return nil
		}
		writeU64(h, uint64(off))
		writeU64(h, uint64(n))
		for n > 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
			k := min(n, int64(len(buf)))
			if _, err := f.ReadAt(buf[:k], off); err != nil {
				return fmt.Errorf("integrity: %s: %w", f.Name(), err)
			}
			h.Write(buf[:k])
			off, n, done = off+k, n-k, done+k
			if beat != nil && time.Since(last) >= beatEvery {
				beat(done)
				last = time.Now()
			}
		}
		return nil
	}
	for _, s := range covered {
		if s.off+s.n > size {
			return "", &Damage{f.Name(), fmt.Sprintf("maps data to bytes %d-%d, past its end (%d bytes)", s.off, s.off+s.n, size)}
		}
		if err := hashRange(at, s.off-at); err != nil {
			return "", err
		}
		at = s.off + s.n
	}
	if err := hashRange(at, size-at); err != nil {
		return "", err
	}
	return SealPrefix + hex.EncodeToString(h.Sum(nil)), nil
}

func writeU64(h hash.Hash, v uint64) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	h.Write(b[:])
}
