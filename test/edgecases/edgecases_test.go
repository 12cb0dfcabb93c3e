// Package edgecases tests how cbtflow's backups follow changes of change
// tracking and of a VM's disks, through the lab and the whole stack
// (package stack: Temporal dev server, worker process, lab vCenter, own
// PostgreSQL database), driven by the starter CLI as an operator would:
// a CBT reset, CBT off at backup time, a grown disk, an added disk, a
// removed disk and a new disk that gets the removed disk's device key.
// Every restore point is restored and compared byte for byte with the
// guest data right before its backup; every change ID in the catalog is
// the one the lab stamped. The package has test files only.
package edgecases

import (
	"context"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const (
	full = workflows.ModeFull
	incr = workflows.ModeIncremental
)

// TestEdgeCases runs every scenario on one stack, each on a VM of its own,
// in parallel.
func TestEdgeCases(t *testing.T) {
	began := time.Now()
	s := stacktest.New(t, stack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	t.Run("group", func(t *testing.T) {
		t.Run("CBTReset", func(t *testing.T) { t.Parallel(); cbtReset(ctx, t, s) })
		t.Run("CBTOffAtBackup", func(t *testing.T) { t.Parallel(); cbtOffAtBackup(ctx, t, s) })
		t.Run("GrownDisk", func(t *testing.T) { t.Parallel(); grownDisk(ctx, t, s) })
		t.Run("AddedDisk", func(t *testing.T) { t.Parallel(); addedDisk(ctx, t, s) })
		t.Run("RemovedDisk", func(t *testing.T) { t.Parallel(); removedDisk(ctx, t, s) })
		t.Run("ReplacedDiskBetweenBackups", func(t *testing.T) { t.Parallel(); replacedDisk(ctx, t, s) })
	})
	if left := s.Leftovers(); len(left) > 0 {
		t.Errorf("processes of the stack still running after the backups: %v", left)
	}
	t.Logf("edge cases in %s (the stack's close is checked next)", time.Since(began).Round(time.Second))
}

func createVM(t *testing.T, s *stack.Stack, name string, caps ...int64) string {
	t.Helper()
	ref, err := s.Lab().CreateVM(name, caps...)
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

func wantWarning(t *testing.T, label string, b stacktest.BackupJSON, parts ...string) {
	t.Helper()
	for _, w := range b.Warnings {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(w, p)
		}
		if ok {
			return
		}
	}
	t.Errorf("%s: no warning with %q among %q", label, parts, b.Warnings)
}

func wantNoWarnings(t *testing.T, label string, b stacktest.BackupJSON) {
	t.Helper()
	if len(b.Warnings) > 0 {
		t.Errorf("%s: unexpected warnings %q", label, b.Warnings)
	}
}

// cbtReset: change tracking switched off and on again between two
// backups (the stored change IDs mean nothing any more). Every disk
// falls back to a full backup with a warning and a note; data written
// while CBT was off is in it; the next backup is incremental again.
func cbtReset(ctx context.Context, t *testing.T, s *stack.Stack) {
	l := s.Lab()
	createVM(t, s, "edge-cbt-reset", 256*MiB, 256*MiB)
	v := newVM(ctx, t, s, "edge-cbt-reset")
	keys := v.keys(t)
	k1, k2 := keys[0], keys[1]

	stacktest.WriteDisk(t, l, v.ref, k1, 0, stacktest.Pattern(11, 3*MiB))
	stacktest.WriteDisk(t, l, v.ref, k2, 100*MiB, stacktest.Pattern(12, 2*MiB))
	b1 := v.backup(t, "b1", all(keys, full))
	wantNoWarnings(t, "b1", b1.b)

	stacktest.WriteDisk(t, l, v.ref, k1, 50*MiB, stacktest.Pattern(13, MiB))
	b2 := v.backup(t, "b2", all(keys, incr))
	wantNoWarnings(t, "b2", b2.b)

	if err := l.SetCBT(v.ref, false); err != nil {
		t.Fatal(err)
	}
	// Written while nothing tracks changes: only a full backup has it.
	stacktest.WriteDisk(t, l, v.ref, k1, 200*MiB, stacktest.Pattern(14, MiB))
	stacktest.WriteDisk(t, l, v.ref, k2, 10*MiB, stacktest.Pattern(15, 512*KiB))
	if err := l.SetCBT(v.ref, true); err != nil {
		t.Fatal(err)
	}
	stacktest.WriteDisk(t, l, v.ref, k2, 30*MiB, stacktest.Pattern(16, 64*KiB))
	b3 := v.backup(t, "b3", all(keys, full))
	for _, k := range keys {
		d := b3.b.Disk(t, k)
		wantWarning(t, "b3", b3.b, "disk "+itoa(k), "reset")
		if !strings.Contains(d.Note, "reset") {
			t.Errorf("b3 disk %d: note %q, want one saying change tracking was reset", k, d.Note)
		}
		if d.ChangeID == b2.b.Disk(t, k).ChangeID {
			t.Errorf("b3 disk %d: same change ID as b2", k)
		}
	}

	stacktest.WriteDisk(t, l, v.ref, k1, 60*MiB, stacktest.Pattern(17, MiB))
	b4 := v.backup(t, "b4", all(keys, incr))
	wantNoWarnings(t, "b4", b4.b)
	if d := b4.b.Disk(t, k1); d.ChangedBytes == 0 || d.ChangedBytes > 2*MiB {
		t.Errorf("b4 disk %d: %d changed bytes, want the 1 MiB written since b3", k1, d.ChangedBytes)
	}
	v.checkCatalog(t)
	v.restoreAll(t)
}

// cbtOffAtBackup: change tracking is off when the backup starts.
// PrepareVM switches it on, every disk gets a full backup with a warning
// and a note, and the next backup is incremental again.
func cbtOffAtBackup(ctx context.Context, t *testing.T, s *stack.Stack) {
	l := s.Lab()
	createVM(t, s, "edge-cbt-off", 256*MiB)
	v := newVM(ctx, t, s, "edge-cbt-off")
	keys := v.keys(t)
	k := keys[0]

	stacktest.WriteDisk(t, l, v.ref, k, 0, stacktest.Pattern(21, 2*MiB))
	v.backup(t, "b1", all(keys, full))
	stacktest.WriteDisk(t, l, v.ref, k, 64*MiB, stacktest.Pattern(22, MiB))
	v.backup(t, "b2", all(keys, incr))

	if err := l.SetCBT(v.ref, false); err != nil {
		t.Fatal(err)
	}
	stacktest.WriteDisk(t, l, v.ref, k, 128*MiB, stacktest.Pattern(23, MiB))
	b3 := v.backup(t, "b3", all(keys, full))
	wantWarning(t, "b3", b3.b, "disk "+itoa(k), "change")
	if d := b3.b.Disk(t, k); !strings.Contains(d.Note, "enabled") {
		t.Errorf("b3 disk %d: note %q, want one saying change tracking was enabled", k, d.Note)
	}
	if d, err := l.Disk(v.ref, k); err != nil || d.ChangeID == "" {
		t.Errorf("after b3, disk %d has no change ID (%v): CBT was not enabled again", k, err)
	}

	stacktest.WriteDisk(t, l, v.ref, k, 200*MiB, stacktest.Pattern(24, MiB))
	b4 := v.backup(t, "b4", all(keys, incr))
	wantNoWarnings(t, "b4", b4.b)
	v.checkCatalog(t)
	v.restoreAll(t)
}

// grownDisk: the second disk of DC0_H0_VM0 grows between two backups. It
// gets a full backup (the note says the size changed) while the first
// stays incremental; the new restore point restores at the new size, the
// older ones at the old size.
func grownDisk(ctx context.Context, t *testing.T, s *stack.Stack) {
	l := s.Lab()
	v := newVM(ctx, t, s, lab.SecondDiskVM)
	keys := v.keys(t)
	if len(keys) != 2 {
		t.Fatalf("%s: disks %v, want two", lab.SecondDiskVM, keys)
	}
	k1, k2 := keys[0], keys[1]
	oldCap, err := l.DiskCapacity(v.ref, k2)
	if err != nil {
		t.Fatal(err)
	}
	newCap := oldCap + 2*GiB

	stacktest.WriteDisk(t, l, v.ref, k1, 0, stacktest.Pattern(31, 2*MiB))
	stacktest.WriteDisk(t, l, v.ref, k2, MiB, stacktest.Pattern(32, MiB))
	stacktest.WriteDisk(t, l, v.ref, k2, oldCap-5000, stacktest.Pattern(33, 5000)) // the very end
	v.backup(t, "b1", all(keys, full))

	if err := l.GrowDisk(v.ref, k2, newCap); err != nil {
		t.Fatal(err)
	}
	stacktest.WriteDisk(t, l, v.ref, k1, 4*MiB, stacktest.Pattern(34, MiB))
	stacktest.WriteDisk(t, l, v.ref, k2, oldCap-4096, stacktest.Pattern(35, 64*KiB)) // across the old end
	stacktest.WriteDisk(t, l, v.ref, k2, oldCap+GiB, stacktest.Pattern(36, MiB))
	stacktest.WriteDisk(t, l, v.ref, k2, newCap-777, stacktest.Pattern(37, 777)) // the new end
	b2 := v.backup(t, "b2", map[int32]string{k1: incr, k2: full})
	d := b2.b.Disk(t, k2)
	if !strings.Contains(d.Note, "size changed") || !strings.Contains(d.Note, itoa64(newCap)) {
		t.Errorf("b2 disk %d: note %q, want one saying the size changed to %d", k2, d.Note, newCap)
	}
	if n := b2.b.Disk(t, k1).Note; n != "" {
		t.Errorf("b2 disk %d: note %q on an incremental", k1, n)
	}

	stacktest.WriteDisk(t, l, v.ref, k2, oldCap+GiB+512*KiB, stacktest.Pattern(38, 128*KiB))
	stacktest.WriteDisk(t, l, v.ref, k1, 8*MiB, stacktest.Pattern(39, MiB))
	b3 := v.backup(t, "b3", all(keys, incr))
	if d := b3.b.Disk(t, k2); d.ChangedBytes == 0 || d.ChangedBytes > 2*MiB {
		t.Errorf("b3 disk %d: %d changed bytes, want the 128 KiB written since b2", k2, d.ChangedBytes)
	}

	// Virtual sizes of the images: old size up to b1, new size after.
	for _, c := range []struct {
		tk   taken
		size int64
	}{{v.taken[0], oldCap}, {b2, newCap}, {b3, newCap}} {
		if chain := imageChain(ctx, t, c.tk.b.Disk(t, k2).Path); chain[0].VirtualSize != c.size {
			t.Errorf("%s disk %d: image of %d bytes, want %d", c.tk.label, k2, chain[0].VirtualSize, c.size)
		}
	}
	if chain := imageChain(ctx, t, b2.b.Disk(t, k2).Path); len(chain) != 1 {
		t.Errorf("b2 disk %d: the full image has a backing chain: %+v", k2, chain)
	}
	v.checkCatalog(t)
	v.restoreAll(t)
}

// addedDisk: a disk added between two backups gets a full backup, the
// others stay incremental.
func addedDisk(ctx context.Context, t *testing.T, s *stack.Stack) {
	l := s.Lab()
	createVM(t, s, "edge-add", 256*MiB)
	v := newVM(ctx, t, s, "edge-add")
	k1 := v.keys(t)[0]

	stacktest.WriteDisk(t, l, v.ref, k1, 0, stacktest.Pattern(41, 2*MiB))
	v.backup(t, "b1", map[int32]string{k1: full})

	k2, err := l.AddDisk(v.ref, 512*MiB)
	if err != nil {
		t.Fatal(err)
	}
	stacktest.WriteDisk(t, l, v.ref, k2, 0, stacktest.Pattern(42, MiB))
	stacktest.WriteDisk(t, l, v.ref, k2, 512*MiB-100, stacktest.Pattern(43, 100))
	stacktest.WriteDisk(t, l, v.ref, k1, 10*MiB, stacktest.Pattern(44, MiB))
	b2 := v.backup(t, "b2", map[int32]string{k1: incr, k2: full})
	wantNoWarnings(t, "b2", b2.b)
	if n := b2.b.Disk(t, k2).Note; !strings.Contains(n, "no previous restore point") {
		t.Errorf("b2 disk %d: note %q, want one saying there was no previous restore point", k2, n)
	}

	stacktest.WriteDisk(t, l, v.ref, k2, 100*MiB, stacktest.Pattern(45, MiB))
	v.backup(t, "b3", map[int32]string{k1: incr, k2: incr})
	v.checkCatalog(t)
	v.restoreAll(t)
}

// removedDisk: a disk removed between two backups closes its chain (a
// warning names it); its restore points stay listed and restorable; the
// other disks go on incrementally. A disk added later that gets the same
// device key starts a new chain: a full image without backing file, and
// the next incremental of that key is an overlay on the new chain only.
func removedDisk(ctx context.Context, t *testing.T, s *stack.Stack) {
	l := s.Lab()
	createVM(t, s, "edge-remove", 128*MiB, 256*MiB, 256*MiB)
	v := newVM(ctx, t, s, "edge-remove")
	keys := v.keys(t)
	gone := keys[2] // the highest key: a disk added later gets it again
	stay := keys[:2]

	for i, k := range keys {
		stacktest.WriteDisk(t, l, v.ref, k, int64(i)*MiB, stacktest.Pattern(uint64(50+i), 2*MiB))
	}
	b1 := v.backup(t, "b1", all(keys, full))
	stacktest.WriteDisk(t, l, v.ref, gone, 20*MiB, stacktest.Pattern(54, MiB))
	stacktest.WriteDisk(t, l, v.ref, stay[0], 20*MiB, stacktest.Pattern(55, MiB))
	b2 := v.backup(t, "b2", all(keys, incr))

	if err := l.RemoveDisk(v.ref, gone); err != nil {
		t.Fatal(err)
	}
	stacktest.WriteDisk(t, l, v.ref, stay[1], 30*MiB, stacktest.Pattern(56, MiB))
	b3 := v.backup(t, "b3", all(stay, incr))
	wantWarning(t, "b3", b3.b, "disk "+itoa(gone), "removed")

	// Its restore points are still listed.
	list := v.checkCatalog(t)
	for _, tk := range []taken{b1, b2} {
		for _, e := range list {
			if e.BackupID != tk.b.BackupID {
				continue
			}
			found := false
			for _, d := range e.Disks {
				found = found || d.Key == gone
			}
			if !found {
				t.Errorf("list: %s (%s) no longer lists the removed disk %d", tk.label, tk.b.BackupID, gone)
			}
		}
	}

	// A new disk gets the removed disk's key.
	again, err := l.AddDisk(v.ref, 256*MiB)
	if err != nil {
		t.Fatal(err)
	}
	if again != gone {
		t.Fatalf("the new disk got key %d, not the removed disk's %d: the lab no longer reuses keys", again, gone)
	}
	stacktest.WriteDisk(t, l, v.ref, again, 5*MiB, stacktest.Pattern(57, 3*MiB))
	stacktest.WriteDisk(t, l, v.ref, stay[0], 40*MiB, stacktest.Pattern(58, MiB))
	b4 := v.backup(t, "b4", map[int32]string{stay[0]: incr, stay[1]: incr, again: full})
	wantNoWarnings(t, "b4", b4.b)
	nd := b4.b.Disk(t, again)
	if !strings.Contains(nd.Note, "no previous restore point") {
		t.Errorf("b4 disk %d: note %q, want one saying there was no previous restore point", again, nd.Note)
	}
	if chain := imageChain(ctx, t, nd.Path); len(chain) != 1 {
		t.Errorf("b4 disk %d: the new disk's full image has a backing chain %v", again, chainFiles(chain))
	}

	stacktest.WriteDisk(t, l, v.ref, again, 100*MiB, stacktest.Pattern(59, MiB))
	b5 := v.backup(t, "b5", all(v.keys(t), incr))
	chain := chainFiles(imageChain(ctx, t, b5.b.Disk(t, again).Path))
	if want := []string{filepath.Clean(b5.b.Disk(t, again).Path), filepath.Clean(nd.Path)}; !slices.Equal(chain, want) {
		t.Errorf("b5 disk %d: chain %v, want %v (the new chain only)", again, chain, want)
	}
	v.checkCatalog(t)
	v.restoreAll(t)
}

// replacedDisk: a disk removed and a new one added with the same key and
// capacity, both between two backups (no backup saw the removal). The
// new disk must get a full backup, never an overlay on the removed disk's
// images.
func replacedDisk(ctx context.Context, t *testing.T, s *stack.Stack) {
	l := s.Lab()
	createVM(t, s, "edge-replace", 128*MiB, 128*MiB)
	v := newVM(ctx, t, s, "edge-replace")
	keys := v.keys(t)
	k1, k2 := keys[0], keys[1]

	stacktest.WriteDisk(t, l, v.ref, k1, 0, stacktest.Pattern(61, MiB))
	stacktest.WriteDisk(t, l, v.ref, k2, 0, stacktest.Pattern(62, 8*MiB))
	v.backup(t, "b1", all(keys, full))

	if err := l.RemoveDisk(v.ref, k2); err != nil {
		t.Fatal(err)
	}
	again, err := l.AddDisk(v.ref, 128*MiB)
	if err != nil {
		t.Fatal(err)
	}
	if again != k2 {
		t.Fatalf("the new disk got key %d, not the removed disk's %d", again, k2)
	}
	// Less data than the old disk had: an overlay would show the old
	// disk's data beyond it.
	stacktest.WriteDisk(t, l, v.ref, k2, 0, stacktest.Pattern(63, MiB))
	stacktest.WriteDisk(t, l, v.ref, k1, 2*MiB, stacktest.Pattern(64, MiB))
	b2 := v.backup(t, "b2", map[int32]string{k1: incr, k2: full})
	if chain := imageChain(ctx, t, b2.b.Disk(t, k2).Path); len(chain) != 1 {
		t.Errorf("b2 disk %d: the new disk's image has a backing chain %v", k2, chainFiles(chain))
	}
	t.Logf("b2 warnings %q, disk %d note %q", b2.b.Warnings, k2, b2.b.Disk(t, k2).Note)

	stacktest.WriteDisk(t, l, v.ref, k2, 50*MiB, stacktest.Pattern(65, MiB))
	v.backup(t, "b3", all(keys, incr))
	v.checkCatalog(t)
	v.restoreAll(t)
}

func itoa(k int32) string   { return strconv.Itoa(int(k)) }
func itoa64(n int64) string { return strconv.FormatInt(n, 10) }
