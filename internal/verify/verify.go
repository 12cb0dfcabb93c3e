// Package verify proves a restore point good: every image of its chain is
// the file the catalog recorded and a sound QCOW2, and every block the
// backups recorded in their digest files (internal/digest) still reads,
// through the chain, as it was written.
//
// Chain checks, image by image: qemu-img check; size, SHA-256 and backing
// link against the catalog (internal/integrity, always with a full
// SHA-256); the digest file present, with the size and SHA-256 the
// catalog recorded, well formed, complete and naming its image. Only when
// every file is sound is the point re-read: the top image is served
// read-only by qemu-nbd, and each recorded range is read through the
// chain, as a restore reads it, and compared with its record.
//
// Which record a range is checked against: the newest image that wrote a
// range decides what the point reads there, so a range is checked against
// the newest record covering it. A data record (a digest of up to 1 MiB,
// made with its digest file's algorithm: BLAKE3, or SHA-256 for a file an
// older release wrote) that a newer image overwrote in part cannot be
// checked (its digest is of the whole range): it is skipped and counted
// (Result.SkippedRecords); a zero record is checked on the parts no newer
// record covers. An image
// without a digest file (made before digests existed) may have written
// anywhere, so the records of the images it builds on cannot be checked
// either; so too below an image a prune merged removed points into
// (Image.DigestPartial), whose digest file describes only its own writes.
//
// The package knows nothing of Temporal or of the catalog's storage: the
// caller hands over the chain as recorded.
package verify

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/nbd"
	"github.com/cbtflow/cbtflow/internal/qemu"
)

// Image is one image of a chain as the catalog recorded it.
type Image struct {
	Path   string // absolute
	Size   int64
	SHA256 string // hex
	// Backing is the absolute path of the image this one builds on; ""
	// for a full image.
	Backing string
	// DigestSHA256 and DigestSize are those of the image's digest file
	// (Path + ".digests"); "" when none was recorded (an image made
	// before digests existed).
	DigestSHA256 string
	DigestSize   int64
	// DigestPartial says the image holds data its digest file does not
	// describe (a prune merged removed points' data into it).
	DigestPartial bool
}

// Problem is one thing found wrong.
type Problem struct {
	// Image is the image at fault (its path); File the file found wrong:
	// the image, or its digest file.
	Image string
	File  string
	// Offset and Length are the disk range of a bad block; Offset is -1
	// for a problem of the whole file.
	Offset int64
	Length int64
	Reason string

	index int // the image's position in the chain, oldest first
}

func (p Problem) String() string {
	if p.Offset < 0 {
		return fmt.Sprintf("%s: %s", p.File, p.Reason)
	}
	return fmt.Sprintf("%s: offset %d (%d bytes): %s", p.File, p.Offset, p.Length, p.Reason)
}

// Result is what a verification found.
type Result struct {
	// Problems are sorted by image, oldest first, and offset; the first
	// names the first bad image and offset. At most Options.MaxProblems.
	Problems []Problem
	// BlocksRead says the point's blocks were re-read; false when a
	// file's problem made reading pointless.
	BlocksRead bool
	// CheckedRecords and CheckedBytes count the ranges compared with
	// their records.
	CheckedRecords int64
	CheckedBytes   int64
	// SkippedRecords and SkippedBytes count records that could not be
	// checked: overwritten in part by a newer image, or below an image
	// without a (complete) digest file.
	SkippedRecords int64
	SkippedBytes   int64
	// Undigested lists the images without a digest file recorded.
	Undigested []string
}

// OK reports whether nothing was found wrong.
func (r *Result) OK() bool { return len(r.Problems) == 0 }

// First returns the first problem (the first bad image and offset), or
// nil.
func (r *Result) First() *Problem {
	if len(r.Problems) == 0 {
		return nil
	}
	return &r.Problems[0]
}

