package workflows

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

// fakeVM is the state the mocked activities act on: what a test then
// asserts against.
type fakeVM struct {
	mu        sync.Mutex
	previous  []activities.PreviousDisk
	queries   []activities.ChangedAreasInput
	transfers []activities.TransferDiskInput
	commits   []activities.CommitInput
	removed   []activities.RemoveSnapshotInput
	failed    []activities.FailBackupInput
	begun     []activities.BeginBackupInput
	closed    []int32
	// spaceChecks are CheckSpace's inputs; snapshots counts CreateSnapshot
	// calls; calls names the activities in the order they ran.
	spaceChecks []activities.CheckSpaceInput
	snapshots   int
	calls       []string
	// prepared are PrepareVM's inputs, allocations AllocatedBytes'.
	prepared    []activities.PrepareVMInput
	allocations []activities.AllocatedBytesInput
	// allocationNone: AllocatedBytes answers for no disk.
	allocationNone bool
	// spaceFull fails CheckSpace with RepositoryFull: before the snapshot
	// ("before"), or after the CBT queries ("after").
	spaceFull string
	// cbtJustEnabled: PrepareVM found CBT off and enabled it.
	cbtJustEnabled bool
	// vcenterUUID is the instance UUID ResolveVM reports for every
	// profile (all name one vCenter); none when empty.
	vcenterUUID string
	// during, when set, runs inside CreateSnapshot and CommitRestorePoint
	// (named), e.g. to cancel the workflow while that step runs.
	during func(ctx context.Context, step string)
}

// workerDefaultProfile is the profile the fake ResolveVM uses when the
// input names none, as a worker uses its configured default.
const workerDefaultProfile = "lab"

func newEnv(t *testing.T, f *fakeVM) *testsuite.TestWorkflowEnvironment {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterWorkflow(BackupVM)
	env.RegisterWorkflow(Backup)
	env.RegisterActivity(&activities.VSphere{})
	env.RegisterActivity(&activities.Transfer{})
	env.RegisterActivity(&activities.Catalog{})
	env.RegisterActivity(&activities.Launcher{})

	env.OnActivity(vsphereActs.ResolveVM, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.ResolveVMInput) (*activities.ResolveVMResult, error) {
			if in.VM != "vm0" && in.VM != "vm-62" {
				return nil, temporal.NewNonRetryableApplicationError("VM "+in.VM+" not found", activities.ErrTypeVMNotFound, nil)
			}
			profile := in.Profile
			if profile == "" {
				profile = workerDefaultProfile
			}
			return &activities.ResolveVMResult{Profile: profile, VMRef: "vm-62", VMUUID: "uuid-0", VMName: "vm0", VCenterUUID: f.vcenterUUID}, nil
		}).Maybe()
	// The VM's disks: 204 holds 300 MiB, 205 is not in its file layout
	// (its allocation unknown: its capacity).
	allocation := map[int32]activities.AllocationDisk{
		204: {Key: 204, Capacity: 1 << 30, AllocatedBytes: 300 << 20},
		205: {Key: 205, Capacity: 2 << 30, AllocatedBytes: 2 << 30, AllocatedUnknown: true},
	}
	env.OnActivity(vsphereActs.PrepareVM, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.PrepareVMInput) (*activities.PrepareVMResult, error) {
			f.mu.Lock()
			f.prepared = append(f.prepared, in)
			f.mu.Unlock()
			res := &activities.PrepareVMResult{
				VMRef: "vm-62", VMName: "vm0", CBTJustEnabled: f.cbtJustEnabled,
				Disks: []activities.VMDisk{{Key: 204, Capacity: 1 << 30, FileName: "[ds] vm0/disk1.vmdk"},
					{Key: 205, Capacity: 2 << 30, FileName: "[ds] vm0/disk2.vmdk"}},
			}
			if !in.SkipAllocation {
				for i, d := range res.Disks {
					res.Disks[i].AllocatedBytes, res.Disks[i].AllocatedUnknown = allocation[d.Key].AllocatedBytes, allocation[d.Key].AllocatedUnknown
				}
			}
			return res, nil
		}).Maybe()
	env.OnActivity(vsphereActs.AllocatedBytes, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.AllocatedBytesInput) (*activities.AllocatedBytesResult, error) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.allocations = append(f.allocations, in)
			f.calls = append(f.calls, "AllocatedBytes")
			res := &activities.AllocatedBytesResult{}
			for _, d := range in.Disks {
				if !f.allocationNone {
					res.Disks = append(res.Disks, allocation[d.Key])
				}
			}
			return res, nil
		}).Maybe()
	env.OnActivity(catalogActs.BeginBackup, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.BeginBackupInput) (*activities.BeginBackupResult, error) {
			f.mu.Lock()
			f.begun = append(f.begun, in)
			f.mu.Unlock()
			return &activities.BeginBackupResult{Previous: f.previous, ClosedChains: f.closed}, nil
		}).Maybe()
	env.OnActivity(transferActs.CheckSpace, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.CheckSpaceInput) (*activities.CheckSpaceResult, error) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.spaceChecks = append(f.spaceChecks, in)
			f.calls = append(f.calls, "CheckSpace")
			if (f.spaceFull == "before" && !in.AfterQuery) || (f.spaceFull == "after" && in.AfterQuery) {
				return nil, temporal.NewNonRetryableApplicationError("repository /repo has 10 MiB free; the backup of VM vm0 needs more",
					activities.ErrTypeRepositoryFull, nil)
			}
			return &activities.CheckSpaceResult{Repository: "/repo", FreeBytes: 1 << 40}, nil
		}).Maybe()
	env.OnActivity(vsphereActs.CreateSnapshot, mock.Anything, mock.Anything).Return(
		func(ctx context.Context, in activities.CreateSnapshotInput) (*activities.CreateSnapshotResult, error) {
			if f.during != nil {
				f.during(ctx, "CreateSnapshot")
			}
			f.mu.Lock()
			f.snapshots++
			f.calls = append(f.calls, "CreateSnapshot")
			f.mu.Unlock()
			return &activities.CreateSnapshotResult{SnapshotRef: "snapshot-1", SnapshotName: "cbtflow-" + in.BackupID,
				Disks: []activities.SnapshotDisk{
					{Key: 204, Capacity: 1 << 30, FileName: "[ds] vm0/disk1.vmdk", ChangeID: "52 aa/2"},
					{Key: 205, Capacity: 2 << 30, FileName: "[ds] vm0/disk2.vmdk", ChangeID: "52 bb/2"},
				}}, nil
		}).Maybe()
	env.OnActivity(vsphereActs.RemoveSnapshot, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.RemoveSnapshotInput) error {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.removed = append(f.removed, in)
			return nil
		}).Maybe()
	env.OnActivity(catalogActs.CommitRestorePoint, mock.Anything, mock.Anything).Return(
		func(ctx context.Context, in activities.CommitInput) error {
			if f.during != nil {
				f.during(ctx, "CommitRestorePoint")
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			f.commits = append(f.commits, in)
			return nil
		}).Maybe()
	env.OnActivity(catalogActs.FailBackup, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.FailBackupInput) error {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.failed = append(f.failed, in)
			return nil
		}).Maybe()
	return env
}

