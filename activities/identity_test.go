package activities_test

import (
	"testing"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
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