// Err returns an error naming the first problem and how many there are,
// or nil.
func (r *Result) Err() error {
	p := r.First()
	if p == nil {
		return nil
	}
	if len(r.Problems) > 1 {
		return fmt.Errorf("verify: %s (and %d more problems)", p, len(r.Problems)-1)
	}
	return fmt.Errorf("verify: %s", p)
}

// Options tune a verification.
type Options struct {
	// MaxProblems stops the re-read after this many bad blocks; default 20.
	MaxProblems int
	// Progress, when set, is called about every second while images are
	// hashed and blocks read: phase "hashing" or "reading", with bytes
	// done and to do (an activity's heartbeat).
	Progress func(phase string, done, total int64)
	// ProgressEvery is how often Progress is called while blocks are
	// read; default a second. A fault test that holds a verification
	// half way asks for more (its small disks are read in a moment).
	ProgressEvery time.Duration
	// Dir is the private folder of the qemu-nbd socket; empty: a fresh
	// one under $TMPDIR.
	Dir string
}

// Chain verifies a restore point's chain, given oldest (the full image)
// first and the restore point's own image last. Problems found are in
// the result; an error means the verification itself could not run (a
// canceled ctx, qemu-img or qemu-nbd missing, an I/O error on the reader's
// side) and says nothing about the point.
func Chain(ctx context.Context, chain []Image, o Options) (*Result, error) {
	if len(chain) == 0 {
		return nil, errors.New("verify: empty chain")
	}
	if o.MaxProblems <= 0 {
		o.MaxProblems = 20
	}
	if o.ProgressEvery <= 0 {
		o.ProgressEvery = time.Second
	}
	v := &verifier{chain: chain, o: o, res: &Result{}, files: make([]*digest.File, len(chain))}
	for i := range chain {
		if err := v.checkImage(ctx, i); err != nil {
			return nil, err
		}
	}
	if len(v.res.Problems) == 0 {
		v.res.BlocksRead = true
		if err := v.readBlocks(ctx); err != nil {
			return nil, err
		}
	}
	slices.SortStableFunc(v.res.Problems, func(a, b Problem) int {
		if c := cmp.Compare(a.index, b.index); c != 0 {
			return c
		}
		return cmp.Compare(a.Offset, b.Offset)
	})
	return v.res, nil
}

type verifier struct {
	chain []Image
	o     Options
	res   *Result
	files []*digest.File // nil for an image without a (sound) digest file
}

func (v *verifier) problem(i int, file string, off, n int64, format string, args ...any) {
	v.res.Problems = append(v.res.Problems, Problem{Image: v.chain[i].Path, File: file, Offset: off, Length: n,
		Reason: fmt.Sprintf(format, args...), index: i})
}

// checkImage checks one image's file and its digest file.
//
// A sealed image (internal/integrity) is proven with its digest file: when
// that file is missing or not the one recorded, the problem named is the
// digest file's, and the image's seal is not checked (it could only fail
// for the same reason).
func (v *verifier) checkImage(ctx context.Context, i int) error {
	im := v.chain[i]
	if im.DigestSHA256 == "" {
		if err := v.checkFile(ctx, i); err != nil {
			return err
		}
		v.res.Undigested = append(v.res.Undigested, im.Path)
		return nil
	}
	path := digest.PathOf(im.Path)
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("verify: %w", err)
	}
	missing := errors.Is(err, os.ErrNotExist)
	sum := sha256.Sum256(b)
	got := hex.EncodeToString(sum[:])
	recorded := !missing && int64(len(b)) == im.DigestSize && got == im.DigestSHA256
	if recorded || !integrity.IsSeal(im.SHA256) {
		if err := v.checkFile(ctx, i); err != nil {
			return err
		}
	}
	if missing {
		v.problem(i, path, -1, 0, "digest file missing (the catalog recorded one of %d bytes)", im.DigestSize)
		return nil
	}
	if !recorded {
		v.problem(i, path, -1, 0, "digest file is %d bytes with SHA-256 %s, the catalog recorded %d bytes with SHA-256 %s",
			len(b), got, im.DigestSize, im.DigestSHA256)
		return nil
	}
	f, err := digest.Parse(b)
	switch {
	case err != nil:
		v.problem(i, path, -1, 0, "%v", err)
	case !f.Complete:
		v.problem(i, path, -1, 0, "digest file has no end record")
	case f.Header.Image != filepath.Base(im.Path):
		v.problem(i, path, -1, 0, "digest file is the one of image %s", f.Header.Image)
	default:
		v.files[i] = f
	}
	return nil
}

