package snapshotfaults

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/lab/labapi"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

// failBound is how long a backup may take to fail once the fault is in
// place and the held activity released. Both failures are non-retryable
// and need a few activity round trips (the check, the snapshot removal,
// FailBackup): seconds; the bound leaves room for a loaded machine.
const failBound = time.Minute

// adminName is the name the backup's snapshot moref has after the rename.
const adminName = "admin-before-upgrade"

// A VM removed from the lab while a backup of it holds its snapshot in the
// middle of the copy: the backup fails within failBound with a message
// that names the VM, the lab survives and serves other VMs, no qemu-nbd or
// nbdkit is left, no image of the failed backup stays in the repository,
// and its catalog row is failed.
func TestVMRemovedMidTransfer(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	l := s.Lab()

	const doomed = "doomed-vm"
	ref, err := l.CreateVM(doomed, 1<<30, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	disks, err := l.Disks(ref)
	if err != nil || len(disks) != 2 {
		t.Fatalf("disks of %s: %v %v", doomed, disks, err)
	}
	// Enough data that the copy is reliably held half way.
	data := stacktest.Pattern(7, 16<<20)
	for _, d := range disks {
		for off := int64(0); off < 192<<20; off += int64(len(data)) {
			stacktest.WriteDisk(t, l, ref, d.Key, off, data)
		}
	}

	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	run, err := s.StartStarter("backup", doomed, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err = gates.Wait(wctx, faultpoint.MidTransfer)
	wcancel()
	if err != nil {
		_ = gates.Release(faultpoint.MidTransfer)
		t.Fatal(err)
	}

	// Remove the VM through the lab's endpoint, as `starter lab` does.
	lc := &labapi.Client{BaseURL: l.URL().String(), Thumbprint: l.Thumbprint()}
	defer lc.CloseIdleConnections()
	if err := lc.RemoveVM(ctx, doomed); err != nil {
		_ = gates.Release(faultpoint.MidTransfer)
		t.Fatalf("remove the VM during the backup: %v", err)
	}
	released := time.Now()
	if err := gates.Release(faultpoint.MidTransfer); err != nil {
		t.Fatal(err)
	}
	bctx, bcancel := context.WithTimeout(ctx, failBound+time.Minute)
	res, err := run.Wait(bctx)
	bcancel()
	took := time.Since(released)
	if err != nil {
		t.Fatalf("the backup of the removed VM did not end: %v", err)
	}
	t.Logf("the backup of the removed VM ended %s after the held transfer was released", took.Round(time.Millisecond))
	if took > failBound {
		t.Errorf("the backup of the removed VM took %s to fail, want at most %s", took.Round(time.Second), failBound)
	}
	var out stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &out); err != nil {
		t.Fatalf("%v\n%s", err, res)
	}
	if res.ExitCode == 0 || out.Status != "failed" {
		t.Fatalf("backup of a VM removed mid-transfer: exit %d, status %q, want failed\n%s", res.ExitCode, out.Status, res)
	}
	t.Logf("failure: %s", out.Error)
	if out.VM != doomed {
		t.Errorf("the failed backup names VM %q, want %q", out.VM, doomed)
	}
	for _, want := range []string{`"` + doomed + `"`, ref, "no longer exists", activities.SnapshotPrefix + out.BackupID} {
		if !strings.Contains(out.Error, want) {
			t.Errorf("failure %q does not say %q", out.Error, want)
		}
	}

	// The lab is alive and backs up another VM.
	other := backup(ctx, t, s, "DC0_H0_VM1")
	if other.Status != "completed" {
		t.Errorf("a backup of another VM after the removal: %s: %s", other.Status, other.Error)
	}

	noNBDProcesses(t, s)
	if files := stacktest.FilesOf(t, s.Repository(), out.BackupID); len(files) > 0 {
		t.Errorf("the failed backup left files in the repository: %v", files)
	}
	if e := catalogEntry(ctx, t, s, doomed, out.BackupID); e.Status != "failed" || !strings.Contains(e.Error, ref) {
		t.Errorf("catalog row of the failed backup: status %q, error %q; want failed, naming %s", e.Status, e.Error, ref)
	}
}

// The backup's snapshot moref names an administrator's snapshot by the
// time the backup reads it (renamed through the vSphere API right after
// the snapshot was taken: what a moref reissued by a restarted vCenter
// looks like). The backup fails non-retryably within failBound, naming
// both snapshots; nothing is committed (no new change ID in the catalog);
// the administrator's snapshot is still there; no image, no process is
// left; the next backup of the VM succeeds.
func TestSnapshotMorefNamesAnotherSnapshot(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	l := s.Lab()
	const vm = "DC0_H0_VM1"
	info, err := l.VM(vm)
	if err != nil || len(info.Disks) == 0 {
		t.Fatalf("lab VM %s: %+v %v", vm, info, err)
	}
	key := info.Disks[0].Key

	stacktest.WriteDisk(t, l, vm, key, 0, stacktest.Pattern(1, 8<<20))
	base := backup(ctx, t, s, vm)
	if base.Status != "completed" {
		t.Fatalf("the first backup: %s: %s", base.Status, base.Error)
	}
	baseID := base.Disk(t, key).ChangeID

	stacktest.WriteDisk(t, l, vm, key, 64<<20, stacktest.Pattern(2, 8<<20))
	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.AfterSnapshot); err != nil {
		t.Fatal(err)
	}
	run, err := s.StartStarter("backup", vm, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err = gates.Wait(wctx, faultpoint.AfterSnapshot)
	wcancel()
	if err != nil {
		_ = gates.Release(faultpoint.AfterSnapshot)
		t.Fatal(err)
	}
	snaps, err := l.Snapshots(vm)
	if err != nil || len(snaps) != 1 || !strings.HasPrefix(snaps[0].Name, activities.SnapshotPrefix) {
		_ = gates.Release(faultpoint.AfterSnapshot)
		t.Fatalf("snapshots while the backup is held: %+v %v, want its own only", snaps, err)
	}
	ours := snaps[0]
	if err := l.RenameSnapshot(vm, ours.Ref, adminName); err != nil {
		_ = gates.Release(faultpoint.AfterSnapshot)
		t.Fatal(err)
	}
	released := time.Now()
	if err := gates.Release(faultpoint.AfterSnapshot); err != nil {
		t.Fatal(err)
	}
	bctx, bcancel := context.WithTimeout(ctx, failBound+time.Minute)
	res, err := run.Wait(bctx)
	bcancel()
	took := time.Since(released)
	if err != nil {
		t.Fatalf("the backup did not end: %v", err)
	}
	t.Logf("the backup whose snapshot moref names another snapshot ended %s after the release", took.Round(time.Millisecond))
	if took > failBound {
		t.Errorf("the backup took %s to fail, want at most %s", took.Round(time.Second), failBound)
	}
	var out stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &out); err != nil {
		t.Fatalf("%v\n%s", err, res)
	}
	if res.ExitCode == 0 || out.Status != "failed" {
		t.Fatalf("backup with a renamed snapshot: exit %d, status %q, want failed\n%s", res.ExitCode, out.Status, res)
	}
	t.Logf("failure: %s", out.Error)
	if ours.Name != activities.SnapshotPrefix+out.BackupID {
		t.Fatalf("the held snapshot is %q, the backup is %s", ours.Name, out.BackupID)
	}
	for _, want := range []string{ours.Name, adminName, ours.Ref} {
		if !strings.Contains(out.Error, want) {
			t.Errorf("failure %q does not name %q", out.Error, want)
		}
	}
	// Non-retryable: one attempt, typed.
	attempts, typ, nonRetryable := lastFailure(ctx, t, s, out.WorkflowID, "ChangedAreas")
	if attempts != 1 || typ != activities.ErrTypeSnapshotIdentity || !nonRetryable {
		t.Errorf("ChangedAreas: %d attempt(s), failure type %q (non-retryable %v); want 1 attempt failing %s, non-retryable",
			attempts, typ, nonRetryable, activities.ErrTypeSnapshotIdentity)
	}

	// Nothing committed: the row failed, and no restore point holds the
	// change ID the lab stamped on the renamed snapshot.
	if e := catalogEntry(ctx, t, s, vm, out.BackupID); e.Status != "failed" || len(e.Disks) != 0 {
		t.Errorf("catalog row of the failed backup: %+v, want failed without disks", e)
	}
	var stamped []string
	for _, st := range l.ChangeIDLog() {
		if st.Snapshot == ours.Ref {
			stamped = append(stamped, st.ChangeID)
		}
	}
	if len(stamped) == 0 {
		t.Fatal("the lab stamped no change ID on the held snapshot")
	}
	for _, e := range list(ctx, t, s, vm) {
		for _, d := range e.Disks {
			if slices.Contains(stamped, d.ChangeID) {
				t.Errorf("backup %s (%s) committed change ID %s of the renamed snapshot", e.BackupID, e.Status, d.ChangeID)
			}
		}
	}
	if files := stacktest.FilesOf(t, s.Repository(), out.BackupID); len(files) > 0 {
		t.Errorf("the failed backup left files in the repository: %v", files)
	}
	noNBDProcesses(t, s)
	if got, err := l.Snapshots(vm); err != nil || len(got) != 1 || got[0] != (lab.SnapshotInfo{Ref: ours.Ref, Name: adminName}) {
		t.Errorf("snapshots after the failed backup: %+v %v, want the administrator's %s (%s) only", got, err, adminName, ours.Ref)
	}

	// The next backup works, builds on the first one, and leaves the
	// administrator's snapshot alone.
	next := backup(ctx, t, s, vm)
	if next.Status != "completed" {
		t.Fatalf("the next backup: %s: %s", next.Status, next.Error)
	}
	if d := next.Disk(t, key); d.Mode != "incremental" || d.ChangeID == baseID || slices.Contains(stamped, d.ChangeID) {
		t.Errorf("the next backup's disk: %+v, want an incremental with a change ID of its own", d)
	}
	if got, err := l.Snapshots(vm); err != nil || len(got) != 1 || got[0].Name != adminName {
		t.Errorf("snapshots after the next backup: %+v %v, want the administrator's only", got, err)
	}
	noNBDProcesses(t, s)
}

