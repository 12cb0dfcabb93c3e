package vsphere

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func TestFindVM(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)

	byName, err := c.FindVM(ctx, lab.SecondDiskVM)
	if err != nil {
		t.Fatalf("FindVM by name: %v", err)
	}
	if byName.Name != lab.SecondDiskVM || byName.UUID == "" ||
		!strings.HasPrefix(byName.Ref, "vm-") || !byName.CBTEnabled {
		t.Errorf("FindVM by name = %+v", byName)
	}
	labDisks, err := f.lab.Disks(lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	if len(byName.Disks) != 2 || len(labDisks) != 2 {
		t.Fatalf("disks = %+v, lab has %+v, want 2", byName.Disks, labDisks)
	}
	for i, d := range byName.Disks {
		ld := labDisks[i]
		if d.Key != ld.Key || d.Capacity != ld.Capacity || d.FileName != ld.FileName || d.Label == "" || d.Capacity <= 0 {
			t.Errorf("disk %d = %+v, lab says %+v", i, d, ld)
		}
	}

	for _, ref := range []string{"/DC0/vm/" + lab.SecondDiskVM, byName.Ref} {
		vm, err := c.FindVM(ctx, ref)
		if err != nil {
			t.Fatalf("FindVM(%q): %v", ref, err)
		}
		if vm.Ref != byName.Ref || vm.UUID != byName.UUID || vm.Name != byName.Name || len(vm.Disks) != 2 {
			t.Errorf("FindVM(%q) = %+v, want %+v", ref, vm, byName)
		}
	}
	other, err := c.FindVM(ctx, "/DC0/vm/DC0_C0_RP0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	if other.Ref == byName.Ref || other.Name != "DC0_C0_RP0_VM1" || len(other.Disks) != 1 {
		t.Errorf("FindVM(DC0_C0_RP0_VM1) = %+v", other)
	}

	for _, ref := range []string{"no-such-vm", "/DC0/vm/no-such-vm", "vm-999999", "/DC0/host", ""} {
		_, err := c.FindVM(ctx, ref)
		if !errors.Is(err, ErrVMNotFound) {
			t.Errorf("FindVM(%q) = %v, want ErrVMNotFound", ref, err)
		} else if !strings.Contains(err.Error(), ref) {
			t.Errorf("FindVM(%q): error %q does not name it", ref, err)
		}
	}

	// vCenter stores "/" in a name as "%2f": the name as shown finds the
	// VM too.
	webRef, err := f.lab.CreateVM(`web/01 50%\x`)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{`web/01 50%\x`, `web%2f01 50%25%5cx`} {
		vm, err := c.FindVM(ctx, name)
		if err != nil {
			t.Errorf("FindVM(%q): %v", name, err)
		} else if vm.Ref != webRef || vm.Name != `web%2f01 50%25%5cx` {
			t.Errorf("FindVM(%q) = %+v, want %s named web%%2f01 50%%25%%5cx", name, vm, webRef)
		}
	}
	if _, err := c.FindVM(ctx, "web/02"); !errors.Is(err, ErrVMNotFound) || !strings.Contains(err.Error(), `"web/02"`) {
		t.Errorf("FindVM(web/02) = %v, want ErrVMNotFound naming it", err)
	}

	vm, err := c.VMByUUID(ctx, byName.UUID)
	if err != nil {
		t.Fatalf("VMByUUID: %v", err)
	}
	if vm.Ref != byName.Ref || vm.Name != byName.Name {
		t.Errorf("VMByUUID = %+v, want %+v", vm, byName)
	}
	const unknown = "5000aaaa-bbbb-cccc-dddd-eeeeffff0000"
	if _, err := c.VMByUUID(ctx, unknown); !errors.Is(err, ErrVMNotFound) || !strings.Contains(err.Error(), unknown) {
		t.Errorf("VMByUUID(unknown) = %v, want ErrVMNotFound naming it", err)
	}
}

