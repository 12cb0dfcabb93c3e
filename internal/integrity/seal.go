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
	"github.com/cbtflow/cbtflow/internal/qcow2"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/sparse"
)

// A backup's image is recorded in the catalog with one of two proofs:
//
//   - the SHA-256 of the whole file (64 hex digits): images a prune merged,
//     and those of transfers without a digest file;
//   - a seal ("seal2:" and 64 hex digits; "seal1:" for images sealed before
//     version 2, still proven), for images a transfer wrote with a digest
//     file (internal/digest). The transfer knows the digest of every range
//     it wrote as it streamed it; only the rest of the file (the QCOW2
//     metadata, the parts of clusters qemu filled from the backing file or
//     with zeros, the file's tail) is read to seal it: a few MiB, where
//     hashing the whole file read the backup's data again.
//
// The seal is SHA-256 over a domain string ("cbtflow image seal 2\n"), the
// file's size (u64, big-endian), the SHA-256 of the digest file, and, in
// the file's order, every range of the file that holds no byte of a data
// record — its offset and length (u64 each) and its content. Where a data
// record's bytes lie in the file is read from the image's own mapping
// (its L1 and L2 tables, internal/qcow2, as qemu-img map of the image
// alone says; qemu-img itself for an image that reader refuses), which the
// QCOW2 metadata holds, which the seal covers. A data record's all-zero blocks (which the copier skips
// on a fresh image and writes as NBD zeroes on an overlay) have no bytes in
// the file: the same mapping says the image reads them as zeros (a zero
// cluster, or a cluster an image without a backing file does not
// allocate), and a check hashes zeros for them. A record that the image
// does not hold itself (its backing file's data shows through) makes the
// image unsealable.
//
// A range's content is hashed in pieces: the range cut at every multiple
// of 4 KiB of the file. A piece holding a non-zero byte is hashed as the
// byte 1 and its bytes; a run of all-zero pieces as the byte 0 and the
// run's length (u64). Where a piece lies is known from the range, so the
// form is unambiguous, and it depends only on the bytes: a hole of a
// sparse file and written zeros hash alike, but a hole's pieces are known
// to be zero without reading them (SEEK_DATA/SEEK_HOLE). Images with large
// clusters (2 MiB, internal/qemu) are sparse: the unwritten subclusters of
// a cluster are holes in the file, which a seal of version 1 (every byte
// of a range hashed as it is) had to read.
//
// So every byte of the file is proven: a byte outside the records' ranges
// by the seal, a byte inside by its record's digest in the digest file
// (BLAKE3, or SHA-256 in a file an older release wrote), whose own
// SHA-256 the seal covers (and the catalog records apart). A
// check of a seal reads the file's data once, as a full SHA-256 would,
// and skips its holes.

// SealPrefix starts a seal made now (version 2).
const SealPrefix = "seal2:"

// sealPrefix1 starts a seal of version 1: every byte of a range hashed as
// it is, holes read.
const sealPrefix1 = "seal1:"

const (
	sealDomain  = "cbtflow image seal 2\n"
	sealDomain1 = "cbtflow image seal 1\n"
)

// pieceSize is the grid on which a seal of version 2 cuts a range.
const pieceSize = sparse.PieceSize

// IsSeal reports whether a recorded proof is a seal.
func IsSeal(recorded string) bool {
	return strings.HasPrefix(recorded, SealPrefix) || strings.HasPrefix(recorded, sealPrefix1)
}

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
	return sealVersion(ctx, path, 2, beat)
}

// sealVersion is Seal of a given version (tests make seals of version 1).
func sealVersion(ctx context.Context, path string, version int, beat func(done int64)) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, "", err
	}
	df, covered, err := sealLayout(ctx, path, f, fi)
	if err != nil {
		return 0, "", err
	}
	sum, err := sealOf(ctx, f, fi.Size(), df.SHA256, covered, version, beat)
	if err != nil {
		return 0, "", err
	}
	return fi.Size(), sum, nil
}

