package prune

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// TestPruneAndBackupExcludeEachOther: a prune of a VM runs under the VM's
// per-VM workflow ID, so a backup that arrives meanwhile is refused with
// a message that names the prune (exit 3), and a prune that arrives
// during a backup leaves the VM alone and says why; each then runs once
// the other ended.
func TestPruneAndBackupExcludeEachOther(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	l := s.Lab()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir := t.TempDir()
	gates := s.FaultPoints()

	var points []point
	for i := 1; i <= 3; i++ {
		for _, k := range keys {
			stacktest.WriteDisk(t, l, vm, k, int64(i)*8*MiB, stacktest.Pattern(uint64(i)*31+uint64(k), 2*MiB))
		}
		mode := workflows.ModeIncremental
		if i == 1 {
			mode = workflows.ModeFull
		}
		points = append(points, backup(ctx, t, s, dir, "p"+string(rune('0'+i)), mode))
	}
	if res, err := s.Starter(ctx, "retention", "set", vm, "--keep-last", "1"); err != nil || res.ExitCode != 0 {
		t.Fatalf("retention set: %v %s", err, res)
	}

	// A prune held before its first merge holds the VM's lock.
	if err := gates.Arm(faultpoint.BeforeMerge); err != nil {
		t.Fatal(err)
	}
	prune, err := s.StartStarter("prune", vm, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gates.Wait(ctx, faultpoint.BeforeMerge); err != nil {
		t.Fatal(err)
	}
	res, err := s.Starter(ctx, "backup", vm, "--wait")
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 3 || !strings.Contains(res.Stderr, "a prune of VM") {
		t.Errorf("a backup during a prune: exit %d, want 3 with a message naming the prune: %s", res.ExitCode, res)
	}
	if err := gates.Release(faultpoint.BeforeMerge); err != nil {
		t.Fatal(err)
	}
	pres, err := prune.Wait(ctx)
	if err != nil || pres.ExitCode != 0 {
		t.Fatalf("prune: %v %s", err, pres)
	}
	var pr workflows.PruneResult
	if err := stacktest.DecodeOne(pres.Stdout, &pr); err != nil {
		t.Fatal(err)
	}
	if len(pr.VMs) != 1 || len(pr.VMs[0].Removed) != 2 || len(pr.VMs[0].Kept) != 1 || pr.VMs[0].Kept[0].BackupID != points[2].id {
		t.Fatalf("prune result %+v, want %s kept and two points removed", pr, points[2].id)
	}
	restoresAsBackedUp(ctx, t, s, dir, points[2])

	// One more restore point, so that keep-last 1 has one to remove.
	for _, k := range keys {
		stacktest.WriteDisk(t, l, vm, k, 30*MiB, stacktest.Pattern(uint64(800)+uint64(k), MiB))
	}
	p4 := backup(ctx, t, s, dir, "p4", workflows.ModeIncremental)

	// A backup held mid-transfer holds the lock: a prune leaves the VM
	// alone, names the backup's workflow and exits 1; nothing is removed.
	// Enough data that the transfer reports progress midway (the point
	// holds at about half of a disk's bytes).
	for _, k := range keys {
		stacktest.WriteDisk(t, l, vm, k, 40*MiB, stacktest.Pattern(uint64(900)+uint64(k), 48*MiB))
	}
	if err := gates.Arm(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	bk, err := s.StartStarter("backup", vm, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gates.Wait(ctx, faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	res, err = s.Starter(ctx, "prune", vm, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var during workflows.PruneResult
	if derr := stacktest.DecodeOne(res.Stdout, &during); derr != nil {
		t.Fatalf("prune during a backup: %v %s", derr, res)
	}
	if res.ExitCode != 1 || len(during.Errors) != 1 || !strings.Contains(during.Errors[0], "is running") || during.BytesFreed != 0 {
		t.Errorf("prune during a backup: exit %d, result %+v; want exit 1 and an error naming the running workflow", res.ExitCode, during)
	}
	// The VM is reported skipped, its planned removals apart: "removed"
	// lists only points removed.
	if len(during.VMs) != 1 || during.VMs[0].Status != workflows.PruneStatusSkipped || len(during.VMs[0].Removed) != 0 ||
		len(during.VMs[0].PlannedRemoved) == 0 || !strings.Contains(during.VMs[0].Error, "is running") {
		t.Errorf("prune during a backup: VMs %+v; want one VM skipped, nothing in removed, its plan in planned_removed", during.VMs)
	}
	if err := gates.Release(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	bres, err := bk.Wait(ctx)
	if err != nil || bres.ExitCode != 0 {
		t.Fatalf("the held backup: %v %s", err, bres)
	}
	var b stacktest.BackupJSON
	if err := stacktest.DecodeOne(bres.Stdout, &b); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if m := b.Disk(t, k).Mode; m != workflows.ModeIncremental {
			t.Errorf("the backup after the prune: disk %d is %s, want incremental (built on the merged image)", k, m)
		}
	}
	// keep-last 1: the next prune removes the two older points.
	res, err = s.Starter(ctx, "prune", vm, "--wait", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("prune after the backup: %v %s", err, res)
	}
	var after workflows.PruneResult
	if err := stacktest.DecodeOne(res.Stdout, &after); err != nil {
		t.Fatal(err)
	}
	if len(after.VMs) != 1 || !slices.Equal(removedIDs(after.VMs[0]), []string{p4.id, points[2].id}) {
		t.Errorf("prune after the backup: %+v, want %s and %s removed", after, p4.id, points[2].id)
	}
}
