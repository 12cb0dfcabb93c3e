// Package restore writes a disk as it was at a restore point: the whole
// QCOW2 chain flattened into a raw (sparse) or QCOW2 file. Before it reads
// a byte it checks every image of the chain against the size and SHA-256
// recorded at commit, and that the chain on disk is the chain the catalog
// recorded, so a damaged or swapped file is refused by name instead of
// returning wrong data. A file appears only when complete: it is
// written to a temporary file in the same folder and renamed. A block
// device (Options.Device) is written in place. Any other target (a
// directory, a FIFO, a character device …) is refused before a byte is
// converted (see CheckTarget).
package restore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/repository"
)

// ErrDamaged is wrapped by errors about a chain image that does not match
// the catalog.
var ErrDamaged = errors.New("restore point damaged")

// Options describe one restore.
type Options struct {
	BackupID string
	DiskKey  int32
	// Repository is the root the catalog's relative image paths are taken
	// from (CBTFLOW_REPOSITORY).
	Repository string
	// To is the output: a regular file (written to a temporary file in
	// its folder and renamed when complete), or with Device a block
	// device written in place. Anything else is refused before a byte is
	// converted (see CheckTarget).
	To     string
	Format string // "raw" (default) or "qcow2"; a device takes raw only
	// Force replaces an existing regular file at To (atomically, by
	// rename); without it an existing file is refused.
	Force bool
	// Device writes the block device To in place: every byte up to the
	// disk's size, zeros included. It must be at least as large as the
	// disk and not in use; a failed restore leaves it partly written.
	Device bool
	// Progress, when set, is told where the restore stands: the chain's
	// verification (StageVerifying), then the writing (StageWriting). It
	// is called on the restore's goroutine, so a call that blocks holds
	// the restore (qemu-img may finish its writes meanwhile; the target
	// appears only after the call returns).
	Progress func(Progress)
}

// Result describes a finished restore.
type Result struct {
	Chain []string // images read, top first
	Bytes int64    // virtual size of the disk
}

// Disk restores one disk of a restore point. A restore takes no lock: a
// prune of the VM may replace an image of the chain or remove a point
// while the restore verifies it. Such a change shows as damage; when the
// catalog's chain changed meanwhile, the restore starts again once, on the
// chain as it is now.
func Disk(ctx context.Context, cat *catalog.Catalog, o Options) (*Result, error) {
	return againOnChangedChain(ctx, cat, o, disk)
}

// againOnChangedChain runs fn, and once more when fn found damage and
// the catalog's chain of the disk changed meanwhile (a prune replaced an
// image or removed the point; removed, the restore point is not found).
func againOnChangedChain(ctx context.Context, cat *catalog.Catalog, o Options,
	fn func(context.Context, *catalog.Catalog, Options) (*Result, error)) (*Result, error) {
	before, _ := cat.Chain(ctx, o.BackupID, o.DiskKey)
	res, err := fn(ctx, cat, o)
	if !errors.Is(err, ErrDamaged) || before == nil {
		return res, err
	}
	now, cerr := cat.Chain(ctx, o.BackupID, o.DiskKey)
	if errors.Is(cerr, catalog.ErrNotFound) {
		return nil, notFound("restore: restore point %s was removed (by a prune) while it was being restored", o.BackupID)
	}
	if cerr != nil || sameChain(before, now) {
		return res, err
	}
	return fn(ctx, cat, o)
}

// sameChain reports whether two reads of a chain recorded the same images.
func sameChain(a, b []catalog.ChainLink) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].BackupID != b[i].BackupID || a[i].SHA256 != b[i].SHA256 || a[i].SizeBytes != b[i].SizeBytes ||
			(a[i].Pending == nil) != (b[i].Pending == nil) {
			return false
		}
	}
	return true
}

func disk(ctx context.Context, cat *catalog.Catalog, o Options) (*Result, error) {
	if o.Format == "" {
		o.Format = "raw"
	}
	if o.Format != "raw" && o.Format != "qcow2" {
		return nil, refused("restore: format %q is not raw or qcow2", o.Format)
	}
	if o.To == "" {
		return nil, refused("restore: no output file given")
	}
	res, err := verifiedChain(ctx, cat, o)
	if err != nil {
		return nil, err
	}
	// The target is checked again here, right before the first byte is
	// converted: the caller's check may be minutes old after a long
	// verification.
	if err := writeTarget(ctx, res.Chain[0], res.Bytes, o); err != nil {
		return nil, err
	}
	return res, nil
}

// VerifyChain checks a restore point's chain as Disk does before it
// writes (every image against the catalog's size and SHA-256, the chain
// on disk against the chain recorded, a pending merge followed), for a
// caller that reads the point itself: Result.Chain[0] is the top image
// to serve. o.To, o.Format, o.Force and o.Device are not used. As in
// Disk, a chain a prune changed meanwhile is verified once more.
func VerifyChain(ctx context.Context, cat *catalog.Catalog, o Options) (*Result, error) {
	return againOnChangedChain(ctx, cat, o, verifiedChain)
}

