package catalog

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// fourPoints commits b1 (full) ← b2 ← b3 ← b4 for disk 204 of one VM, and
// closes the chain at b4.
func fourPoints(t *testing.T, c *Catalog) {
	t.Helper()
	ctx := context.Background()
	prev := ""
	for i := 1; i <= 4; i++ {
		id := fmt.Sprintf("b%d", i)
		if err := c.Begin(ctx, Backup{ID: id, Profile: "lab", VMUUID: "uuid-p", VMName: "vm-p", Mode: "auto"}); err != nil {
			t.Fatal(err)
		}
		mode := ModeIncremental
		if prev == "" {
			mode = ModeFull
		}
		if err := c.Commit(ctx, id, []Disk{disk(204, mode, "c/"+id, prev)}); err != nil {
			t.Fatal(err)
		}
		prev = id
	}
	if err := c.CloseChain(ctx, "lab", "uuid-p", 204, "b4", "disk removed"); err != nil {
		t.Fatal(err)
	}
}

func chainIDs(t *testing.T, c *Catalog, id string) []string {
	t.Helper()
	chain, err := c.Chain(context.Background(), id, 204)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, l := range chain {
		ids = append(ids, l.BackupID)
	}
	return ids
}

func TestPruneMergesAndRemoves(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	fourPoints(t, c)
	// Keep b3 and b4: b1 and b2 go, and b3's image becomes a full one.
	m := MergedImage{BackupID: "b3", Key: 204, Backing: "", SizeBytes: 8192, SHA256: strings.Repeat("b", 64),
		Stamp: FileStamp{Inode: 7, MtimeNs: 8, CtimeNs: 9}, TempPath: "lab/uuid-p/204/.b3.qcow2.p1.merging"}
	if err := c.BeginMerges(ctx, "p1", []MergedImage{m}); err != nil {
		t.Fatal(err)
	}
	if err := c.BeginMerges(ctx, "p1", []MergedImage{m}); err != nil {
		t.Fatalf("repeated BeginMerges of the same prune: %v", err)
	}
	if err := c.BeginMerges(ctx, "p2", []MergedImage{m}); !errors.Is(err, ErrPendingMerge) {
		t.Fatalf("BeginMerges of another prune over a pending merge: %v, want ErrPendingMerge", err)
	}
	// While pending, the chain is still the recorded one, and says so.
	chain, err := c.Chain(ctx, "b4", 204)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 4 || chain[1].Pending == nil || chain[1].Pending.SHA256 != m.SHA256 || chain[0].Pending != nil {
		t.Fatalf("chain while pending: %+v", chain)
	}
	pend, err := c.PendingMerges(ctx, "lab", "uuid-p")
	if err != nil || len(pend) != 1 || pend[0].PruneID != "p1" {
		t.Fatalf("pending: %+v %v", pend, err)
	}

	// Removing b2 while b3 still builds on it (no merged image given)
	// fails and changes nothing.
	_, err = c.Prune(ctx, PruneRecord{ID: "bad", Profile: "lab", VMUUID: "uuid-p", Removed: []string{"b1", "b2"}}, nil)
	if err == nil {
		t.Fatal("a prune that removes a point a kept image builds on succeeded")
	}
	if got := chainIDs(t, c, "b4"); !slices.Equal(got, []string{"b4", "b3", "b2", "b1"}) {
		t.Fatalf("after the refused prune the chain is %v", got)
	}

	rec := PruneRecord{ID: "p1", Profile: "lab", VMUUID: "uuid-p", Removed: []string{"b1", "b2"}, BytesFreed: 4096}
	if freed, err := c.Prune(ctx, rec, []MergedImage{m}); err != nil || freed != 4096 {
		t.Fatalf("prune: %d bytes freed, %v", freed, err)
	}
	// A retry reports what the first attempt recorded, whatever it counts.
	again := rec
	again.BytesFreed = -1
	if freed, err := c.Prune(ctx, again, []MergedImage{m}); err != nil || freed != 4096 {
		t.Fatalf("repeated prune: %d bytes freed, %v; want the recorded 4096", freed, err)
	}
	if ids, err := c.PrunedPoints(ctx, "lab", "uuid-p"); err != nil || !slices.Equal(ids, []string{"b1", "b2"}) {
		t.Errorf("PrunedPoints = %v, %v; want b1 b2", ids, err)
	}
	if got := chainIDs(t, c, "b4"); !slices.Equal(got, []string{"b4", "b3"}) {
		t.Errorf("chain after the prune: %v, want b4 b3", got)
	}
	b3, err := c.Get(ctx, "b3")
	if err != nil {
		t.Fatal(err)
	}
	d := b3.Disks[0]
	if d.BackingBackupID != "" || d.SHA256 != m.SHA256 || d.SizeBytes != 8192 || d.Stamp != m.Stamp || !strings.Contains(d.Note, "merged by prune p1") {
		t.Errorf("b3 disk after the prune: %+v", d)
	}
	for _, id := range []string{"b1", "b2"} {
		if _, err := c.Get(ctx, id); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s after the prune: %v, want ErrNotFound", id, err)
		}
	}
	if pend, _ := c.PendingMerges(ctx, "lab", "uuid-p"); len(pend) != 0 {
		t.Errorf("pending after the prune: %+v", pend)
	}
	var freed int64
	if err := c.pool.QueryRow(ctx, `SELECT bytes_freed FROM prunes WHERE id = 'p1'`).Scan(&freed); err != nil || freed != 4096 {
		t.Errorf("the prune's record: %d bytes freed, %v", freed, err)
	}
	// The closed chain still ends at b4; the VM's latest disk is not offered.
	latest, err := c.LatestDisks(ctx, "lab", "uuid-p")
	if err != nil || len(latest) != 0 {
		t.Errorf("latest disks of a closed chain after the prune: %v %v", latest, err)
	}
}