func (f *fakeVM) changedAreas(reset map[string]bool) func(context.Context, activities.ChangedAreasInput) (*activities.ChangedAreasResult, error) {
	return func(_ context.Context, in activities.ChangedAreasInput) (*activities.ChangedAreasResult, error) {
		f.mu.Lock()
		f.queries = append(f.queries, in)
		f.calls = append(f.calls, "ChangedAreas")
		f.mu.Unlock()
		if reset[in.ChangeID] {
			return nil, temporal.NewNonRetryableApplicationError("change ID refused (InvalidArgument)", activities.ErrTypeCBTReset, nil)
		}
		changed := int64(1 << 20)
		if in.ChangeID == "*" {
			changed = 8 << 20
		}
		return &activities.ChangedAreasResult{ExtentsFile: "/repo/.staging/x/" + string(rune('0'+in.Key%10)), Extents: 3, ChangedBytes: changed}, nil
	}
}

func (f *fakeVM) transferOK(_ context.Context, in activities.TransferDiskInput) (*activities.TransferDiskResult, error) {
	f.mu.Lock()
	f.transfers = append(f.transfers, in)
	f.calls = append(f.calls, "TransferDisk")
	f.mu.Unlock()
	return &activities.TransferDiskResult{Path: "/repo/" + in.BackupID + ".qcow2", WrittenBytes: in.ChangedBytes,
		SizeBytes: in.ChangedBytes + 1<<16, SHA256: strings.Repeat("ab", 32)}, nil
}

func TestBackupVMFull(t *testing.T) {
	f := &fakeVM{}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	var res BackupVMResult
	if err := env.GetWorkflowResult(&res); err != nil {
		t.Fatal(err)
	}
	if len(res.Disks) != 2 || res.Disks[0].Mode != ModeFull || res.Disks[1].Mode != ModeFull ||
		res.Disks[0].ChangeID != "52 aa/2" || res.Disks[1].ChangeID != "52 bb/2" {
		t.Errorf("result = %+v", res)
	}
	for _, q := range f.queries {
		if q.ChangeID != "*" || q.SnapshotRef != "snapshot-1" {
			t.Errorf("full backup queried %+v", q)
		}
	}
	if len(f.commits) != 1 || len(f.commits[0].Disks) != 2 {
		t.Fatalf("commits = %+v", f.commits)
	}
	for _, d := range f.commits[0].Disks {
		if d.ChangeID == "" || d.ChangeIDFrom != "" || d.Mode != ModeFull || d.SHA256 == "" {
			t.Errorf("committed disk %+v", d)
		}
	}
	if len(f.removed) != 1 || f.removed[0].SnapshotRef != "snapshot-1" {
		t.Errorf("snapshot removals = %+v", f.removed)
	}
	if len(f.failed) != 0 {
		t.Errorf("a completed backup was marked failed: %+v", f.failed)
	}
}

