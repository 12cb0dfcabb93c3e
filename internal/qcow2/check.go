package qcow2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"

	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/sparse"
)

// Check checks the metadata of the QCOW2 image at path as `qemu-img
// check` does, and returns its result: without a process when the image
// proves clean by Prove, else by running qemu-img check, which decides
// and says what it found. Either way a clean result means the same: every
// cluster the image's tables use is counted exactly once in its
// refcounts, and no entry is malformed.
func Check(ctx context.Context, path string) (*qemu.CheckResult, error) {
	if r, err := Prove(ctx, path); err == nil {
		return r, nil
	} else if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return qemu.Check(ctx, path)
}

// ErrNotProven is wrapped by Prove's error when the image is not one it
// can call clean: something in its metadata is other than a clean image
// of cbtflow's writers has it (not necessarily damage: qemu-img check
// calls a leaked cluster clean). ErrUnsupported is wrapped instead for
// an image this package does not read at all.
var ErrNotProven = errors.New("qcow2: the image is not proven clean")

func notProven(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrNotProven, fmt.Sprintf(format, a...))
}

// maxCheckClusters bounds the clusters of a file Prove counts (a uint16
// each: 8 MiB): 8 TiB of a 2 MiB-cluster image's file, 256 GiB of a
// 64 KiB one. A larger file is left to qemu-img.
const maxCheckClusters = 1 << 22

// Prove reads the metadata of the QCOW2 image at path — its header, L1
// table, L2 tables, refcount table and refcount blocks, never its data —
// and returns what qemu-img check prints of it when it can show the image
// clean, and an error otherwise. It shows it clean only when it finds
// what qemu-img check counts, and stricter:
//
//   - every table and data cluster is on a cluster boundary and starts
//     within the file; every reserved bit of an entry is zero;
//   - no cluster is used twice: the header's, the L1 table's, the
//     refcount table's, each refcount block's, each L2 table's and each
//     data cluster's;
//   - the refcount of every cluster of the file equals its uses
//     counted: no cluster is missing from the refcounts (qemu-img: a
//     corruption) and none is counted unused (qemu-img: a leak, which
//     it calls clean but Prove does not); as qemu-img, it does not read
//     the refcounts of clusters past the file's end;
//   - every L1 and L2 entry of a used cluster says its refcount is 1
//     (QCOW_OFLAG_COPIED), and no other does;
//   - an extended L2 entry allocates no subcluster it also reads as
//     zeros, and none of an unallocated cluster.
//
// Anything else — a feature or layout this package does not read
// (ErrUnsupported), or any of the above not holding (ErrNotProven) — is
// an error: qemu-img check then decides (Check).
func Prove(ctx context.Context, path string) (*qemu.CheckResult, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h, err := readHeader(f)
	if err != nil {
		return nil, err
	}
	// qemu-img check opens the image's backing chain, and fails when it
	// cannot.
	if err := backingOpens(path, f, h, 0); err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	c := &checker{f: f, h: h, cluster: int64(1) << h.clusterBits}
	if h.refcountOrder != 4 {
		return nil, unsupported("%s: refcount order %d", f.Name(), h.refcountOrder)
	}
	nb := (fi.Size() + c.cluster - 1) / c.cluster
	if nb > maxCheckClusters {
		return nil, unsupported("%s: a file of %d clusters", f.Name(), nb)
	}
	c.refs = make([]uint16, nb)
	if err := c.count(ctx); err != nil {
		return nil, err
	}
	end, err := c.compare(ctx)
	if err != nil {
		return nil, err
	}
	return &qemu.CheckResult{Filename: path, Format: "qcow2", ImageEndOffset: end,
		TotalClusters: (int64(h.size) + c.cluster - 1) / c.cluster}, nil
}

// maxBackingChain bounds the backing files Prove follows.
const maxBackingChain = 64