// verifiedChain looks the point up, verifies its chain and returns it
// (top first) with the disk's virtual size.
func verifiedChain(ctx context.Context, cat *catalog.Catalog, o Options) (*Result, error) {
	b, err := cat.Get(ctx, o.BackupID)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil, notFound("restore: backup %s does not exist", o.BackupID)
	}
	if err != nil {
		return nil, err
	}
	if b.Status != catalog.StatusCommitted {
		return nil, notFound("restore: backup %s is %s, not a restore point", o.BackupID, b.Status)
	}
	chain, err := cat.Chain(ctx, o.BackupID, o.DiskKey)
	if err != nil {
		if errors.Is(err, catalog.ErrNotFound) {
			return nil, notFound("restore: backup %s has no disk %d", o.BackupID, o.DiskKey)
		}
		if errors.Is(err, catalog.ErrBrokenChain) {
			return nil, fmt.Errorf("restore: %w: %v", ErrDamaged, err)
		}
		return nil, err
	}
	// A point marked damaged (by a backup's chain check) is never offered.
	for _, link := range chain {
		if link.Damaged != "" {
			what := "restore point " + o.BackupID
			if link.BackupID != o.BackupID {
				what += " builds on restore point " + link.BackupID + ", which"
			}
			return nil, fmt.Errorf("restore: %w: %s disk %d is marked damaged: %s", ErrDamaged, what, o.DiskKey, link.Damaged)
		}
	}
	if chain, err = settledView(ctx, cat, o, chain); err != nil {
		return nil, err
	}
	paths, err := resolve(o.Repository, chain)
	if err != nil {
		return nil, err
	}
	res := &Result{}
	var total, done int64
	for _, link := range chain {
		total += link.SizeBytes
	}
	o.report(StageVerifying, 0, total)
	for i, link := range chain {
		base := done
		if err := verify(ctx, paths[i], link.SizeBytes, link.SHA256, func(n int64) {
			o.report(StageVerifying, base+n, total)
		}); err != nil {
			return nil, err
		}
		done += link.SizeBytes
		o.report(StageVerifying, done, total)
		res.Chain = append(res.Chain, paths[i])
	}
	// The chain qemu will read must be the chain the catalog recorded.
	info, err := qemu.Info(ctx, paths[0])
	if err != nil {
		return nil, err
	}
	if len(info) != len(chain) {
		return nil, fmt.Errorf("restore: %w: %s has a chain of %d images on disk, the catalog recorded %d", ErrDamaged, paths[0], len(info), len(chain))
	}
	for i := range info {
		if !sameFile(info[i].Filename, paths[i]) {
			return nil, fmt.Errorf("restore: %w: image %d of the chain is %s on disk, the catalog recorded %s", ErrDamaged, i, info[i].Filename, paths[i])
		}
	}
	res.Bytes = info[0].VirtualSize
	return res, nil
}

// resolve turns the chain's recorded paths into absolute ones: relative
// paths are taken from the repository root.
func resolve(root string, chain []catalog.ChainLink) ([]string, error) {
	paths := make([]string, len(chain))
	for i, link := range chain {
		if root == "" && !filepath.IsAbs(link.Path) {
			return nil, fmt.Errorf("restore: the catalog records %s relative to the repository, and no repository was given", link.Path)
		}
		paths[i] = repository.ResolveUnder(root, link.Path)
	}
	return paths, nil
}

// Verify checks that the file at path has the size and the proof (its
// seal or its SHA-256, see internal/integrity) recorded at commit. The
// error names the file.
func Verify(ctx context.Context, path string, size int64, sum string) error {
	return verify(ctx, path, size, sum, nil)
}

// verify is Verify, calling beat (when set) about every second with the
// bytes of the file read so far.
func verify(ctx context.Context, path string, size int64, sum string, beat func(int64)) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("restore: %w: %s: %v", ErrDamaged, path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() != size {
		return fmt.Errorf("restore: %w: %s is %d bytes, %d were recorded at commit", ErrDamaged, path, fi.Size(), size)
	}
	err = integrity.Verify(ctx, path, sum, beat)
	if d := (*integrity.Damage)(nil); errors.As(err, &d) {
		return fmt.Errorf("restore: %w: %s %s", ErrDamaged, d.Path, d.Reason)
	}
	return err
}

func sameFile(a, b string) bool {
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// settledView follows a prune's unsettled merge the way the file on disk
// does. While a merge is pending (see catalog.BeginMerges), the file at a
// kept point's image path is either the old image, which builds on the
// chain as recorded, or the merged one, which shows the same disk over
// its new backing: the chain to verify and read is the one of the file
// that is there. Only images with a pending merge are read here.
func settledView(ctx context.Context, cat *catalog.Catalog, o Options, chain []catalog.ChainLink) ([]catalog.ChainLink, error) {
	for i := 0; i < len(chain); i++ {
		p := chain[i].Pending
		if p == nil {
			continue
		}
		path := repository.ResolveUnder(o.Repository, chain[i].Path)
		err := Verify(ctx, path, chain[i].SizeBytes, chain[i].SHA256)
		if err == nil {
			continue // still the old image
		}
		if !errors.Is(err, ErrDamaged) {
			// Nothing is known of the file (qemu-img killed, an I/O
			// error): it is not taken for the merged image, nor for
			// neither.
			return nil, err
		}
		if err := Verify(ctx, path, p.SizeBytes, p.SHA256); err != nil {
			return nil, err // neither: damaged, named by Verify
		}
		link := chain[i]
		link.SizeBytes, link.SHA256, link.BackingBackupID, link.Pending = p.SizeBytes, p.SHA256, p.Backing, nil
		rest := []catalog.ChainLink(nil)
		if p.Backing != "" {
			var err error
			if rest, err = cat.Chain(ctx, p.Backing, o.DiskKey); err != nil {
				return nil, fmt.Errorf("restore: the merged image of %s: %w", link.BackupID, err)
			}
		}
		chain = append(append(chain[:i:i], link), rest...)
	}
	return chain, nil
}