func TestBackupVMIncremental(t *testing.T) {
	f := &fakeVM{previous: []activities.PreviousDisk{
		{Key: 204, BackupID: "b0", Capacity: 1 << 30, ChangeID: "52 aa/1", Path: "/repo/204/b0.qcow2", ChainLength: 1},
		{Key: 205, BackupID: "b0", Capacity: 2 << 30, ChangeID: "52 bb/1", Path: "/repo/205/b0.qcow2", ChainLength: 1},
	}}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	for _, tr := range f.transfers {
		if tr.Mode != ModeIncremental || !strings.HasSuffix(tr.BackingPath, "/b0.qcow2") {
			t.Errorf("transfer %+v", tr)
		}
	}
	want := map[int32]string{204: "52 aa/1", 205: "52 bb/1"}
	for _, q := range f.queries {
		if q.ChangeID != want[q.Key] {
			t.Errorf("disk %d queried from %q, want %q", q.Key, q.ChangeID, want[q.Key])
		}
	}
	for _, d := range f.commits[0].Disks {
		if d.BackingBackupID != "b0" || d.ChangeIDFrom != want[d.Key] {
			t.Errorf("committed %+v", d)
		}
	}
	// No disk is backed up full: the disks' allocation is not read.
	if len(f.prepared) != 1 || !f.prepared[0].SkipAllocation || len(f.allocations) != 0 {
		t.Errorf("PrepareVM got %+v, AllocatedBytes %+v: want the allocation skipped and not read", f.prepared, f.allocations)
	}
}

// An invalid change ID on the first query means CBT was reset: that disk
// falls back to a full backup, the other stays incremental, and the result
// says so.
func TestBackupVMCBTResetFallsBackToFull(t *testing.T) {
	f := &fakeVM{previous: []activities.PreviousDisk{
		{Key: 204, BackupID: "b0", Capacity: 1 << 30, ChangeID: "52 aa/1", Path: "/repo/204/b0.qcow2", ChainLength: 1},
		{Key: 205, BackupID: "b0", Capacity: 2 << 30, ChangeID: "52 bb/1", Path: "/repo/205/b0.qcow2", ChainLength: 1},
	}}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(map[string]bool{"52 aa/1": true}))
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	var res BackupVMResult
	_ = env.GetWorkflowResult(&res)
	modes := map[int32]string{}
	for _, d := range res.Disks {
		modes[d.Key] = d.Mode
	}
	if modes[204] != ModeFull || modes[205] != ModeIncremental {
		t.Errorf("modes = %v", modes)
	}
	if len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "disk 204") || !strings.Contains(res.Warnings[0], "reset") {
		t.Errorf("warnings = %q", res.Warnings)
	}
	var star bool
	for _, q := range f.queries {
		star = star || (q.Key == 204 && q.ChangeID == "*")
	}
	if !star {
		t.Errorf("disk 204 was not queried with *: %+v", f.queries)
	}
	for _, tr := range f.transfers {
		if tr.Key == 204 && (tr.Mode != ModeFull || tr.BackingPath != "") {
			t.Errorf("disk 204 transfer %+v", tr)
		}
	}
	for _, d := range f.commits[0].Disks {
		if d.Key == 204 && (d.BackingBackupID != "" || d.ChangeIDFrom != "" || d.Note == "") {
			t.Errorf("disk 204 committed as %+v", d)
		}
	}
}

// A query that fails for another reason than a refused change ID (here the
// SystemError of a vCenter that failed internally, ErrTypeCBTQuery) fails
// the backup: the disk does not fall back to a full backup, which only a
// CBT reset justifies, and the stored change ID stays the one to resume from.
func TestBackupVMCBTQueryFailureFailsBackup(t *testing.T) {
	f := &fakeVM{previous: []activities.PreviousDisk{
		{Key: 204, BackupID: "b0", Capacity: 1 << 30, ChangeID: "52 aa/1", Path: "/repo/204/b0.qcow2", ChainLength: 1},
		{Key: 205, BackupID: "b0", Capacity: 2 << 30, ChangeID: "52 bb/1", Path: "/repo/205/b0.qcow2", ChainLength: 1},
	}}
	env := newEnv(t, f)
	ok := f.changedAreas(nil)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(
		func(ctx context.Context, in activities.ChangedAreasInput) (*activities.ChangedAreasResult, error) {
			if in.Key == 204 {
				f.mu.Lock()
				f.queries = append(f.queries, in)
				f.mu.Unlock()
				return nil, temporal.NewNonRetryableApplicationError("disk 204: changed areas since "+in.ChangeID+
					": SystemError: lab: disk 204 of snapshot snapshot-1 was not frozen", activities.ErrTypeCBTQuery, nil)
			}
			return ok(ctx, in)
		})
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	err := env.GetWorkflowError()
	// The workflow wraps the disk's error ("disk 204: ..."): the
	// activity's type is in the chain, not at its head.
	if err == nil || !strings.Contains(err.Error(), "type: "+activities.ErrTypeCBTQuery) || !strings.Contains(err.Error(), "SystemError") {
		t.Fatalf("error = %v, want the disk's failed query", err)
	}
	for _, q := range f.queries {
		if q.Key == 204 && q.ChangeID != "52 aa/1" {
			t.Errorf("disk 204 queried from %q after a failed query: a full backup of it began", q.ChangeID)
		}
	}
	for _, tr := range f.transfers {
		if tr.Key == 204 {
			t.Errorf("disk 204 transferred after its query failed: %+v", tr)
		}
	}
	if len(f.commits) != 0 || len(f.removed) != 1 || len(f.failed) != 1 {
		t.Errorf("commits %+v, snapshot removals %+v, fails %+v", f.commits, f.removed, f.failed)
	}
}

