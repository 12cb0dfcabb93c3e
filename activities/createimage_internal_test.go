package activities

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/cbtflow/cbtflow/internal/copier"
)

// TestCreateImageMakesTables: the transfer's new image comes with the L2
// tables of the extents it is about to copy (internal/qcow2.Create), one
// per 256 GiB of the disk they touch, so qemu-nbd allocates none.
func TestCreateImageMakesTables(t *testing.T) {
	const gib = int64(1) << 30
	path := filepath.Join(t.TempDir(), "b.qcow2")
	extents := []copier.Extent{{Offset: 0, Length: 1 << 20}, {Offset: 256*gib - 64<<10, Length: 128 << 10}, {Offset: 1800 * gib, Length: 64 << 10}}
	a := &Transfer{}
	if err := a.createImage(t.Context(), TransferDiskInput{Key: 2000, Mode: ModeFull, Capacity: 2 << 40}, path, extents); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	// Header, refcount table and block, L1 table, then tables 0, 1 and 7.
	if want := int64(4+3) * 2 << 20; fi.Size() != want {
		t.Errorf("the image is %d bytes, want %d: 4 clusters of metadata and 3 L2 tables", fi.Size(), want)
	}
}
