package lab_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/vmware/govmomi/fault"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab"
)

// taskWait waits for a vSphere task.
func taskWait(ctx context.Context, c *vim25.Client, task types.ManagedObjectReference) error {
	return object.NewTask(c, task).Wait(ctx)
}

// notFoundOK passes nil and ManagedObjectNotFound, what an operation on
// a snapshot of a VM being removed may answer.
func notFoundOK(what string, err error) error {
	if err == nil || fault.Is(err, &types.ManagedObjectNotFound{}) {
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}

// A VM removed while a backup holds a snapshot of it: every operation on
// that snapshot fails with ManagedObjectNotFound, as vCenter's do, and the
// lab goes on serving the other VMs. (With the stock simulator, the
// removal of the snapshot panicked in a task goroutine and took the whole
// process down.)
func TestRemovedVMSnapshots(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	ctx := context.Background()
	ref, err := l.CreateVM("doomed", 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	vm := findVM(t, c, "doomed")
	disks, err := l.Disks(ref)
	if err != nil || len(disks) != 1 {
		t.Fatalf("disks of the new VM: %v %v", disks, err)
	}
	key := disks[0].Key
	write(t, l, "doomed", key, 0, []byte("data of a VM about to go"))
	snap := snapshot(t, vm, "cbtflow-held")
	img, err := l.SnapshotImage(snap.Value, key)
	if err != nil {
		t.Fatal(err)
	}

	// A call on the snapshot puts the lab's wrapper of it into this
	// session: the removal must take it out of there too.
	if _, err := methods.RenameSnapshot(ctx, c, &types.RenameSnapshot{This: snap, Description: "held by a backup"}); err != nil {
		t.Fatal(err)
	}

	if err := labClient(t, l).RemoveVM(ctx, "doomed"); err != nil {
		t.Fatalf("remove the VM through the lab endpoint: %v", err)
	}

	// QueryChangedDiskAreas, on the VM and its snapshot.
	_, err = query(c, vm, snap, key, 0, "*")
	wantFault(t, "QueryChangedDiskAreas on the removed VM", err, &types.ManagedObjectNotFound{})

	// Property reads of the snapshot.
	var ms mo.VirtualMachineSnapshot
	err = property.DefaultCollector(c).RetrieveOne(ctx, snap, []string{"vm"}, &ms)
	wantFault(t, "reading the vm property of the snapshot", err, &types.ManagedObjectNotFound{})
	err = property.DefaultCollector(c).RetrieveOne(ctx, snap, []string{"config.hardware.device"}, &ms)
	wantFault(t, "reading the config of the snapshot", err, &types.ManagedObjectNotFound{})

	// RemoveSnapshot_Task: refused at the call, as for any unknown moref.
	_, err = methods.RemoveSnapshot_Task(ctx, c, &types.RemoveSnapshot_Task{This: snap, RemoveChildren: false, Consolidate: types.NewBool(true)})
	wantFault(t, "RemoveSnapshot_Task", err, &types.ManagedObjectNotFound{})
	_, err = methods.RevertToSnapshot_Task(ctx, c, &types.RevertToSnapshot_Task{This: snap})
	wantFault(t, "RevertToSnapshot_Task", err, &types.ManagedObjectNotFound{})

	// The lab's own frozen-image endpoint, in Go and over HTTP: unknown
	// snapshot, saying why, with the VM's name.
	for what, err := range map[string]error{
		"Go API":   func() error { _, err := l.SnapshotImage(snap.Value, key); return err }(),
		"endpoint": func() error { _, err := labClient(t, l).SnapshotImage(ctx, snap.Value, key); return err }(),
	} {
		if !errors.Is(err, lab.ErrUnknownSnapshot) {
			t.Errorf("frozen image through the %s: %v, want %v", what, err, lab.ErrUnknownSnapshot)
			continue
		}
		for _, want := range []string{"ManagedObjectNotFound", "doomed", ref, snap.Value} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("frozen image through the %s: %q does not say %q", what, err, want)
			}
		}
	}
	if img.Path == "" {
		t.Fatal("no frozen image path")
	}

	// The lab still serves: a snapshot of another VM, its changed areas,
	// its frozen image, its removal.
	other := findVM(t, c, vm1)
	s := snapshot(t, other, "after the removal")
	if _, err := query(c, other, s, diskKey, 0, "*"); err != nil {
		t.Errorf("query on another VM after the removal: %v", err)
	}
	if _, err := l.SnapshotImage(s.Value, diskKey); err != nil {
		t.Errorf("frozen image of another VM after the removal: %v", err)
	}
	removeSnapshot(t, c, s)
}

