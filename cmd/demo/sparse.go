package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"syscall"
)

// lseek(2) whence values for sparse files (Linux, glibc's SEEK_DATA and
// SEEK_HOLE); package syscall does not name them.
const (
	seekData = 3
	seekHole = 4
)

// extent is a byte range [Off, Off+Len).
type extent struct{ Off, Len int64 }

func (e extent) end() int64 { return e.Off + e.Len }

// dataExtents lists the ranges of f that the file system reports as
// allocated, with SEEK_DATA and SEEK_HOLE. Everything outside them is a
// hole, which reads as zeros. A file system without sparse support
// reports the whole file as data, which is still correct, just slower to
// compare.
func dataExtents(f *os.File, size int64) ([]extent, error) {
	var out []extent
	for off := int64(0); off < size; {
		data, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break // no data after off
		}
		if err != nil {
			return nil, fmt.Errorf("SEEK_DATA %s at %d: %w", f.Name(), off, err)
		}
		hole, err := f.Seek(data, seekHole)
		if err != nil {
			return nil, fmt.Errorf("SEEK_HOLE %s at %d: %w", f.Name(), data, err)
		}
		hole = min(hole, size)
		if hole > data {
			out = append(out, extent{data, hole - data})
		}
		off = hole
	}
	return out, nil
}

// union merges two sorted extent lists into sorted, disjoint extents that
// cover both.
func union(a, b []extent) []extent {
	all := append(slices.Clone(a), b...)
	slices.SortFunc(all, func(x, y extent) int {
		switch {
		case x.Off < y.Off:
			return -1
		case x.Off > y.Off:
			return 1
		}
		return 0
	})
	var out []extent
	for _, e := range all {
		if e.Len <= 0 {
			continue
		}
		if n := len(out); n > 0 && e.Off <= out[n-1].end() {
			if e.end() > out[n-1].end() {
				out[n-1].Len = e.end() - out[n-1].Off
			}
			continue
		}
		out = append(out, e)
	}
	return out
}

// compareResult says whether two images are equal and, if not, where
// they first differ.
type compareResult struct {
	Equal     bool
	SizeA     int64
	SizeB     int64
	FirstDiff int64 // first differing offset; -1 when equal or sizes differ
	Compared  int64 // bytes actually read from each file
}

// compareSparse compares two raw images byte for byte without reading
// their common holes: it reads both files over the union of their
// allocated ranges (a hole on one side reads as zeros there and is
// compared like any data), and a range that is a hole in both reads as
// zeros in both by definition. Files of different sizes are unequal.
func compareSparse(pathA, pathB string) (compareResult, error) {
	res := compareResult{FirstDiff: -1}
	fa, err := os.Open(pathA)
	if err != nil {
		return res, err
	}
	defer fa.Close()
	fb, err := os.Open(pathB)
	if err != nil {
		return res, err
	}
	defer fb.Close()
	sa, err := fa.Stat()
	if err != nil {
		return res, err
	}
	sb, err := fb.Stat()
	if err != nil {
		return res, err
	}
	res.SizeA, res.SizeB = sa.Size(), sb.Size()
	if res.SizeA != res.SizeB {
		return res, nil
	}
	ea, err := dataExtents(fa, res.SizeA)
	if err != nil {
		return res, err
	}
	eb, err := dataExtents(fb, res.SizeB)
	if err != nil {
		return res, err
	}
	const chunk = 1 << 20
	bufA, bufB := make([]byte, chunk), make([]byte, chunk)
	for _, e := range union(ea, eb) {
		for off := e.Off; off < e.end(); off += chunk {
			n := int(min(chunk, e.end()-off))
			if _, err := fa.ReadAt(bufA[:n], off); err != nil && !errors.Is(err, io.EOF) {
				return res, err
			}
			if _, err := fb.ReadAt(bufB[:n], off); err != nil && !errors.Is(err, io.EOF) {
				return res, err
			}
			res.Compared += int64(n)
			if !bytes.Equal(bufA[:n], bufB[:n]) {
				for i := range n {
					if bufA[i] != bufB[i] {
						res.FirstDiff = off + int64(i)
						break
					}
				}
				return res, nil
			}
		}
	}
	res.Equal = true
	return res, nil
}