func TestPruneMovesClosedChain(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	fourPoints(t, c)
	// b4 (the closed chain's last point) goes: the chain now ends at b3.
	if _, err := c.Prune(ctx, PruneRecord{ID: "p", Profile: "lab", VMUUID: "uuid-p", Removed: []string{"b4"}}, nil); err != nil {
		t.Fatal(err)
	}
	latest, err := c.LatestDisks(ctx, "lab", "uuid-p")
	if err != nil || len(latest) != 0 {
		t.Errorf("the closed chain reopened after its last point was pruned: %v %v", latest, err)
	}
}

func TestSettleMerge(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	fourPoints(t, c)
	m := MergedImage{BackupID: "b3", Key: 204, Backing: "b1", SizeBytes: 8192, SHA256: strings.Repeat("c", 64), TempPath: "t"}
	// Not applied: the pending row goes, the image stays as recorded.
	if err := c.BeginMerges(ctx, "p1", []MergedImage{m}); err != nil {
		t.Fatal(err)
	}
	if err := c.SettleMerge(ctx, "b3", 204, false); err != nil {
		t.Fatal(err)
	}
	if got := chainIDs(t, c, "b4"); !slices.Equal(got, []string{"b4", "b3", "b2", "b1"}) {
		t.Errorf("chain after settling an unapplied merge: %v", got)
	}
	// Applied: the image is the merged one; b2 is still a restore point,
	// which b3 no longer builds on.
	if err := c.BeginMerges(ctx, "p2", []MergedImage{m}); err != nil {
		t.Fatal(err)
	}
	if err := c.SettleMerge(ctx, "b3", 204, true); err != nil {
		t.Fatal(err)
	}
	if got := chainIDs(t, c, "b4"); !slices.Equal(got, []string{"b4", "b3", "b1"}) {
		t.Errorf("chain after settling an applied merge: %v", got)
	}
	if got := chainIDs(t, c, "b2"); !slices.Equal(got, []string{"b2", "b1"}) {
		t.Errorf("b2's chain: %v", got)
	}
	if pend, _ := c.PendingMerges(ctx, "lab", "uuid-p"); len(pend) != 0 {
		t.Errorf("pending after settling: %+v", pend)
	}
}