func TestEnableCBT(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	const name = "DC0_H0_VM1"
	if err := f.lab.SetCBT(name, false); err != nil {
		t.Fatal(err)
	}
	vm, err := c.FindVM(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if vm.CBTEnabled {
		t.Fatal("CBTEnabled after the lab switched it off")
	}
	changed, err := c.EnableCBT(ctx, vm)
	if err != nil || !changed || !vm.CBTEnabled {
		t.Fatalf("EnableCBT = %v, %v (CBTEnabled %v), want true", changed, err, vm.CBTEnabled)
	}
	again, err := c.FindVM(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if !again.CBTEnabled {
		t.Fatal("CBT still off in vCenter after EnableCBT")
	}
	if changed, err := c.EnableCBT(ctx, again); err != nil || changed {
		t.Fatalf("second EnableCBT = %v, %v, want false", changed, err)
	}
	// A snapshot now starts a change-ID series.
	s, err := c.CreateSnapshot(ctx, again, "cbtflow-after-enable")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Disks) != 1 || s.Disks[0].ChangeID == "" {
		t.Fatalf("snapshot disks after EnableCBT: %+v", s.Disks)
	}
}

func TestCreateSnapshot(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	vm, err := c.FindVM(ctx, lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.lab.WriteDisk(vm.Name, vm.Disks[1].Key, 1<<20, bytes.NewReader(bytes.Repeat([]byte{7}, 1<<16))); err != nil {
		t.Fatal(err)
	}
	const name = "cbtflow-backup-1"
	s, err := c.CreateSnapshot(ctx, vm, name)
	if err != nil {
		t.Fatalf("CreateSnapshot: %v", err)
	}
	if s.Name != name || !strings.HasPrefix(s.Ref, "snapshot-") || s.Created.IsZero() || len(s.Disks) != 2 {
		t.Fatalf("snapshot = %+v", s)
	}
	stamps := map[int32]string{}
	for _, st := range f.lab.ChangeIDLog() {
		if st.Snapshot == s.Ref {
			stamps[st.DiskKey] = st.ChangeID
			if st.SnapshotName != name {
				t.Errorf("lab logged snapshot name %q, want %q", st.SnapshotName, name)
			}
		}
	}
	live, err := c.FindVM(ctx, vm.Ref)
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range s.Disks {
		if d.ChangeID == "" || d.ChangeID != stamps[d.Key] {
			t.Errorf("disk %d change ID %q, the lab stamped %q", d.Key, d.ChangeID, stamps[d.Key])
		}
		if d.FileName != vm.Disks[i].FileName || d.Key != vm.Disks[i].Key || d.Capacity != vm.Disks[i].Capacity {
			t.Errorf("snapshot disk %+v, VM had %+v before the snapshot", d, vm.Disks[i])
		}
		if live.Disks[i].FileName == d.FileName {
			t.Errorf("disk %d: the live VM's backing %q is the snapshot's: the test cannot tell them apart", d.Key, d.FileName)
		}
	}

	// A retry gets the same snapshot, not a second one.
	again, err := c.CreateSnapshot(ctx, vm, name)
	if err != nil {
		t.Fatalf("second CreateSnapshot: %v", err)
	}
	if again.Ref != s.Ref || !again.Created.Equal(s.Created) || again.Disks[0].ChangeID != s.Disks[0].ChangeID || again.Disks[1].FileName != s.Disks[1].FileName {
		t.Fatalf("second CreateSnapshot = %+v, want %+v", again, s)
	}
	all, err := c.Snapshots(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || all[0].Ref != s.Ref || all[0].VMRef != vm.Ref || all[0].VMUUID != vm.UUID || all[0].VMName != vm.Name {
		t.Fatalf("snapshots after two CreateSnapshot calls: %+v", all)
	}

	// A child snapshot with the name is found in the tree too.
	child, err := c.CreateSnapshot(ctx, vm, "cbtflow-backup-2")
	if err != nil {
		t.Fatal(err)
	}
	found, err := c.FindSnapshot(ctx, vm.Ref, "cbtflow-backup-2")
	if err != nil || found == nil || found.Ref != child.Ref {
		t.Fatalf("FindSnapshot(child) = %+v, %v", found, err)
	}
	if child.Disks[0].ChangeID == s.Disks[0].ChangeID {
		t.Errorf("second snapshot has the first one's change ID %q", s.Disks[0].ChangeID)
	}
	if again, err := c.CreateSnapshot(ctx, vm, "cbtflow-backup-2"); err != nil || again.Ref != child.Ref {
		t.Fatalf("CreateSnapshot(child again) = %+v, %v", again, err)
	}
	if got, err := c.FindSnapshot(ctx, vm.Ref, "absent"); got != nil || err != nil {
		t.Fatalf("FindSnapshot(absent) = %+v, %v, want nil, nil", got, err)
	}
	if _, err := c.FindSnapshot(ctx, "vm-999999", name); !errors.Is(err, ErrVMNotFound) {
		t.Fatalf("FindSnapshot on an unknown VM = %v, want ErrVMNotFound", err)
	}
}

func TestRemoveSnapshotAndList(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	vm1, err := c.FindVM(ctx, "DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	vm2, err := c.FindVM(ctx, "DC0_C0_RP0_VM0")
	if err != nil {
		t.Fatal(err)
	}
	a, err := c.CreateSnapshot(ctx, vm1, "cbtflow-a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateSnapshot(ctx, vm1, "operator-snapshot"); err != nil {
		t.Fatal(err)
	}
	b, err := c.CreateSnapshot(ctx, vm2, "cbtflow-b")
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Snapshots(ctx, "cbtflow-")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Ref != a.Ref || got[1].Ref != b.Ref || got[0].VMRef != vm1.Ref || got[1].VMName != vm2.Name ||
		got[0].Name != "cbtflow-a" || got[1].VMUUID != vm2.UUID || got[0].Created.IsZero() {
		t.Fatalf("Snapshots(cbtflow-) = %+v", got)
	}

	if err := c.RemoveSnapshot(ctx, vm2.Ref, a.Ref); err == nil || !strings.Contains(err.Error(), vm1.Ref) {
		t.Fatalf("RemoveSnapshot with the wrong VM = %v, want an error naming %s", err, vm1.Ref)
	}
	for i := range 2 {
		if err := c.RemoveSnapshot(ctx, vm1.Ref, a.Ref); err != nil {
			t.Fatalf("RemoveSnapshot %d: %v", i, err)
		}
	}
	if s, err := c.FindSnapshot(ctx, vm1.Ref, "cbtflow-a"); s != nil || err != nil {
		t.Fatalf("FindSnapshot after removal = %+v, %v", s, err)
	}
	if s, err := c.FindSnapshot(ctx, vm1.Ref, "operator-snapshot"); s == nil || err != nil {
		t.Fatalf("the operator's snapshot went with the removal: %+v, %v", s, err)
	}
	got, err = c.Snapshots(ctx, "cbtflow-")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Ref != b.Ref {
		t.Fatalf("Snapshots after removal = %+v", got)
	}
}

// runningSnapshotTask starts a lab whose snapshot tasks take 1.5 s
// (without holding the VM's lock meanwhile, so that its properties stay
// readable), and has an administrator start a snapshot of DC0_H0_VM1
// named name: an earlier attempt's task, still running. It returns a
// client of the lab, the VM and that task.
func runningSnapshotTask(t *testing.T, name string) (context.Context, *Client, *VM, *object.Task) {
	t.Helper()
	saved := simulator.TaskDelay
	simulator.TaskDelay = simulator.DelayConfig{MethodDelay: map[string]int{"CreateSnapshotEx": 1500, "LockHandoff": 0}}
	t.Cleanup(func() { simulator.TaskDelay = saved })
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	vm, err := c.FindVM(ctx, "DC0_H0_VM1")
	if err != nil {
		t.Fatal(err)
	}
	admin, _ := f.adminSession(t)
	task, err := object.NewVirtualMachine(admin, vmRef(vm.Ref)).CreateSnapshot(ctx, name, "first attempt", false, false)
	if err != nil {
		t.Fatal(err)
	}
	return ctx, c, vm, task
}

// TestCreateSnapshotWaitsForRunningTask plays a retried activity whose
// first attempt's snapshot task is still running: the retry must wait for
// it and return its snapshot instead of making a second one.
func TestCreateSnapshotWaitsForRunningTask(t *testing.T) {
	const name = "cbtflow-retried"
	ctx, c, vm, task := runningSnapshotTask(t, name)
	start := time.Now()
	s, err := c.CreateSnapshot(ctx, vm, name)
	if err != nil {
		t.Fatalf("CreateSnapshot: %v", err)
	}
	waited := time.Since(start)
	res, err := task.WaitForResultEx(ctx)
	if err != nil {
		t.Fatal(err)
	}
	first := res.Result.(types.ManagedObjectReference)
	all, err := c.Snapshots(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if s.Ref != first.Value || len(all) != 1 {
		t.Fatalf("CreateSnapshot returned %s after %v; the first attempt made %s; snapshots: %+v", s.Ref, waited, first.Value, all)
	}
	if len(s.Disks) != 1 || s.Disks[0].ChangeID == "" {
		t.Fatalf("snapshot disks: %+v", s.Disks)
	}
}
