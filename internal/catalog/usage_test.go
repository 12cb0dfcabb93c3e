package catalog

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestUsageAndPruneTotals(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()

	// An empty catalog.
	if us, err := c.Usage(ctx); err != nil || len(us) != 0 {
		t.Fatalf("usage of an empty catalog: %v %v", us, err)
	}
	if n, b, err := c.PruneTotals(ctx); err != nil || n != 0 || b != 0 {
		t.Fatalf("prune totals of an empty catalog: %d %d %v", n, b, err)
	}

	t0 := time.Date(2026, 11, 1, 2, 0, 0, 0, time.UTC)
	// allocated is the space some images took at commit (their blocks);
	// the others' is unknown, their size stands for it.
	allocated := map[string]int64{"a2/204": 3, "a3/204": 50}
	// point commits a restore point of vm with one image per size, its
	// started_at at t0 + i days.
	point := func(vm Backup, id string, i int, backing string, sizes ...int64) {
		t.Helper()
		vm.ID = id
		if err := c.Begin(ctx, vm); err != nil {
			t.Fatal(err)
		}
		var disks []Disk
		for k, s := range sizes {
			mode := ModeFull
			if backing != "" {
				mode = ModeIncremental
			}
			d := disk(int32(204+k), mode, "c/"+id, backing)
			d.Path = vm.Profile + "/" + vm.VMUUID + "/" + d.ChangeID[2:] + "-" + string(rune('a'+k)) + ".qcow2"
			d.SizeBytes = s
			d.AllocatedBytes = allocated[fmt.Sprintf("%s/%d", id, d.Key)]
			disks = append(disks, d)
		}
		if err := c.Commit(ctx, id, disks); err != nil {
			t.Fatal(err)
		}
		if _, err := c.pool.Exec(ctx, `UPDATE backups SET started_at = $2 WHERE id = $1`, id, t0.AddDate(0, 0, i)); err != nil {
			t.Fatal(err)
		}
	}
	a := Backup{Profile: "lab", VMUUID: "uuid-a", VMName: "vm-a", Mode: "auto"}
	point(a, "a1", 0, "", 1000, 200)
	point(a, "a2", 1, "a1", 30, 4)
	point(a, "a3", 2, "a2", 500, 6)
	point(a, "a4", 3, "a3", 7, 8)
	// a3 disk 204 is damaged: a3 and a4 (built on it) are not restorable.
	if _, err := c.MarkDamaged(ctx, "a3", 204, "truncated"); err != nil {
		t.Fatal(err)
	}
	// Another profile of the same VM, and a VM with a failed backup only.
	b := Backup{Profile: "other", VMUUID: "uuid-a", VMName: "vm-a", Mode: "auto"}
	point(b, "b1", 5, "", 64)
	f := Backup{ID: "f1", Profile: "lab", VMUUID: "uuid-f", VMName: "vm-f", Mode: "auto"}
	if err := c.Begin(ctx, f); err != nil {
		t.Fatal(err)
	}
	if err := c.Fail(ctx, "f1", "boom"); err != nil {
		t.Fatal(err)
	}
	// A running backup of vm-a counts for nothing.
	if err := c.Begin(ctx, Backup{ID: "a5", Profile: "lab", VMUUID: "uuid-a", VMName: "vm-a", Mode: "auto"}); err != nil {
		t.Fatal(err)
	}

	day := func(i int) time.Time { return t0.AddDate(0, 0, i) }
	check := func(step string, want []VMUsage) {
		t.Helper()
		got, err := c.Usage(ctx)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if len(got) != len(want) {
			t.Fatalf("%s: usage %+v, want %+v", step, got, want)
		}
		for i := range want {
			g, w := got[i], want[i]
			if !g.Oldest.Equal(w.Oldest) || !g.Newest.Equal(w.Newest) {
				t.Errorf("%s: %s oldest/newest %v/%v, want %v/%v", step, w.Name, g.Oldest, g.Newest, w.Oldest, w.Newest)
			}
			g.Oldest, g.Newest, w.Oldest, w.Newest = time.Time{}, time.Time{}, time.Time{}, time.Time{}
			if g != w {
				t.Errorf("%s: usage[%d] = %+v, want %+v", step, i, g, w)
			}
		}
	}
	vmA := VM{VMRef: VMRef{Profile: "lab", UUID: "uuid-a"}, Name: "vm-a"}
	vmB := VM{VMRef: VMRef{Profile: "other", UUID: "uuid-a"}, Name: "vm-a"}
	vmF := VM{VMRef: VMRef{Profile: "lab", UUID: "uuid-f"}, Name: "vm-f"}
	check("before the prune", []VMUsage{
		{VM: vmA, RestorePoints: 4, Damaged: 2, Oldest: day(0), Newest: day(3), Bytes: 1000 + 200 + 3 + 4 + 50 + 6 + 7 + 8, NewestImage: "lab/uuid-a/a4-a.qcow2"},
		{VM: vmB, RestorePoints: 1, Oldest: day(5), Newest: day(5), Bytes: 64, NewestImage: "other/uuid-a/b1-a.qcow2"},
		{VM: vmF},
	})

	// A prune removes a1 and merges a2's images into full ones, bigger:
	// the space of the one whose merge says it counts, the other's size
	// stands for it.
	merged := []MergedImage{
		{BackupID: "a2", Key: 204, SizeBytes: 1010, SHA256: strings.Repeat("c", 64), TempPath: "t1", AllocatedBytes: 101},
		{BackupID: "a2", Key: 205, SizeBytes: 202, SHA256: strings.Repeat("c", 64), TempPath: "t2"},
	}
	if _, err := c.Prune(ctx, PruneRecord{ID: "p1", Profile: "lab", VMUUID: "uuid-a", Removed: []string{"a1"}, BytesFreed: 22}, merged); err != nil {
		t.Fatal(err)
	}
	// A prune that removed nothing is counted too.
	if _, err := c.Prune(ctx, PruneRecord{ID: "p2", Profile: "other", VMUUID: "uuid-a"}, nil); err != nil {
		t.Fatal(err)
	}
	check("after the prune", []VMUsage{
		{VM: vmA, RestorePoints: 3, Damaged: 2, Oldest: day(1), Newest: day(3), Bytes: 101 + 202 + 50 + 6 + 7 + 8, NewestImage: "lab/uuid-a/a4-a.qcow2"},
		{VM: vmB, RestorePoints: 1, Oldest: day(5), Newest: day(5), Bytes: 64, NewestImage: "other/uuid-a/b1-a.qcow2"},
		{VM: vmF},
	})
	if n, b, err := c.PruneTotals(ctx); err != nil || n != 2 || b != 22 {
		t.Errorf("prune totals: %d prunes, %d bytes, %v; want 2, 22", n, b, err)
	}
}
