package catalog

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
)

// leaseIDs are the live leases of the test's VM, sorted.
func leaseIDs(t *testing.T, c *Catalog) []string {
	t.Helper()
	got, err := c.ExportedPoints(context.Background(), "lab", "uuid-p")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, ls := range got {
		for _, l := range ls {
			if !slices.Contains(ids, l) {
				ids = append(ids, l)
			}
		}
	}
	slices.Sort(ids)
	return ids
}

// An export's lease covers its point and every point its chain builds
// on; it is renewed, ended, and counts as gone once expired.
func TestExportLease(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	fourPoints(t, c)
	l, err := c.TakeExport(ctx, ExportLease{ID: "export/b2/204", BackupID: "b2", DiskKey: 204, Address: "127.0.0.1:10809"}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if l.Profile != "lab" || l.VMUUID != "uuid-p" || !l.ExpiresAt.After(time.Now()) {
		t.Errorf("lease: %+v, want the VM filled in and an expiry ahead", l)
	}
	// Taken again (a retried export): one lease, its start kept.
	l2, err := c.TakeExport(ctx, ExportLease{ID: "export/b2/204", BackupID: "b2", DiskKey: 204, Address: "127.0.0.1:10810"}, time.Minute)
	if err != nil || !l2.StartedAt.Equal(l.StartedAt) {
		t.Fatalf("lease taken again: %+v %v, want the first start %s", l2, err, l.StartedAt)
	}
	got, err := c.ExportedPoints(ctx, "lab", "uuid-p")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for id := range got {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []string{"b1", "b2"}) || !slices.Equal(got["b1"], []string{"export/b2/204"}) {
		t.Errorf("exported points: %v, want b1 and b2 read by export/b2/204", got)
	}
	if _, err := c.RenewExport(ctx, "export/b2/204", "", time.Minute); err != nil {
		t.Errorf("renew: %v", err)
	}
	if err := c.EndExport(ctx, "export/b2/204", ""); err != nil {
		t.Fatal(err)
	}
	if err := c.EndExport(ctx, "export/b2/204", ""); err != nil {
		t.Errorf("end again: %v", err)
	}
	if _, err := c.RenewExport(ctx, "export/b2/204", "", time.Minute); !errors.Is(err, ErrNotFound) {
		t.Errorf("renew of an ended lease: %v, want ErrNotFound", err)
	}
	// An expired lease counts as gone, and is not renewed.
	if _, err := c.TakeExport(ctx, ExportLease{ID: "export/b3/204", BackupID: "b3", DiskKey: 204}, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if ids := leaseIDs(t, c); len(ids) != 0 {
		t.Errorf("live leases after expiry: %v", ids)
	}
	if got, err := c.ExportedPoints(ctx, "lab", "uuid-p"); err != nil || len(got) != 0 {
		t.Errorf("exported points after expiry: %v %v", got, err)
	}
	if _, err := c.RenewExport(ctx, "export/b3/204", "", time.Minute); !errors.Is(err, ErrNotFound) {
		t.Errorf("renew of an expired lease: %v, want ErrNotFound", err)
	}
	// Unknown point and disk.
	if _, err := c.TakeExport(ctx, ExportLease{ID: "x", BackupID: "nope", DiskKey: 204}, time.Minute); !errors.Is(err, ErrNotFound) {
		t.Errorf("lease of an unknown point: %v, want ErrNotFound", err)
	}
	if _, err := c.TakeExport(ctx, ExportLease{ID: "x", BackupID: "b2", DiskKey: 999}, time.Minute); !errors.Is(err, ErrNotFound) {
		t.Errorf("lease of an unknown disk: %v, want ErrNotFound", err)
	}
}

// A prune's transactions never remove or rewrite a point a live export
// reads, and an export waits while a prune's merge of its chain is
// pending: both sides check under the VM's lock.
func TestExportAndPrune(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	fourPoints(t, c)
	if _, err := c.TakeExport(ctx, ExportLease{ID: "export/b2/204", BackupID: "b2", DiskKey: 204}, time.Minute); err != nil {
		t.Fatal(err)
	}
	// Removing b1 (which b2 builds on) is refused, naming the export;
	// nothing changed.
	m := MergedImage{BackupID: "b3", Key: 204, Backing: "b1", SizeBytes: 8192, SHA256: strings.Repeat("b", 64), TempPath: "t"}
	_, err := c.Prune(ctx, PruneRecord{ID: "p1", Profile: "lab", VMUUID: "uuid-p", Removed: []string{"b1"}}, nil)
	if !errors.Is(err, ErrExported) || !strings.Contains(err.Error(), "restore point b1 is read by export export/b2/204") {
		t.Errorf("prune removing an exported chain's point: %v, want ErrExported naming it", err)
	}
	// Merging into b2 (rewriting its image) is refused as well, before
	// anything is pending.
	mb2 := MergedImage{BackupID: "b2", Key: 204, SizeBytes: 8192, SHA256: strings.Repeat("c", 64), TempPath: "t2"}
	if err := c.BeginMerges(ctx, "p1", []MergedImage{mb2}); !errors.Is(err, ErrExported) {
		t.Errorf("merge into an exported point: %v, want ErrExported", err)
	}
	if p, err := c.PendingMerges(ctx, "lab", "uuid-p"); err != nil || len(p) != 0 {
		t.Errorf("pending merges after the refusal: %+v %v", p, err)
	}
	// b4 is no part of the export's chain: removing it goes through.
	if _, err := c.Prune(ctx, PruneRecord{ID: "p2", Profile: "lab", VMUUID: "uuid-p", Removed: []string{"b4"}}, nil); err != nil {
		t.Errorf("prune of a point outside the export's chain: %v", err)
	}
	// A merge of b3 pending: an export of b3 waits, one of b2 does not.
	if err := c.BeginMerges(ctx, "p3", []MergedImage{m}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.TakeExport(ctx, ExportLease{ID: "export/b3/204", BackupID: "b3", DiskKey: 204}, time.Minute); !errors.Is(err, ErrMergePending) {
		t.Errorf("export of a point with a pending merge: %v, want ErrMergePending", err)
	}
	if _, err := c.TakeExport(ctx, ExportLease{ID: "export/b1/204", BackupID: "b1", DiskKey: 204}, time.Minute); err != nil {
		t.Errorf("export of a point below the pending merge: %v", err)
	}
	if ids := leaseIDs(t, c); !slices.Equal(ids, []string{"export/b1/204", "export/b2/204"}) {
		t.Errorf("leases: %v", ids)
	}
	// Once the exports end, the prune goes through.
	for _, id := range []string{"export/b2/204", "export/b1/204"} {
		if err := c.EndExport(ctx, id, ""); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Prune(ctx, PruneRecord{ID: "p3", Profile: "lab", VMUUID: "uuid-p", Removed: []string{"b2"}}, []MergedImage{m}); err != nil {
		t.Errorf("prune after the exports ended: %v", err)
	}
	if ids := chainIDs(t, c, "b3"); !slices.Equal(ids, []string{"b3", "b1"}) {
		t.Errorf("chain of b3 after the prune: %v", ids)
	}
}

// An export reads one disk's chain: a prune may merge another disk's
// image of a point that chain goes through (the point itself is kept),
// while that disk's own image, and removing the point, stay refused.
func TestExportOfOneDiskLetsOtherDisksMerge(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	// b1: both disks full; b2: 204 builds on b1, 205 full again (it was
	// resized); b3: both build on b2.
	disks := map[string][]Disk{
		"b1": {disk(204, ModeFull, "d/b1-204", ""), disk(205, ModeFull, "d/b1-205", "")},
		"b2": {disk(204, ModeIncremental, "d/b2-204", "b1"), disk(205, ModeFull, "d/b2-205", "")},
		"b3": {disk(204, ModeIncremental, "d/b3-204", "b2"), disk(205, ModeIncremental, "d/b3-205", "b2")},
	}
	for _, id := range []string{"b1", "b2", "b3"} {
		if err := c.Begin(ctx, Backup{ID: id, Profile: "lab", VMUUID: "uuid-p", VMName: "vm-p", Mode: "auto"}); err != nil {
			t.Fatal(err)
		}
		if err := c.Commit(ctx, id, disks[id]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.TakeExport(ctx, ExportLease{ID: "export/b2/205", BackupID: "b2", DiskKey: 205}, time.Minute); err != nil {
		t.Fatal(err)
	}
	// Disk 205's image of b2 is read: no merge into it, and b2 stays.
	m205 := MergedImage{BackupID: "b2", Key: 205, SizeBytes: 8192, SHA256: strings.Repeat("c", 64), TempPath: "t205"}
	if err := c.BeginMerges(ctx, "p0", []MergedImage{m205}); !errors.Is(err, ErrExported) {
		t.Errorf("merge into the exported disk's image: %v, want ErrExported", err)
	}
	if _, err := c.Prune(ctx, PruneRecord{ID: "p0", Profile: "lab", VMUUID: "uuid-p", Removed: []string{"b2"}}, nil); !errors.Is(err, ErrExported) {
		t.Errorf("removing the exported point: %v, want ErrExported", err)
	}
	// b1 is no part of disk 205's chain: a prune keeping b2 and b3 merges
	// b1 into b2's disk 204 and removes b1.
	m204 := MergedImage{BackupID: "b2", Key: 204, SizeBytes: 8192, SHA256: strings.Repeat("b", 64), TempPath: "t204"}
	if err := c.BeginMerges(ctx, "p1", []MergedImage{m204}); err != nil {
		t.Fatalf("merge of another disk of the exported point: %v", err)
	}
	if _, err := c.Prune(ctx, PruneRecord{ID: "p1", Profile: "lab", VMUUID: "uuid-p", Removed: []string{"b1"}}, []MergedImage{m204}); err != nil {
		t.Fatalf("prune of a point outside the exported disk's chain: %v", err)
	}
	if ids := chainIDs(t, c, "b3"); !slices.Equal(ids, []string{"b3", "b2"}) {
		t.Errorf("chain of b3 disk 204 after the prune: %v", ids)
	}
	if got, err := c.ExportedPoints(ctx, "lab", "uuid-p"); err != nil || len(got) != 1 || !slices.Equal(got["b2"], []string{"export/b2/205"}) {
		t.Errorf("exported points: %v %v, want b2 read by export/b2/205", got, err)
	}
}

// A retried export takes the lease over: the attempt it replaced (still
// running, its heartbeat timed out) can neither renew the lease nor
// delete it, and stops; the new holder renews and ends it.
func TestExportLeaseTakenOverByARetry(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	fourPoints(t, c)
	l := ExportLease{ID: "export/b2/204", BackupID: "b2", DiskKey: 204, Holder: "run#1"}
	if _, err := c.TakeExport(ctx, l, time.Minute); err != nil {
		t.Fatal(err)
	}
	l.Holder = "run#2"
	if _, err := c.TakeExport(ctx, l, time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RenewExport(ctx, l.ID, "run#1", time.Minute); !errors.Is(err, ErrNotFound) {
		t.Errorf("renewal by the replaced attempt: %v, want ErrNotFound", err)
	}
	if err := c.EndExport(ctx, l.ID, "run#1"); err != nil {
		t.Fatal(err)
	}
	if ids := leaseIDs(t, c); !slices.Equal(ids, []string{l.ID}) {
		t.Errorf("leases after the replaced attempt ended: %v, want the retry's", ids)
	}
	if _, err := c.RenewExport(ctx, l.ID, "run#2", time.Minute); err != nil {
		t.Errorf("renewal by the holder: %v", err)
	}
	if err := c.EndExport(ctx, l.ID, "run#2"); err != nil {
		t.Fatal(err)
	}
	if ids := leaseIDs(t, c); len(ids) != 0 {
		t.Errorf("leases after the holder ended: %v", ids)
	}
}