// checkFile checks the image file: size, backing link and SHA-256 against
// the catalog, then qemu-img check. One problem per file is enough.
func (v *verifier) checkFile(ctx context.Context, i int) error {
	im := v.chain[i]
	var beat func()
	if v.o.Progress != nil {
		beat = func() { v.o.Progress("hashing", 0, im.Size) }
	}
	_, err := integrity.Check(ctx, integrity.Image{Path: im.Path, Size: im.Size, SHA256: im.SHA256, Backing: im.Backing}, beat)
	var d *integrity.Damage
	switch {
	case errors.As(err, &d):
		v.problem(i, im.Path, -1, 0, "%s", d.Reason)
		return nil
	case errors.Is(err, integrity.ErrFolderMissing):
		v.problem(i, im.Path, -1, 0, "missing, and so is its folder")
		return nil
	case err != nil:
		return fmt.Errorf("verify: %s: %w", im.Path, err)
	}
	check, err := qemu.Check(ctx, im.Path)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		v.problem(i, im.Path, -1, 0, "qemu-img cannot check it: %v", err)
		return nil
	}
	if !check.Clean() {
		v.problem(i, im.Path, -1, 0, "qemu-img check finds %d corruptions and %d check errors", check.Corruptions, check.CheckErrors)
	}
	return nil
}

// check is one range to read and what it must hold.
type check struct {
	image int
	rec   digest.Record // a data record whole, or a part of a zero record
}

// plan lists the ranges to check, in offset order: each image's records,
// newest image first, minus what newer images cover.
func (v *verifier) plan() []check {
	var out []check
	var covered []span // merged, sorted: what newer images wrote
	for i := len(v.chain) - 1; i >= 0; i-- {
		f := v.files[i]
		if f == nil {
			// No digest: this image may have written anywhere.
			v.skipBelow(i)
			break
		}
		var mine []span
		for _, r := range f.Records {
			mine = append(mine, span{r.Offset, r.End()})
			free := uncovered(covered, span{r.Offset, r.End()})
			switch {
			case len(free) == 0:
				// Overwritten: the newer record is checked instead.
			case r.Kind == digest.KindZero:
				for _, s := range free {
					out = append(out, check{image: i, rec: digest.Zero(s.start, s.end-s.start)})
				}
			case len(free) == 1 && free[0] == (span{r.Offset, r.End()}):
				out = append(out, check{image: i, rec: r})
			default:
				v.res.SkippedRecords++
				v.res.SkippedBytes += r.Length
			}
		}
		covered = merge(covered, mine)
		if v.chain[i].DigestPartial {
			v.skipBelow(i)
			break
		}
	}
	slices.SortFunc(out, func(a, b check) int { return cmp.Compare(a.rec.Offset, b.rec.Offset) })
	return out
}

// skipBelow counts the records of the images older than image i as
// skipped.
func (v *verifier) skipBelow(i int) {
	for j := i - 1; j >= 0; j-- {
		if f := v.files[j]; f != nil {
			v.res.SkippedRecords += int64(len(f.Records))
			v.res.SkippedBytes += f.Totals.DataBytes + f.Totals.ZeroBytes
		}
	}
}