// sealLayout reads the complete digest file of the image at path (open
// as f, whose FileInfo is fi) and returns it with the ranges of the file
// that hold its data records' bytes. An image that cannot be sealed gives
// an error wrapping ErrNotSealable.
func sealLayout(ctx context.Context, path string, f *os.File, fi os.FileInfo) (*digest.File, []span, error) {
	df, err := digest.Read(digest.PathOf(path))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrNotSealable, err)
	}
	if !df.Complete || df.Header.Image != filepath.Base(path) {
		return nil, nil, fmt.Errorf("%w: digest file %s is not the complete one of this image", ErrNotSealable, digest.PathOf(path))
	}
	ext, err := mapOf(ctx, f, path, fi)
	if err != nil {
		return nil, nil, err
	}
	backing, err := backingOf(f, path)
	if d := (*Damage)(nil); errors.As(err, &d) {
		return nil, nil, fmt.Errorf("%w: %v", ErrNotSealable, err)
	}
	if err != nil {
		return nil, nil, err
	}
	covered, err := recordSpans(df.Records, ext, backing == "")
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrNotSealable, err)
	}
	return df, covered, nil
}

// VerifySeal proves the QCOW2 image at path against its recorded seal: the
// file's bytes outside the digest file's data records by the seal, and the
// data of every record by its digest (made with its digest file's
// algorithm: BLAKE3, or SHA-256). A *Damage error says what differs;
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
	ext, err := mapOf(ctx, f, path, fi)
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
	version := 2
	if strings.HasPrefix(recorded, sealPrefix1) {
		version = 1
	}
	got, err := sealOf(ctx, f, fi.Size(), df.SHA256, covered, version, progress)
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
		h := df.Header.Algorithm.New() // the records' own algorithm
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
			return &Damage{path, fmt.Sprintf("holds other data at disk offset %d (%d bytes) than the backup wrote there (%v %x, recorded %x in %s)",
				r.Offset, r.Length, df.Header.Algorithm, got, r.Sum, dpath)}
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

// layerMap is qcow2.MapLayer; tests make it refuse, to reach qemu-img.
var layerMap = qcow2.MapLayer