func TestBackupVMTransferFailsForGood(t *testing.T) {
	f := &fakeVM{}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	onTransfers(env,
		func(ctx context.Context, in activities.TransferDiskInput) (*activities.TransferDiskResult, error) {
			if in.Key == 205 {
				return nil, temporal.NewNonRetryableApplicationError("no space left on device", activities.ErrTypeNoSpace, nil)
			}
			return f.transferOK(ctx, in)
		})
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	err := env.GetWorkflowError()
	if err == nil || !strings.Contains(err.Error(), "no space") {
		t.Fatalf("error = %v", err)
	}
	if len(f.commits) != 0 {
		t.Errorf("committed after a failed transfer: %+v", f.commits)
	}
	if len(f.removed) != 1 {
		t.Errorf("snapshot removals = %+v", f.removed)
	}
	if len(f.failed) != 1 || f.failed[0].BackupID != "b1" || !strings.Contains(f.failed[0].Reason, "no space") {
		t.Errorf("fail calls = %+v", f.failed)
	}
}

// A cancel while the disks transfer: the transfers see their context
// canceled, the snapshot is removed and the backup is marked failed,
// nothing is committed.
func TestBackupVMCanceledMidTransfer(t *testing.T) {
	f := &fakeVM{}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	var started atomic.Int32
	var once sync.Once
	// notCanceled bounds the wait for the cancel: well under the test
	// environment's timeout, so that a cancel that never arrives fails
	// the test with a message instead of a panic.
	const notCanceled = 10 * time.Second
	env.SetTestTimeout(3 * notCanceled)
	onTransfers(env,
		func(ctx context.Context, in activities.TransferDiskInput) (*activities.TransferDiskResult, error) {
			started.Add(1)
			// Cancel the workflow once a transfer runs: a callback of the
			// test environment, registered now, so it can only fire while
			// this transfer blocks below (the environment's clock does not
			// skip ahead while an activity runs).
			once.Do(func() { env.RegisterDelayedCallback(env.CancelWorkflow, 100*time.Millisecond) })
			deadline := time.NewTimer(notCanceled)
			defer deadline.Stop()
			beat := time.NewTicker(200 * time.Millisecond)
			defer beat.Stop()
			for {
				select {
				case <-ctx.Done():
					return nil, ctx.Err()
				case <-beat.C:
					activity.RecordHeartbeat(ctx)
				case <-deadline.C:
					// Non-retryable: a retry would only wait again.
					return nil, temporal.NewNonRetryableApplicationError("transfer of disk "+strconv.Itoa(int(in.Key))+
						" not canceled within "+notCanceled.String(), "NotCanceled", nil)
				}
			}
		})
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	err := env.GetWorkflowError()
	var canceled *temporal.CanceledError
	if !errors.As(err, &canceled) {
		t.Fatalf("error = %v, want canceled", err)
	}
	if started.Load() == 0 {
		t.Error("no transfer started before the cancel")
	}
	if len(f.removed) != 1 {
		t.Errorf("snapshot removals after cancel = %+v", f.removed)
	}
	if len(f.commits) != 0 || len(f.failed) != 1 {
		t.Errorf("commits %+v, fails %+v", f.commits, f.failed)
	}
}