// RemoveVM racing with operations on the VM's snapshot: every call either
// works or fails with ManagedObjectNotFound; the process survives.
func TestRemoveVMRacesSnapshotOperations(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	ctx := context.Background()
	for i := range 6 {
		name := fmt.Sprintf("race-%d", i)
		if _, err := l.CreateVM(name, 16<<20); err != nil {
			t.Fatal(err)
		}
		vm := findVM(t, c, name)
		snap := snapshot(t, vm, "cbtflow-race")
		var wg sync.WaitGroup
		errs := make(chan error, 4)
		wg.Add(4)
		go func() { defer wg.Done(); errs <- l.RemoveVM(name) }()
		go func() {
			defer wg.Done()
			res, err := methods.RemoveSnapshot_Task(ctx, c, &types.RemoveSnapshot_Task{This: snap, Consolidate: types.NewBool(true)})
			if err == nil {
				err = taskWait(ctx, c, res.Returnval)
			}
			errs <- notFoundOK("RemoveSnapshot_Task", err)
		}()
		go func() {
			defer wg.Done()
			var ms mo.VirtualMachineSnapshot
			errs <- notFoundOK("snapshot config", property.DefaultCollector(c).RetrieveOne(ctx, snap, []string{"config"}, &ms))
		}()
		go func() {
			defer wg.Done()
			_, err := l.SnapshotImage(snap.Value, 203)
			if err != nil && !errors.Is(err, lab.ErrUnknownSnapshot) && !errors.Is(err, lab.ErrUnknownDisk) {
				errs <- fmt.Errorf("frozen image: %w", err)
				return
			}
			errs <- nil
		}()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Errorf("round %d: %v", i, err)
			}
		}
	}
	// Still serving.
	if _, err := l.Disks(vm1); err != nil {
		t.Errorf("lab after the races: %v", err)
	}
}

// RenameSnapshot, which the stock simulator lacks, renames in the VM's
// snapshot tree and keeps the moref, the config and the frozen images; a
// removed snapshot's moref, renamed or read, is ManagedObjectNotFound
// through the session that removed it too.
func TestRenameSnapshot(t *testing.T) {
	t.Parallel()
	l := startLab(t, lab.Options{})
	c := mustConnect(t, l)
	ctx := context.Background()
	vm := findVM(t, c, vm1)
	write(t, l, vm1, diskKey, 0, []byte("renamed"))
	snap := snapshot(t, vm, "cbtflow-ours")
	before := backing(t, c, snap, diskKey).ChangeId

	// Through the vSphere API, as an administrator's tool would.
	if _, err := methods.RenameSnapshot(ctx, c, &types.RenameSnapshot{This: snap, Name: "admin-before-upgrade", Description: "kept by the admin"}); err != nil {
		t.Fatalf("RenameSnapshot: %v", err)
	}
	var mvm mo.VirtualMachine
	if err := property.DefaultCollector(c).RetrieveOne(ctx, vm.Reference(), []string{"snapshot"}, &mvm); err != nil {
		t.Fatal(err)
	}
	if mvm.Snapshot == nil || len(mvm.Snapshot.RootSnapshotList) != 1 {
		t.Fatalf("snapshot tree after the rename: %+v", mvm.Snapshot)
	}
	if n := mvm.Snapshot.RootSnapshotList[0]; n.Snapshot != snap || n.Name != "admin-before-upgrade" || n.Description != "kept by the admin" {
		t.Errorf("tree node after the rename: %s %q %q, want %s admin-before-upgrade", n.Snapshot.Value, n.Name, n.Description, snap.Value)
	}
	got, err := l.Snapshots(vm1)
	if err != nil || len(got) != 1 || got[0] != (lab.SnapshotInfo{Ref: snap.Value, Name: "admin-before-upgrade"}) {
		t.Errorf("Lab.Snapshots = %+v, %v", got, err)
	}
	if b := backing(t, c, snap, diskKey).ChangeId; b != before {
		t.Errorf("change ID of the renamed snapshot %q, was %q", b, before)
	}
	if _, err := query(c, vm, snap, diskKey, 0, "*"); err != nil {
		t.Errorf("query on the renamed snapshot: %v", err)
	}
	if _, err := l.SnapshotImage(snap.Value, diskKey); err != nil {
		t.Errorf("frozen image of the renamed snapshot: %v", err)
	}

	// The Go API, and its refusals.
	if err := l.RenameSnapshot(vm1, snap.Value, "back again"); err != nil {
		t.Fatal(err)
	}
	if got, _ := l.Snapshots(vm1); len(got) != 1 || got[0].Name != "back again" {
		t.Errorf("after Lab.RenameSnapshot: %+v", got)
	}
	if err := l.RenameSnapshot(vm0, snap.Value, "x"); !errors.Is(err, lab.ErrUnknownSnapshot) {
		t.Errorf("renaming a snapshot of another VM: %v, want %v", err, lab.ErrUnknownSnapshot)
	}

	removeSnapshot(t, c, snap)
	// Read first: a call on the snapshot would drop a stale wrapper from
	// the session by itself.
	var ms mo.VirtualMachineSnapshot
	err = property.DefaultCollector(c).RetrieveOne(ctx, snap, []string{"config.hardware.device"}, &ms)
	wantFault(t, "reading a removed snapshot through the session that removed it", err, &types.ManagedObjectNotFound{})
	_, err = methods.RenameSnapshot(ctx, c, &types.RenameSnapshot{This: snap, Name: "ghost"})
	wantFault(t, "renaming a removed snapshot", err, &types.ManagedObjectNotFound{})
	if got, _ := l.Snapshots(vm1); len(got) != 0 {
		t.Errorf("snapshots after the removal: %+v", got)
	}
}