// backingOpens returns nil when the backing chain of the image at path,
// open as f with header h, is one qemu opens: each backing file named
// by a plain path (no protocol, no json:) of a QCOW2 image its format
// extension says is one, whose header this package reads. Else an
// error: qemu-img check decides.
func backingOpens(path string, f *os.File, h header, depth int) error {
	if h.backingOffset == 0 {
		return nil
	}
	if h.backingSize == 0 || h.backingFormat != "qcow2" {
		return unsupported("%s: a backing file of format %q, its name of %d bytes", f.Name(), h.backingFormat, h.backingSize)
	}
	if depth >= maxBackingChain {
		return unsupported("%s: a backing chain of more than %d files", f.Name(), maxBackingChain)
	}
	b := make([]byte, h.backingSize)
	if _, err := f.ReadAt(b, int64(h.backingOffset)); err != nil {
		return fmt.Errorf("qcow2: %s: its backing file's name: %w", f.Name(), err)
	}
	name := string(b)
	if strings.ContainsAny(name, ":\x00") {
		return unsupported("%s: backing file %q", f.Name(), name)
	}
	if !strings.HasPrefix(name, "/") {
		// As qemu's path_combine: beside the image, as its path names it.
		name = path[:strings.LastIndex(path, "/")+1] + name
	}
	// Not blocked by a FIFO a crafted name may name: only a regular
	// file is read.
	bf, err := os.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return notProven("%s: backing file: %v", f.Name(), err)
	}
	defer bf.Close()
	if fi, err := bf.Stat(); err != nil || !fi.Mode().IsRegular() {
		return unsupported("%s: backing file %s is not a regular file", f.Name(), name)
	}
	bh, err := readHeader(bf)
	if err != nil {
		return err
	}
	return backingOpens(name, bf, bh, depth+1)
}

// checker counts the uses of every cluster of an image's file.
type checker struct {
	f       *os.File
	h       header
	cluster int64
	refs    []uint16 // uses of each cluster of the file, counted
	blocks  []block  // the refcount table's blocks
	buf     []byte
}

// block is a refcount block: the index of its refcount table entry, and
// its offset in the file.
type block struct{ index, offset int64 }

// use counts a use of every cluster of [off, off+n).
func (c *checker) use(what string, off, n int64) error {
	if off%c.cluster != 0 {
		return notProven("%s: %s at %d, not on a cluster", c.f.Name(), what, off)
	}
	if off < 0 { // a refcount table entry of 2^63 or more
		return notProven("%s: %s at %#x, past the file's end", c.f.Name(), what, uint64(off))
	}
	for k := off / c.cluster; k < (off+n+c.cluster-1)/c.cluster; k++ {
		if k >= int64(len(c.refs)) {
			return notProven("%s: %s at %d, past the file's end (%d clusters)", c.f.Name(), what, off, len(c.refs))
		}
		if c.refs[k] != 0 {
			return notProven("%s: %s at %d uses cluster %d, used before", c.f.Name(), what, off, k)
		}
		c.refs[k] = 1
	}
	return nil
}

// data calls fn with the bytes of [off, off+n) the file stores, as
// dataPieces does.
func (c *checker) data(off, n int64, fn func(rel int64, b []byte) error) error {
	if c.buf == nil {
		c.buf = make([]byte, dataPiece)
	}
	return dataPieces(c.f, c.buf, off, n, fn)
}

// Entry bits beside the offset: qemu's L1E_OFFSET_MASK, L2E_OFFSET_MASK
// and the flags of QCOW2's specification.
const (
	flagCopied = 1 << 63
	l1Reserved = ^uint64(offsetMask | flagCopied)
	l2Reserved = ^uint64(offsetMask|flagCopied|flagCompressed) &^ flagZero
)

