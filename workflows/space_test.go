package workflows

import (
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/mock"

	"github.com/cbtflow/cbtflow/activities"
)

// The space check runs before the snapshot, with each full disk's
// allocated bytes (its capacity when unknown) and each incremental's
// estimate, and again, exactly, after every disk's CBT query and before
// the first transfer.
func TestBackupVMSpaceCheckOrder(t *testing.T) {
	f := &fakeVM{previous: []activities.PreviousDisk{
		{Key: 204, BackupID: "b0", Capacity: 1 << 30, ChangeID: "52 aa/1", Path: "/repo/204/b0.qcow2", ChainLength: 3,
			RecentChangedBytes: 40 << 20, RecentIncrementals: 2},
	}}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	want := []string{"AllocatedBytes", "CheckSpace", "CreateSnapshot", "ChangedAreas", "ChangedAreas", "CheckSpace", "TransferDisk", "TransferDisk"}
	if !slices.Equal(f.calls, want) {
		t.Errorf("activities ran %v, want %v", f.calls, want)
	}
	// The allocation is read for the full disk only, PrepareVM having
	// left it out.
	wantAlloc := []activities.AllocationDisk{{Key: 205, Capacity: 2 << 30}}
	if len(f.prepared) != 1 || !f.prepared[0].SkipAllocation || len(f.allocations) != 1 ||
		f.allocations[0].VMRef != "vm-62" || f.allocations[0].Profile != "lab" || !slices.Equal(f.allocations[0].Disks, wantAlloc) {
		t.Errorf("PrepareVM got %+v, AllocatedBytes %+v: want the allocation skipped, then read for %+v", f.prepared, f.allocations, wantAlloc)
	}
	if len(f.spaceChecks) != 2 {
		t.Fatalf("space checks %+v", f.spaceChecks)
	}
	before, after := f.spaceChecks[0], f.spaceChecks[1]
	wantBefore := []activities.SpaceDisk{
		{Key: 204, Mode: ModeIncremental, Bytes: 40 << 20, Basis: activities.SpaceEstimated, Incrementals: 2},
		{Key: 205, Mode: ModeFull, Bytes: 2 << 30, Basis: activities.SpaceCapacity},
	}
	if before.AfterQuery || before.VMName != "vm0" || before.BackupID != "b1" || !slices.Equal(before.Disks, wantBefore) {
		t.Errorf("check before the snapshot %+v, want disks %+v", before, wantBefore)
	}
	wantAfter := []activities.SpaceDisk{
		{Key: 204, Mode: ModeIncremental, Bytes: 1 << 20, Basis: activities.SpaceChanged},
		{Key: 205, Mode: ModeFull, Bytes: 8 << 20, Basis: activities.SpaceChanged},
	}
	if !after.AfterQuery || !slices.Equal(after.Disks, wantAfter) {
		t.Errorf("check after the queries %+v, want disks %+v", after, wantAfter)
	}
}

// A repository too small before the snapshot fails the backup with
// RepositoryFull: no snapshot, no query, no transfer, nothing to remove;
// the backup is marked failed with the reason.
func TestBackupVMRepositoryFullBeforeSnapshot(t *testing.T) {
	f := &fakeVM{spaceFull: "before"}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil)).Maybe()
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	err := env.GetWorkflowError()
	if err == nil || !isType(err, activities.ErrTypeRepositoryFull) {
		t.Fatalf("error %v, want %s", err, activities.ErrTypeRepositoryFull)
	}
	if f.snapshots != 0 || len(f.queries) != 0 || len(f.transfers) != 0 || len(f.removed) != 0 || len(f.commits) != 0 {
		t.Errorf("snapshots %d, queries %d, transfers %d, removals %+v, commits %d: want none",
			f.snapshots, len(f.queries), len(f.transfers), f.removed, len(f.commits))
	}
	if len(f.failed) != 1 || !strings.Contains(f.failed[0].Reason, "repository /repo has 10 MiB free") {
		t.Errorf("failed %+v, want one with the check's message", f.failed)
	}
	var full bool
	for _, d := range f.spaceChecks[0].Disks {
		full = full || (d.Key == 204 && d.Mode == ModeFull && d.Bytes == 300<<20 && d.Basis == activities.SpaceAllocated)
	}
	if !full {
		t.Errorf("check %+v: disk 204 should need its 300 MiB allocated", f.spaceChecks[0])
	}
}

// Exact changed bytes that do not fit fail the backup after the queries:
// nothing is copied, the snapshot is removed.
func TestBackupVMRepositoryFullAfterQuery(t *testing.T) {
	f := &fakeVM{spaceFull: "after"}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	if err := env.GetWorkflowError(); err == nil || !isType(err, activities.ErrTypeRepositoryFull) {
		t.Fatalf("error %v, want %s", err, activities.ErrTypeRepositoryFull)
	}
	if f.snapshots != 1 || len(f.queries) != 2 || len(f.transfers) != 0 || len(f.commits) != 0 {
		t.Errorf("snapshots %d, queries %d, transfers %d, commits %d", f.snapshots, len(f.queries), len(f.transfers), len(f.commits))
	}
	if len(f.removed) != 1 || f.removed[0].SnapshotRef != "snapshot-1" || len(f.failed) != 1 {
		t.Errorf("removals %+v, failed %+v: want the snapshot removed and the backup failed", f.removed, f.failed)
	}
}

// A full disk that AllocatedBytes does not answer for counts with its
// capacity, as one the VM's file layout does not know: never as empty.
func TestBackupVMAllocationNotAnswered(t *testing.T) {
	f := &fakeVM{allocationNone: true}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	want := []activities.SpaceDisk{
		{Key: 204, Mode: ModeFull, Bytes: 1 << 30, Basis: activities.SpaceCapacity},
		{Key: 205, Mode: ModeFull, Bytes: 2 << 30, Basis: activities.SpaceCapacity},
	}
	if len(f.spaceChecks) == 0 || !slices.Equal(f.spaceChecks[0].Disks, want) {
		t.Errorf("check before the snapshot %+v, want disks %+v", f.spaceChecks, want)
	}
}