// mapOf maps the QCOW2 image at path, open as f, whose FileInfo is fi:
// from its own metadata (qcow2.MapLayer, no process, the cost of its
// tables), or, for an image that reader does not take (or cannot read:
// a truncated table), by qemu-img (qemu.MapLayer), which decides whether
// it is damaged. qemu-img opens the path, which must still be the file
// opened before.
func mapOf(ctx context.Context, f *os.File, path string, fi os.FileInfo) ([]qemu.MapExtent, error) {
	if ext, err := layerMap(f); err == nil {
		return ext, nil
	}
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

// sealOf hashes the seal (of version 1 or 2) of a file of size bytes
// whose ranges covered hold the data records (sorted, merged), reading
// every other byte of it: every byte for version 1, its data segments for
// version 2.
func sealOf(ctx context.Context, f *os.File, size int64, digestSHA string, covered []span, version int, beat func(int64)) (string, error) {
	dsum, err := hex.DecodeString(digestSHA)
	if err != nil || len(dsum) != sha256.Size {
		return "", fmt.Errorf("integrity: digest file SHA-256 %q", digestSHA)
	}
	s := &sealer{ctx: ctx, f: f, h: sha256.New(), buf: make([]byte, 1<<20), beat: beat, last: time.Now()}
	prefix, hashContent := SealPrefix, s.pieces
	s.h.Write([]byte(sealDomain))
	if version == 1 {
		prefix, hashContent = sealPrefix1, s.bytes
		s.h.Reset()
		s.h.Write([]byte(sealDomain1))
	}
	writeU64(s.h, uint64(size))
	s.h.Write(dsum)
	hashRange := func(off, n int64) error {
		if n <= 0 {
			return nil
		}
		writeU64(s.h, uint64(off))
		writeU64(s.h, uint64(n))
		return hashContent(off, off+n)
	}
	for _, c := range covered {
		if c.off+c.n > size {
			return "", &Damage{f.Name(), fmt.Sprintf("maps data to bytes %d-%d, past its end (%d bytes)", c.off, c.off+c.n, size)}
		}
	}
	if err := gaps(covered, size, func(off, end int64) error { return hashRange(off, end-off) }); err != nil {
		return "", err
	}
	return prefix + hex.EncodeToString(s.h.Sum(nil)), nil
}

// gaps calls fn, in order, for each range [off, end) of a file of size
// bytes that the ranges covered (sorted, merged) leave out: what a seal
// hashes and a compaction may punch.
func gaps(covered []span, size int64, fn func(off, end int64) error) error {
	at := int64(0)
	for _, c := range covered {
		if end := min(c.off, size); end > at {
			if err := fn(at, end); err != nil {
				return err
			}
		}
		at = max(at, c.off+c.n)
	}
	if size > at {
		return fn(at, size)
	}
	return nil
}

// sealer hashes the content of a seal's ranges.
type sealer struct {
	ctx  context.Context
	f    *os.File
	h    hash.Hash
	buf  []byte
	beat func(int64)
	done int64 // bytes of the file hashed so far, holes included
	last time.Time
	zero int64 // length of the run of zero pieces not yet hashed
}

// progress counts n more bytes hashed and beats when it is time.
func (s *sealer) progress(n int64) {
	s.done += n
	if s.beat != nil && time.Since(s.last) >= beatEvery {
		s.beat(s.done)
		s.last = time.Now()
	}
}

// read reads [off, end) of the file in pieces of at most len(buf),
// calling fn with each.
func (s *sealer) read(off, end int64, fn func(off int64, b []byte)) error {
	for off < end {
		if err := s.ctx.Err(); err != nil {
			return err
		}
		// Every read but the last ends on the piece grid (len(buf) is a
		// multiple of a piece), so no piece is split between two reads.
		k := min(end-off, int64(len(s.buf))-off%pieceSize)
		if _, err := s.f.ReadAt(s.buf[:k], off); err != nil {
			return fmt.Errorf("integrity: %s: %w", s.f.Name(), err)
		}
		fn(off, s.buf[:k])
		off += k
		s.progress(k)
	}
	return nil
}

// bytes hashes [off, end) as it is (version 1).
func (s *sealer) bytes(off, end int64) error {
	return s.read(off, end, func(_ int64, b []byte) { s.h.Write(b) })
}

// pieces hashes [off, end) in pieces (version 2): each data segment,
// widened to whole pieces, is read and its pieces hashed; the holes
// between count as zero pieces without a read.
func (s *sealer) pieces(off, end int64) error {
	at := off // the range is hashed up to here
	err := sparse.Segments(s.f, off, end, func(segOff, n int64) error {
		from := max(at, segOff/pieceSize*pieceSize)
		to := min(end, (segOff+n+pieceSize-1)/pieceSize*pieceSize)
		if from <= at {
			from = at
		} else {
			s.zero += from - at
			s.progress(from - at)
		}
		if to <= from {
			return nil
		}
		at = to
		return s.read(from, to, func(o int64, b []byte) {
			for len(b) > 0 {
				k := min(int64(len(b)), pieceSize-o%pieceSize)
				s.piece(b[:k])
				o, b = o+k, b[k:]
			}
		})
	})
	if err != nil {
		return fmt.Errorf("integrity: %s: %w", s.f.Name(), err)
	}
	if at < end {
		s.zero += end - at
		s.progress(end - at)
	}
	s.endRun()
	return nil
}

// piece hashes one piece: a zero piece extends the run of zero pieces.
func (s *sealer) piece(b []byte) {
	if sparse.IsZero(b) {
		s.zero += int64(len(b))
		return
	}
	s.endRun()
	s.h.Write([]byte{1})
	s.h.Write(b)
}

// endRun hashes the run of zero pieces before, if any.
func (s *sealer) endRun() {
	if s.zero > 0 {
		s.h.Write([]byte{0})
		writeU64(s.h, uint64(s.zero))
		s.zero = 0
	}
}

func writeU64(h hash.Hash, v uint64) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	h.Write(b[:])
}