// A cancel that arrives while the snapshot is taken or the restore point
// committed does not interrupt that step: canceled during the snapshot,
// the backup removes the snapshot it took (by its moref) and copies
// nothing; canceled during the commit, the backup ends committed, as the
// catalog then says, never canceled with a committed restore point.
func TestBackupVMCancelDuringSnapshotOrCommit(t *testing.T) {
	for _, step := range []string{"CreateSnapshot", "CommitRestorePoint"} {
		t.Run(step, func(t *testing.T) {
			f := &fakeVM{}
			env := newEnv(t, f)
			env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil)).Maybe()
			onTransfers(env, f.transferOK)
			f.during = func(ctx context.Context, s string) {
				if s != step {
					return
				}
				// Cancel now, and hold the step a moment (a heartbeat
				// would deliver the cancel to an activity that listens).
				env.RegisterDelayedCallback(env.CancelWorkflow, 0)
				select {
				case <-ctx.Done():
				case <-time.After(500 * time.Millisecond):
				}
			}
			env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
			err := env.GetWorkflowError()
			switch step {
			case "CreateSnapshot":
				var canceled *temporal.CanceledError
				if !errors.As(err, &canceled) {
					t.Fatalf("canceled during the snapshot: error %v, want canceled", err)
				}
				if len(f.removed) != 1 || f.removed[0].SnapshotRef != "snapshot-1" || len(f.transfers) != 0 || len(f.commits) != 0 || len(f.failed) != 1 {
					t.Errorf("canceled during the snapshot: removed %+v, transfers %d, commits %d, failed %d; want the snapshot removed by moref, nothing copied or committed",
						f.removed, len(f.transfers), len(f.commits), len(f.failed))
				}
			case "CommitRestorePoint":
				var res BackupVMResult
				if err != nil || env.GetWorkflowResult(&res) != nil || len(res.Disks) != 2 {
					t.Fatalf("canceled during the commit: error %v, result %+v; want the committed restore point", err, res)
				}
				if len(f.commits) != 1 || len(f.failed) != 0 || len(f.removed) != 1 {
					t.Errorf("canceled during the commit: commits %d, failed %d, removed %d", len(f.commits), len(f.failed), len(f.removed))
				}
			}
		})
	}
}

func TestBackupVMIncrementalWithoutHistoryFails(t *testing.T) {
	f := &fakeVM{}
	env := newEnv(t, f)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1", Mode: ModeIncremental})
	err := env.GetWorkflowError()
	if !isType(err, activities.ErrTypeNoRestorePoint) || !strings.Contains(err.Error(), "no previous restore point") {
		t.Fatalf("error = %v", err)
	}
	if len(f.removed) != 0 || len(f.failed) != 1 {
		t.Errorf("removed %+v failed %+v", f.removed, f.failed)
	}
}

func TestBackupRejectsBadInput(t *testing.T) {
	for _, in := range []BackupInput{{VM: ""}, {VM: "vm0", Mode: "sometimes"}} {
		env := newEnv(t, &fakeVM{})
		env.ExecuteWorkflow(Backup, in)
		err := env.GetWorkflowError()
		if !isType(err, activities.ErrTypeInvalidInput) {
			t.Errorf("%+v: error = %v", in, err)
		}
	}
	env := newEnv(t, &fakeVM{})
	env.ExecuteWorkflow(Backup, BackupInput{VM: "nosuchvm"})
	if err := env.GetWorkflowError(); !isType(err, activities.ErrTypeVMNotFound) || !strings.Contains(err.Error(), "nosuchvm") {
		t.Errorf("unknown VM: %v", err)
	}
}

// The per-VM workflow ID names the vCenter by its instance UUID, so every
// profile of one vCenter starts the VM's backup under the same ID (and
// Temporal refuses the second while one runs), while the backup itself
// keeps the profile it was asked under. Without an instance UUID (a
// standalone ESXi host) and on replay of a run recorded before the change
// (GetVersion answers DefaultVersion), the ID names the profile.
func TestBackupStartsChildUnderVMWorkflowID(t *testing.T) {
	const vc = "4b1d6a2e-52c0-4b8e-9d0c-3f5e2a1b7c90"
	for _, c := range []struct {
		name        string
		vcenterUUID string
		profile     string
		old         bool // replaying a run recorded before the change
		want        string
	}{
		{"profile lab", vc, "", false, "backup/" + vc + "/uuid-0"},
		{"profile alias of the same vCenter", vc, "alias", false, "backup/" + vc + "/uuid-0"},
		{"no instance UUID", "", "esx1", false, "backup/esx1/uuid-0"},
		{"recorded before the change", vc, "alias", true, "backup/alias/uuid-0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &fakeVM{vcenterUUID: c.vcenterUUID}
			env := newEnv(t, f)
			env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
			onTransfers(env, f.transferOK)
			if c.old {
				// A run that old has none of the later changes either.
				env.OnGetVersion(changeDetachedStart, workflow.DefaultVersion, versionDetachedStart).Return(workflow.DefaultVersion)
				env.OnGetVersion(changeLocalSteps, workflow.DefaultVersion, versionLocalSteps).Return(workflow.DefaultVersion)
				env.OnGetVersion(changeVCenterWorkflowID, workflow.DefaultVersion, versionVCenterWorkflowID).Return(workflow.DefaultVersion)
			}
			env.ExecuteWorkflow(Backup, BackupInput{VM: "vm-62", Profile: c.profile})
			if err := env.GetWorkflowError(); err != nil {
				t.Fatal(err)
			}
			var res BackupResult
			if err := env.GetWorkflowResult(&res); err != nil {
				t.Fatal(err)
			}
			if res.WorkflowID != c.want || res.Result == nil || res.Result.BackupID != res.BackupID || len(res.Result.Disks) != 2 {
				t.Errorf("result = %+v, want workflow %s", res, c.want)
			}
			// The child ran under that ID, and for the profile it was
			// asked under: its catalog row and repository paths are the
			// profile's.
			profile := c.profile
			if profile == "" {
				profile = workerDefaultProfile
			}
			if len(f.begun) != 1 || f.begun[0].WorkflowID != c.want || f.begun[0].Profile != profile {
				t.Errorf("BeginBackup got %+v, want workflow %s, profile %s", f.begun, c.want, profile)
			}
			for _, tr := range f.transfers {
				if tr.Profile != profile {
					t.Errorf("transfer of disk %d under profile %q, want %q", tr.Key, tr.Profile, profile)
				}
			}
		})
	}
}