// readBlocks serves the top image read-only and compares every planned
// range with its record.
func (v *verifier) readBlocks(ctx context.Context) error {
	checks := v.plan()
	if len(checks) == 0 {
		return nil
	}
	var total int64
	for _, c := range checks {
		total += c.rec.Length
	}
	top := v.chain[len(v.chain)-1].Path
	srv, err := qemu.StartQemuNBD(ctx, qemu.QemuNBDOptions{Image: top, Format: "qcow2", ReadOnly: true, Dir: v.o.Dir, Shared: 1})
	if err != nil {
		return fmt.Errorf("verify: serving %s: %w", top, err)
	}
	defer srv.Close()
	h, err := nbd.Connect(srv.URI())
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	defer h.Close()
	buf := make([]byte, digest.BlockSize)
	bad := 0
	var done int64
	last := time.Now()
	for _, c := range checks {
		if err := ctx.Err(); err != nil {
			return err
		}
		im := v.chain[c.image]
		if c.rec.Kind == digest.KindData {
			b := buf[:c.rec.Length]
			if err := h.Pread(b, c.rec.Offset); err != nil {
				return fmt.Errorf("verify: reading %s at offset %d: %w", top, c.rec.Offset, err)
			}
			// The record is checked with its own file's algorithm.
			alg := v.files[c.image].Header.Algorithm
			if got := alg.Sum(b); got != c.rec.Sum {
				v.problem(c.image, im.Path, c.rec.Offset, c.rec.Length,
					"reads with %v %x through the chain, the backup recorded %x", alg, got, c.rec.Sum)
				bad++
			}
		} else {
			for off := c.rec.Offset; off < c.rec.End(); {
				n := min(c.rec.End()-off, int64(len(buf)))
				b := buf[:n]
				if err := h.Pread(b, off); err != nil {
					return fmt.Errorf("verify: reading %s at offset %d: %w", top, off, err)
				}
				if i := firstNonZero(b); i >= 0 {
					v.problem(c.image, im.Path, off+int64(i), n-int64(i),
						"reads a non-zero byte through the chain where the backup wrote zeros")
					bad++
					break
				}
				off += n
			}
		}
		v.res.CheckedRecords++
		v.res.CheckedBytes += c.rec.Length
		done += c.rec.Length
		if bad >= v.o.MaxProblems {
			break
		}
		if v.o.Progress != nil && time.Since(last) >= v.o.ProgressEvery {
			v.o.Progress("reading", done, total)
			last = time.Now()
		}
	}
	return nil
}

// zeros is a block of zeros, made on first use: every process that links
// this package (the starter too) would otherwise zero 1 MiB at its start.
var zeros = sync.OnceValue(func() []byte { return make([]byte, digest.BlockSize) })

func firstNonZero(b []byte) int {
	if bytes.Equal(b, zeros()[:len(b)]) {
		return -1
	}
	for i, c := range b {
		if c != 0 {
			return i
		}
	}
	return -1
}

// span is a half-open disk range.
type span struct{ start, end int64 }

// uncovered returns the parts of s that no span of covered (sorted,
// merged) overlaps.
func uncovered(covered []span, s span) []span {
	i, _ := slices.BinarySearchFunc(covered, s.start, func(c span, off int64) int {
		return cmp.Compare(c.end, off+1) // the first span ending after s.start
	})
	var out []span
	pos := s.start
	for ; i < len(covered) && covered[i].start < s.end; i++ {
		if covered[i].start > pos {
			out = append(out, span{pos, covered[i].start})
		}
		pos = max(pos, covered[i].end)
	}
	if pos < s.end {
		out = append(out, span{pos, s.end})
	}
	return out
}

// merge joins two sorted span lists into one sorted list of merged spans.
func merge(a, b []span) []span {
	all := append(append(make([]span, 0, len(a)+len(b)), a...), b...)
	slices.SortFunc(all, func(x, y span) int { return cmp.Compare(x.start, y.start) })
	var out []span
	for _, s := range all {
		if n := len(out); n > 0 && s.start <= out[n-1].end {
			out[n-1].end = max(out[n-1].end, s.end)
			continue
		}
		out = append(out, s)
	}
	return out
}