// backup runs `starter backup VM --wait --json` and returns what it
// printed.
func backup(ctx context.Context, t *testing.T, s *stack.Stack, vm string) stacktest.BackupJSON {
	t.Helper()
	bctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	res, err := s.Starter(bctx, "backup", vm, "--wait", "--json")
	if err != nil {
		t.Fatalf("starter backup %s: %v", vm, err)
	}
	var out stacktest.BackupJSON
	if err := stacktest.DecodeOne(res.Stdout, &out); err != nil {
		t.Fatalf("%v\n%s", err, res)
	}
	return out
}

// list returns `starter list VM --json`.
func list(ctx context.Context, t *testing.T, s *stack.Stack, vm string) []listEntry {
	t.Helper()
	res, err := s.Starter(ctx, "list", vm, "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("starter list %s: %v %s", vm, err, res)
	}
	var entries []listEntry
	if err := json.Unmarshal([]byte(res.Stdout), &entries); err != nil {
		t.Fatalf("starter list: %v\n%s", err, res)
	}
	return entries
}

// listEntry is what the tests read of `starter list --json`.
type listEntry struct {
	stacktest.ListJSON
	Error string `json:"error"`
}

// catalogEntry returns the catalog's entry of a backup, failing t when
// there is none.
func catalogEntry(ctx context.Context, t *testing.T, s *stack.Stack, vm, backupID string) listEntry {
	t.Helper()
	for _, e := range list(ctx, t, s, vm) {
		if e.BackupID == backupID {
			return e
		}
	}
	t.Fatalf("no catalog entry of backup %s of %s", backupID, vm)
	return listEntry{}
}

// noNBDProcesses fails t when a qemu-nbd or nbdkit of the worker is still
// there 15 s later.
func noNBDProcesses(t *testing.T, s *stack.Stack) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		var left []stack.Proc
		for _, p := range stack.Descendants(s.WorkerPID()) {
			if strings.Contains(p.Cmd, "qemu-nbd") || strings.Contains(p.Cmd, "nbdkit") {
				left = append(left, p)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("NBD processes left: %v", left)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// lastFailure reads the history of workflow wid: the highest attempt of
// activity (an activity's or a local activity's: stacktest.Steps), and
// its last failure's type and whether it was non-retryable.
func lastFailure(ctx context.Context, t *testing.T, s *stack.Stack, wid, activity string) (attempts int, typ string, nonRetryable bool) {
	t.Helper()
	for _, st := range stacktest.Steps(t, stacktest.History(ctx, t, s, wid, "")) {
		if st.Type != activity {
			continue
		}
		attempts = max(attempts, st.Attempt)
		if st.Failure != nil {
			info := st.Failure.GetApplicationFailureInfo()
			typ, nonRetryable = info.GetType(), info.GetNonRetryable()
		}
	}
	return attempts, typ, nonRetryable
}