// A detached Backup (the starter's) starts its BackupVM through the
// client, in a local activity, and ends: the start names the canonical
// workflow ID, BackupVM's type and input, the search attributes a child
// gets, the Backup in its memo, and the Backup's run ID as its request ID
// (a start run again finds its own). A run of that ID started otherwise
// is the VM's running backup: refused (ErrTypeAlreadyRunning), or, with
// SkipIfRunning, skipped. Replaying a run recorded before the change,
// Backup starts the child as it did.
func TestBackupDetachedStartsBackupVM(t *testing.T) {
	const vc = "4b1d6a2e-52c0-4b8e-9d0c-3f5e2a1b7c90"
	const wid = "backup/" + vc + "/uuid-0"
	for _, c := range []struct {
		name    string
		running bool // another BackupVM of the VM runs
		skip    bool
		old     bool // replaying a run recorded before the change
	}{
		{name: "started"},
		{name: "already running", running: true},
		{name: "skipped", running: true, skip: true},
		{name: "recorded before the change", old: true},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &fakeVM{vcenterUUID: vc}
			env := newEnv(t, f)
			env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
			onTransfers(env, f.transferOK)
			var starts []activities.StartWorkflowInput
			env.OnActivity(launcherActs.StartWorkflow, mock.Anything, mock.Anything).Return(
				func(_ context.Context, in activities.StartWorkflowInput) (*activities.StartWorkflowResult, error) {
					starts = append(starts, in)
					if c.running {
						return &activities.StartWorkflowResult{RunID: "other-run", Running: true}, nil
					}
					return &activities.StartWorkflowResult{RunID: "run-1"}, nil
				})
			if c.old {
				env.OnGetVersion(changeDetachedStart, workflow.DefaultVersion, versionDetachedStart).Return(workflow.DefaultVersion)
			}
			env.SetStartWorkflowOptions(client.StartWorkflowOptions{ID: "backup-start-1"})
			env.ExecuteWorkflow(Backup, BackupInput{VM: "vm-62", Detach: true, SkipIfRunning: c.skip})
			var res BackupResult
			err := env.GetWorkflowError()
			if err == nil {
				err = env.GetWorkflowResult(&res)
			}
			switch {
			case c.old:
				if err != nil || len(starts) != 0 || len(f.begun) != 1 || f.begun[0].WorkflowID != wid || res.WorkflowID != wid {
					t.Fatalf("replayed: %v, %+v; launcher starts %d, BackupVM runs %+v: want the child under %s", err, res, len(starts), f.begun, wid)
				}
				return
			case c.running && c.skip:
				if err != nil || res.Skipped == "" || res.WorkflowID != wid || res.RunID != "" {
					t.Fatalf("skipped: %v, %+v, want a skipped result naming %s", err, res, wid)
				}
			case c.running:
				var app *temporal.ApplicationError
				if !errors.As(err, &app) || app.Type() != ErrTypeAlreadyRunning || !strings.Contains(err.Error(), wid) {
					t.Fatalf("already running: %v, want %s naming %s", err, ErrTypeAlreadyRunning, wid)
				}
			default:
				if err != nil || res.WorkflowID != wid || res.RunID != "run-1" || res.BackupID == "" || res.Result != nil || res.VM == "" {
					t.Fatalf("started: %v, %+v, want BackupVM %s run run-1, not waited for", err, res, wid)
				}
			}
			if len(f.begun) != 0 {
				t.Errorf("BackupVM ran in the Backup's test environment (%+v): it was started as a child", f.begun)
			}
			if len(starts) != 1 {
				t.Fatalf("%d starts, want 1", len(starts))
			}
			st := starts[0]
			var arg BackupVMInput
			if err := json.Unmarshal(st.Arg, &arg); err != nil {
				t.Fatal(err)
			}
			if st.WorkflowID != wid || st.WorkflowType != "BackupVM" || st.TaskQueue != TaskQueue || st.RequestID == "" || st.RequestID != st.Memo[MemoStartedByRunID] ||
				arg.VMUUID != "uuid-0" || arg.Profile != workerDefaultProfile || arg.BackupID == "" || arg.Mode != ModeAuto {
				t.Errorf("the start: %+v (argument %+v)", st, arg)
			}
			if st.Keywords[SearchBackupID.GetName()] != arg.BackupID || st.Keywords[SearchVM.GetName()] == "" ||
				st.Keywords[SearchMode.GetName()] != ModeAuto || st.Keywords[SearchVCenter.GetName()] != workerDefaultProfile {
				t.Errorf("the start's search attributes: %v", st.Keywords)
			}
			if st.Memo[MemoStartedByWorkflowID] != "backup-start-1" || st.Memo[MemoStartedByRunID] == "" {
				t.Errorf("the start's memo: %v, want the Backup backup-start-1 and its run", st.Memo)
			}
		})
	}
}