// count counts the uses of the file's clusters: the header, the L1
// table, every L2 table and data cluster it maps, the refcount table and
// its blocks.
func (c *checker) count(ctx context.Context) error {
	h, name := c.h, c.f.Name()
	// qemu-img check validates the snapshot table's offset even without
	// a snapshot: on a cluster, and within an int64.
	if h.snapshotOffset%uint64(c.cluster) != 0 || h.snapshotOffset > maxSize {
		return notProven("%s: snapshot table at %d", name, h.snapshotOffset)
	}
	if h.backingOffset != 0 && h.backingOffset+uint64(h.backingSize) > uint64(c.cluster) {
		return notProven("%s: backing file name at %d past the header's cluster", name, h.backingOffset)
	}
	if err := c.use("the header", 0, c.cluster); err != nil {
		return err
	}
	if h.l1Size > 0 {
		if err := c.use("the L1 table", int64(h.l1Offset), int64(h.l1Size)*8); err != nil {
			return err
		}
	}
	if h.rtClusters == 0 || int64(h.rtClusters) > int64(len(c.refs)) {
		return notProven("%s: a refcount table of %d clusters", name, h.rtClusters)
	}
	rtSize := int64(h.rtClusters) * c.cluster
	if err := c.use("the refcount table", int64(h.rtOffset), rtSize); err != nil {
		return err
	}
	err := c.data(int64(h.rtOffset), rtSize, func(rel int64, b []byte) error {
		for i := int64(0); i < int64(len(b)); i += 8 {
			e := binary.BigEndian.Uint64(b[i:])
			if e == 0 {
				continue
			}
			index := (rel + i) / 8
			if e%uint64(c.cluster) != 0 {
				return notProven("%s: refcount table entry %d is %#x", name, index, e)
			}
			if err := c.use(fmt.Sprintf("refcount block %d", index), int64(e), c.cluster); err != nil {
				return err
			}
			c.blocks = append(c.blocks, block{index, int64(e)})
		}
		return nil
	})
	if err != nil {
		return err
	}

	l1, err := readL1(c.f, h)
	if err != nil {
		return err
	}
	entryBytes := int64(8)
	if h.extendedL2 {
		entryBytes = 16
	}
	perL2 := c.cluster / entryBytes
	for i := int64(0); i < int64(h.l1Size); i++ {
		e := binary.BigEndian.Uint64(l1[i*8:])
		if e == 0 {
			continue
		}
		l2Offset := int64(e & offsetMask)
		if e&l1Reserved != 0 || l2Offset == 0 || e&flagCopied == 0 {
			return notProven("%s: L1 entry %d is %#x", name, i, e)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := c.use(fmt.Sprintf("L2 table %d", i), l2Offset, c.cluster); err != nil {
			return err
		}
		err := c.data(l2Offset, c.cluster, func(rel int64, b []byte) error {
			for at := int64(0); at < int64(len(b)); at += 4096 {
				// A page of empty entries at once: most of a table's are.
				page := b[at:min(int64(len(b)), at+4096)]
				if sparse.IsZero(page) {
					continue
				}
				for j := int64(0); j < int64(len(page)); j += entryBytes {
					if err := c.entry(page[j:j+entryBytes], i*perL2+(rel+at+j)/entryBytes); err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// entry counts the use of one L2 entry's data cluster, the n-th cluster
// of the disk.
func (c *checker) entry(b []byte, n int64) error {
	name, at := c.f.Name(), n*c.cluster
	if sparse.IsZero(b) {
		return nil
	}
	if at >= int64(c.h.size) {
		return notProven("%s: L2 entry %#x for cluster %d, past the disk's end", name, binary.BigEndian.Uint64(b), n)
	}
	e, err := decodeL2(name, c.h, b, at, c.cluster)
	switch {
	case err != nil:
		return err
	case e.raw&l2Reserved != 0:
		return notProven("%s: L2 entry %#x at disk offset %d", name, e.raw, at)
	case (e.host != 0) != (e.raw&flagCopied != 0):
		return notProven("%s: L2 entry %#x at disk offset %d: its copied flag", name, e.raw, at)
	case e.host == 0:
		return nil
	}
	return c.use(fmt.Sprintf("the data of disk offset %d", at), e.host, c.cluster)
}

// compare reads the refcount blocks and compares each cluster's
// refcount with the uses counted; it returns the end of the last cluster
// used (qemu-img check's image-end-offset). A cluster without a refcount
// block has refcount 0. Refcounts of clusters past the file's end are
// not read: qemu-img check does not look at them either (a cluster there
// that is used is refused by use), and reading them would read the rest
// of a refcount block, which qemu writes whole (2 MiB).
func (c *checker) compare(ctx context.Context) (int64, error) {
	perBlock := c.cluster / 2 // 16-bit refcounts
	stored := make([]uint16, len(c.refs))
	for _, bl := range c.blocks {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		first := bl.index * perBlock
		n := min(perBlock, int64(len(stored))-first) // refcounts of the file's clusters
		if n <= 0 {
			continue
		}
		err := c.data(bl.offset, min(c.cluster, (n*2+4095)&^4095), func(rel int64, b []byte) error {
			for i := int64(0); i < int64(len(b)) && (rel+i)/2 < n; i += 2 {
				stored[first+(rel+i)/2] = binary.BigEndian.Uint16(b[i:])
			}
			return nil
		})
		if err != nil {
			return 0, err
		}
	}
	name := c.f.Name()
	end := int64(0)
	for k, used := range c.refs {
		if stored[k] != used {
			return 0, notProven("%s: cluster %d has refcount %d, used %d times", name, k, stored[k], used)
		}
		if used != 0 {
			end = int64(k+1) * c.cluster
		}
	}
	return end, nil
}
