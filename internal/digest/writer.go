package digest

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
)

// Writer writes a digest file while an image is copied. Records may be
// added in any order (requests complete out of order); Commit writes
// those below a resume point, sorted, with a mark, and syncs the file.
// Its methods are not safe for concurrent use: the copier calls them from
// its one event loop.
type Writer struct {
	path    string
	alg     Algorithm // the header's
	f       *os.File
	pending []Record
	buf     []byte
	totals  Totals
	last    int64 // end of the last record written
	err     error
}

// ErrCannotResume is wrapped by Resume when the digest file does not hold
// every record below the resume point (missing, damaged, another image's,
// or never committed that far): the copy must start afresh.
var ErrCannotResume = errors.New("digest: the digest file cannot be resumed")

// Create creates (or truncates) the digest file at path and writes its
// header, durably.
func Create(path string, h Header) (*Writer, error) {
	hdr, err := encodeHeader(h)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("digest: %w", err)
	}
	w := &Writer{path: path, alg: h.algorithm(), f: f}
	if _, err := f.Write(hdr); err != nil {
		f.Close()
		return nil, fmt.Errorf("digest: %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, fmt.Errorf("digest: %s: %w", path, err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		f.Close()
		return nil, err
	}
	return w, nil
}

// Resume opens the digest file of an interrupted copy that continues from
// resumeFrom (the copier's resume point): it keeps the records below it,
// drops everything after them (records of data not known durable, a
// record cut short by a crash, an end record) and appends a mark. The
// file must have been committed at least as far as resumeFrom, with the
// header h; otherwise the error wraps ErrCannotResume. The file keeps its
// algorithm: an h without one takes the file's (a file an older release
// began with SHA-256 goes on with SHA-256), an h with another one does
// not match.
func Resume(path string, h Header, resumeFrom int64) (*Writer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCannotResume, err)
	}
	fh, n, err := sameHeader(b, h)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCannotResume, path, err)
	}
	sc := scanner{b: b, pos: n, block: int64(h.blockSize())}
	keep, covered := n, false
	var totals Totals
	var last int64
	for {
		it, ok, err := sc.next()
		if err != nil || !ok {
			break // a record cut short ends the file
		}
		switch it.kind {
		case KindData, KindZero:
			if it.rec.End() <= resumeFrom {
				keep = it.end
				totals.add(it.rec)
				last = it.rec.End()
			}
		case kindMark:
			if it.mark >= resumeFrom {
				covered = true
			} else if it.end > keep {
				keep = it.end
			}
		}
	}
	if !covered && resumeFrom > 0 {
		return nil, fmt.Errorf("%w: %s was not committed up to offset %d", ErrCannotResume, path, resumeFrom)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCannotResume, err)
	}
	w := &Writer{path: path, alg: fh.Algorithm, f: f, totals: totals, last: last}
	if err := f.Truncate(int64(keep)); err != nil {
		f.Close()
		return nil, fmt.Errorf("digest: %s: %w", path, err)
	}
	if _, err := f.Seek(int64(keep), io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("digest: %s: %w", path, err)
	}
	w.buf = appendMark(w.buf[:0], resumeFrom)
	if err := w.flush(); err != nil {
		f.Close()
		return nil, err
	}
	return w, nil
}

// Path returns the file's path.
func (w *Writer) Path() string { return w.path }

// Algorithm returns the algorithm of the file's data records: the records
// added must be made with it (Data).
func (w *Writer) Algorithm() Algorithm { return w.alg }

// Add records r, to be written by the Commit that passes its end.
func (w *Writer) Add(r Record) { w.pending = append(w.pending, r) }

// Commit writes every added record that ends at or below upTo, in offset
// order (adjacent zero records joined), then a mark of upTo, and syncs
// the file: when it returns nil, a copy resumed from upTo keeps them. The
// caller guarantees that every record below upTo was added.
func (w *Writer) Commit(upTo int64) error {
	if w.err != nil {
		return w.err
	}
	slices.SortFunc(w.pending, func(a, b Record) int { return cmp.Compare(a.Offset, b.Offset) })
	i := 0
	for i < len(w.pending) && w.pending[i].End() <= upTo {
		i++
	}
	w.buf = w.buf[:0]
	var zero *Record // a zero record not yet encoded, to join the next
	emit := func(r Record) {
		w.buf = appendRecord(w.buf, r)
		w.totals.add(r)
	}
	for _, r := range w.pending[:i] {
		if r.Offset < w.last {
			w.err = fmt.Errorf("digest: %s: record at offset %d overlaps the one before it (ending at %d)", w.path, r.Offset, w.last)
			return w.err
		}
		w.last = r.End()
		if r.Kind == KindZero {
			if zero != nil && zero.End() == r.Offset {
				zero.Length += r.Length
				continue
			}
			if zero != nil {
				emit(*zero)
			}
			z := r
			zero = &z
			continue
		}
		if zero != nil {
			emit(*zero)
			zero = nil
		}
		emit(r)
	}
	if zero != nil {
		emit(*zero)
	}
	w.pending = append(w.pending[:0], w.pending[i:]...)
	w.buf = appendMark(w.buf, upTo)
	return w.flush()
}

func (w *Writer) flush() error {
	if _, err := w.f.Write(w.buf); err != nil {
		w.err = fmt.Errorf("digest: %s: %w", w.path, err)
		return w.err
	}
	if err := w.f.Sync(); err != nil {
		w.err = fmt.Errorf("digest: %s: %w", w.path, err)
		return w.err
	}
	return nil
}

// Finish writes the records still pending (the copy ended with its final
// FLUSH, so all of them are durable) and the end record, syncs and closes
// the file and syncs its folder. It returns the file's size and SHA-256.
func (w *Writer) Finish() (int64, string, error) {
	defer w.Close()
	end := w.last
	for _, r := range w.pending {
		end = max(end, r.End())
	}
	if err := w.Commit(end); err != nil {
		return 0, "", err
	}
	w.buf = appendEnd(w.buf[:0], w.totals)
	if err := w.flush(); err != nil {
		return 0, "", err
	}
	if err := w.f.Close(); err != nil {
		w.f = nil
		return 0, "", fmt.Errorf("digest: %s: %w", w.path, err)
	}
	w.f = nil
	if err := syncDir(filepath.Dir(w.path)); err != nil {
		return 0, "", err
	}
	return HashFile(w.path)
}

// Close closes the file without finishing it (an interrupted copy): what
// was committed stays for Resume.
func (w *Writer) Close() error {
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	return err
}

// HashFile returns the size and hex SHA-256 of a digest file (the
// catalog's record of the file itself: SHA-256 whatever the algorithm of
// its records).
func HashFile(path string) (int64, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return 0, "", fmt.Errorf("digest: %s: %w", path, err)
	}
	return n, hex.EncodeToString(h.Sum(nil)), nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("digest: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("digest: sync %s: %w", dir, err)
	}
	return nil
}