func TestPlanDisks(t *testing.T) {
	disks := []activities.VMDisk{{Key: 1, Capacity: 100}, {Key: 2, Capacity: 200}, {Key: 3, Capacity: 300}}
	prev := []activities.PreviousDisk{
		{Key: 1, BackupID: "b0", Capacity: 100, ChangeID: "u/1", Path: "/r/1/b0.qcow2", ChainLength: 1},
		{Key: 2, BackupID: "b0", Capacity: 150, ChangeID: "u/1", Path: "/r/2/b0.qcow2", ChainLength: 1},
	}
	plans, err := planDisks(ModeAuto, disks, prev, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	if plans[0].Mode != ModeIncremental || plans[0].FromChangeID != "u/1" || plans[0].BackingPath != "/r/1/b0.qcow2" {
		t.Errorf("disk 1: %+v", plans[0])
	}
	if plans[1].Mode != ModeFull || !strings.Contains(plans[1].Reason, "size changed") {
		t.Errorf("grown disk 2: %+v", plans[1])
	}
	if plans[2].Mode != ModeFull || plans[2].Reason != "no previous restore point" {
		t.Errorf("new disk 3: %+v", plans[2])
	}
	if plans, _ := planDisks(ModeFull, disks, prev, false, 0); plans[0].Mode != ModeFull {
		t.Errorf("full mode: %+v", plans[0])
	}
	if plans, _ := planDisks(ModeAuto, disks, prev, true, 0); plans[0].Mode != ModeFull {
		t.Errorf("CBT just enabled: %+v", plans[0])
	}
	long := []activities.PreviousDisk{{Key: 1, BackupID: "b9", Capacity: 100, ChangeID: "u/9", Path: "/r", ChainLength: 5}}
	if plans, _ := planDisks(ModeAuto, disks[:1], long, false, 5); plans[0].Mode != ModeFull || !strings.Contains(plans[0].Reason, "chain") {
		t.Errorf("long chain: %+v", plans[0])
	}
	if _, err := planDisks(ModeIncremental, disks, prev, false, 0); err == nil || !strings.Contains(err.Error(), "disk 2") {
		t.Errorf("incremental with a grown disk: %v", err)
	}
	if plans, err := planDisks(ModeIncremental, disks[:1], prev, false, 0); err != nil || plans[0].Mode != ModeIncremental {
		t.Errorf("incremental: %+v %v", plans, err)
	}
}

func TestBackupVMReportsClosedChains(t *testing.T) {
	f := &fakeVM{closed: []int32{206}}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	if len(f.begun) != 1 || len(f.begun[0].DiskKeys) != 2 || f.begun[0].DiskKeys[0] != 204 || f.begun[0].DiskKeys[1] != 205 {
		t.Errorf("BeginBackup got %+v", f.begun)
	}
	var res BackupVMResult
	_ = env.GetWorkflowResult(&res)
	if len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "disk 206 was removed") {
		t.Errorf("warnings = %q", res.Warnings)
	}
}

// CBT found off (and enabled by PrepareVM) breaks the chains like a reset:
// every disk with a previous restore point is backed up in full, with a
// warning naming it and a note; a disk without one gets no warning.
func TestBackupVMCBTJustEnabledWarns(t *testing.T) {
	f := &fakeVM{cbtJustEnabled: true, previous: []activities.PreviousDisk{
		{Key: 204, BackupID: "b0", Capacity: 1 << 30, ChangeID: "52 aa/1", Path: "/repo/204/b0.qcow2", ChainLength: 1},
	}}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	onTransfers(env, f.transferOK)
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1"})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	var res BackupVMResult
	_ = env.GetWorkflowResult(&res)
	for _, d := range res.Disks {
		if d.Mode != ModeFull || d.Note == "" {
			t.Errorf("disk %d: mode %s, note %q", d.Key, d.Mode, d.Note)
		}
	}
	if len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "disk 204") || !strings.Contains(res.Warnings[0], "enabled again") {
		t.Errorf("warnings = %q", res.Warnings)
	}
	for _, q := range f.queries {
		if q.ChangeID != "*" {
			t.Errorf("disk %d queried from %q, want *", q.Key, q.ChangeID)
		}
	}
}

