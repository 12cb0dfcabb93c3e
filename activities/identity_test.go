package activities_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/lab"
	"github.com/cbtflow/cbtflow/internal/testutil"
)

// adminName is what an administrator calls the snapshot a backup's moref
// names after the rename.
const adminName = "admin-before-upgrade"

// labSnapshotNames lists every snapshot of the lab VM, cbtflow's or not.
func (f *fixture) labSnapshotNames(t *testing.T, vmRef string) []string {
	t.Helper()
	snaps, err := f.lab.Snapshots(vmRef)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range snaps {
		names = append(names, s.Name)
	}
	return names
}

// The backup's snapshot moref names an administrator's snapshot now (the
// lab renames it through the vSphere API, which is what a reissued moref
// looks like): ChangedAreas and TransferDisk refuse it, non-retryably,
// naming both snapshots; RemoveSnapshot leaves it alone.
func TestSnapshotIdentityMismatch(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	f.apply(t, vm.disks[1].Key, write{off: 0, n: 1 << 20, seed: 1})
	b := f.takeBackup(t, env, vm, "ident1", "*")
	ours := activities.SnapshotPrefix + "ident1"
	if b.snap.SnapshotName != ours {
		t.Fatalf("snapshot name %q, want %q", b.snap.SnapshotName, ours)
	}
	if err := f.lab.RenameSnapshot(vm.ref, b.snap.SnapshotRef, adminName); err != nil {
		t.Fatal(err)
	}

	_, err := execute[activities.ChangedAreasResult](t, env, f.vs.ChangedAreas, activities.ChangedAreasInput{
		Profile: profileLab, VMRef: vm.ref, SnapshotRef: b.snap.SnapshotRef, BackupID: "ident1",
		Key: b.disk.Key, Capacity: b.disk.Capacity, ChangeID: "*"})
	wantAppError(t, err, activities.ErrTypeSnapshotIdentity, ours, adminName, b.snap.SnapshotRef)

	// TransferDisk: refused before the source is opened.
	_, err = execute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, b.input(""))
	wantAppError(t, err, activities.ErrTypeSnapshotIdentity, ours, adminName, b.snap.SnapshotRef)

	// RemoveSnapshot: nothing is removed under the moref, and there is no
	// snapshot of our name elsewhere.
	if err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
		SnapshotRef: b.snap.SnapshotRef, SnapshotName: ours}); err != nil {
		t.Fatalf("RemoveSnapshot of a renamed snapshot: %v", err)
	}
	if names := f.labSnapshotNames(t, vm.ref); len(names) != 1 || names[0] != adminName {
		t.Fatalf("after RemoveSnapshot: snapshots %v, want the administrator's %s only", names, adminName)
	}
	// Our name under a new moref (the old one reissued): that goes, the
	// administrator's stays.
	again := mustExecute[activities.CreateSnapshotResult](t, env, f.vs.CreateSnapshot,
		activities.CreateSnapshotInput{Profile: profileLab, VMRef: vm.ref, VMUUID: vm.uuid, BackupID: "ident1"})
	if again.SnapshotRef == b.snap.SnapshotRef {
		t.Fatalf("CreateSnapshot reused the renamed snapshot %s", again.SnapshotRef)
	}
	if err := runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
		SnapshotRef: b.snap.SnapshotRef, SnapshotName: ours}); err != nil {
		t.Fatal(err)
	}
	if names := f.labSnapshotNames(t, vm.ref); len(names) != 1 || names[0] != adminName {
		t.Fatalf("after RemoveSnapshot by name: snapshots %v, want the administrator's %s only", names, adminName)
	}
	// A name that is not cbtflow's is refused outright.
	err = runRemove(t, env, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
		SnapshotRef: b.snap.SnapshotRef, SnapshotName: adminName})
	wantAppError(t, err, activities.ErrTypeInvalidInput, adminName)
	if names := f.labSnapshotNames(t, vm.ref); len(names) != 1 {
		t.Fatalf("after a refused RemoveSnapshot: snapshots %v", names)
	}
}

// pauseFunc is an activities.Pauser.
type pauseFunc func(ctx context.Context, point string)

func (p pauseFunc) Pause(ctx context.Context, point string) { p(ctx, point) }

// The snapshot is renamed, or vanishes, while its disk is copied: the copy
// itself reads on (the source was opened before), but TransferDisk checks
// again before it returns, and fails non-retryably: nothing is reported
// for a commit.
func TestTransferDiskSnapshotChangesDuringCopy(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	f.tr.Copy = copier.Options{FlushBytes: 2 << 20, FlushInterval: 50 * time.Millisecond, ProgressInterval: time.Millisecond, InFlight: 4}
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	key := vm.disks[1].Key
	var ws []write
	for i := range 8 {
		ws = append(ws, write{off: int64(i) * (256 << 20), n: 4 << 20, seed: byte(20 + i)})
	}
	f.apply(t, key, ws...)

	for _, tc := range []struct {
		id, typ string
		act     func(b backup) error
		names   []string
	}{
		{"mid-rename", activities.ErrTypeSnapshotIdentity,
			func(b backup) error { return f.lab.RenameSnapshot(vm.ref, b.snap.SnapshotRef, adminName) },
			[]string{adminName, "after the copy"}},
		{"mid-remove", activities.ErrTypeSnapshotGone,
			func(b backup) error {
				c, err := f.sessions.Client(context.Background(), profileLab)
				if err != nil {
					return err
				}
				return c.RemoveSnapshot(context.Background(), vm.ref, b.snap.SnapshotRef)
			},
			[]string{"gone", "after the copy"}},
	} {
		t.Run(tc.id, func(t *testing.T) {
			b := f.takeBackup(t, env, vm, tc.id, "*")
			var once sync.Once
			var actErr error
			reached := false
			f.tr.Hooks = pauseFunc(func(_ context.Context, point string) {
				if point == activities.PauseMidTransfer {
					once.Do(func() { reached = true; actErr = tc.act(b) })
				}
			})
			defer func() { f.tr.Hooks = nil }()
			_, err := execute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, b.input(""))
			if !reached || actErr != nil {
				t.Fatalf("the snapshot was not changed mid-copy (reached %v): %v", reached, actErr)
			}
			wantAppError(t, err, tc.typ, append(tc.names, activities.SnapshotPrefix+tc.id, b.snap.SnapshotRef)...)
			if tc.typ == activities.ErrTypeSnapshotIdentity {
				if names := f.labSnapshotNames(t, vm.ref); !slices.Contains(names, adminName) {
					t.Errorf("the renamed snapshot is gone: %v", names)
				}
			}
		})
	}
}