// transferFunc is a TransferDisk mock.
type transferFunc = func(context.Context, activities.TransferDiskInput) (*activities.TransferDiskResult, error)

// onTransfers mocks the transfers with fn: TransferDisk (runs recorded
// before changeOneTransfer) and TransferDisks, which runs fn for each
// disk, MaxParallel at a time, and fails with the first disk's error,
// the others canceled, as the activity does.
func onTransfers(env *testsuite.TestWorkflowEnvironment, fn transferFunc) {
	env.OnActivity(transferActs.TransferDisk, mock.Anything, mock.Anything).Return(fn).Maybe()
	env.OnActivity(transferActs.TransferDisks, mock.Anything, mock.Anything).Return(
		func(ctx context.Context, in activities.TransferDisksInput) (*activities.TransferDisksResult, error) {
			dctx, cancel := context.WithCancel(ctx)
			defer cancel()
			out := &activities.TransferDisksResult{Disks: make([]activities.TransferDiskResult, len(in.Disks))}
			sem := make(chan struct{}, max(in.MaxParallel, 1))
			var wg sync.WaitGroup
			var mu sync.Mutex
			var first error
			for i, d := range in.Disks {
				wg.Go(func() {
					sem <- struct{}{}
					defer func() { <-sem }()
					if dctx.Err() != nil {
						return
					}
					r, err := fn(dctx, d)
					mu.Lock()
					defer mu.Unlock()
					if err != nil {
						if first == nil {
							first = err
						}
						cancel()
						return
					}
					out.Disks[i] = *r
				})
			}
			wg.Wait()
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if first != nil {
				return nil, first
			}
			return out, nil
		}).Maybe()
}

// A backup transfers its disks in one activity (changeOneTransfer): one
// TransferDisks with every disk, as TransferDisk would have had each, and
// MaxParallelDisks; the result and the commit name each disk's image.
func TestBackupVMOneTransfer(t *testing.T) {
	f := &fakeVM{}
	env := newEnv(t, f)
	env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
	var calls []activities.TransferDisksInput
	onTransfers(env, f.transferOK)
	env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, args converter.EncodedValues) {
		if info.ActivityType.Name == "TransferDisk" {
			t.Errorf("a TransferDisk ran")
		}
		if info.ActivityType.Name != "TransferDisks" {
			return
		}
		var in activities.TransferDisksInput
		if err := args.Get(&in); err != nil {
			t.Error(err)
		}
		calls = append(calls, in)
	})
	env.ExecuteWorkflow(BackupVM, BackupVMInput{Profile: "lab", VMUUID: "uuid-0", BackupID: "b1", MaxParallelDisks: 3})
	if err := env.GetWorkflowError(); err != nil {
		t.Fatal(err)
	}
	if len(calls) != 1 || len(calls[0].Disks) != 2 || calls[0].MaxParallel != 3 {
		t.Fatalf("TransferDisks calls %+v: want one, of both disks, 3 at once", calls)
	}
	for i, key := range []int32{204, 205} {
		d := calls[0].Disks[i]
		if d.Key != key || d.BackupID != "b1" || d.Mode != ModeFull || d.SnapshotRef == "" || d.ExtentsFile == "" || d.FileName == "" {
			t.Errorf("disk %d's transfer: %+v", key, d)
		}
	}
	if len(f.commits) != 1 || len(f.commits[0].Disks) != 2 || f.commits[0].Disks[0].Key != 204 || f.commits[0].Disks[1].Key != 205 ||
		f.commits[0].Disks[0].SHA256 == "" {
		t.Errorf("commits %+v", f.commits)
	}
}

// TransferDisks of 5 disks, 2 at a time, has TransferDisk's limits for
// each of its 3 rounds and its 8 attempts for each disk.
func TestTransfersActivityOptions(t *testing.T) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterWorkflowWithOptions(func(ctx workflow.Context) (string, error) {
		o := workflow.GetActivityOptions(withTransfersActivity(ctx, 5, 2))
		one := workflow.GetActivityOptions(withTransferActivity(ctx))
		return fmt.Sprintf("%v %v %d %v %d", o.StartToCloseTimeout, o.ScheduleToCloseTimeout, o.RetryPolicy.MaximumAttempts,
			o.HeartbeatTimeout, one.RetryPolicy.MaximumAttempts), nil
	}, workflow.RegisterOptions{Name: "options"})
	env.ExecuteWorkflow("options")
	var got string
	if err := env.GetWorkflowResult(&got); err != nil {
		t.Fatal(err)
	}
	if want := "72h0m0s 144h0m0s 40 15s 8"; got != want {
		t.Errorf("options %q, want %q", got, want)
	}
}
