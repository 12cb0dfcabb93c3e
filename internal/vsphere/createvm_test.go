package vsphere

import (
	"errors"
	"strings"
	"testing"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab"
)

// CreateVMBeside makes a powered-off VM with disks of the given sizes; a
// second call with the same notes finds it; another VM's name is taken;
// a name that vCenter would escape is refused.
func TestCreateVMBeside(t *testing.T) {
	f := startLab(t, lab.Options{})
	c := f.client(t)
	ctx := ctxT(t)
	src, err := c.FindVM(ctx, lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	caps := []int64{1 << 30, 2 << 30}
	vm, err := c.CreateVMBeside(ctx, src.Ref, "restored-0", caps, "cbtflow restore R1")
	if err != nil {
		t.Fatal(err)
	}
	if vm.Name != "restored-0" || len(vm.Disks) != 2 || vm.Disks[0].Capacity != caps[0] || vm.Disks[1].Capacity != caps[1] {
		t.Errorf("created %+v, want two disks of %v", vm, caps)
	}
	if state, err := c.PowerState(ctx, vm.Ref); err != nil || state != PoweredOff {
		t.Errorf("power state of the new VM: %q %v, want %s", state, err, PoweredOff)
	}
	if again, err := c.CreateVMBeside(ctx, src.Ref, "restored-0", caps, "cbtflow restore R1"); err != nil || again.Ref != vm.Ref {
		t.Errorf("a retry: %+v %v, want the same VM %s", again, err, vm.Ref)
	}
	if _, err := c.CreateVMBeside(ctx, src.Ref, "restored-0", caps, "cbtflow restore R2"); !errors.Is(err, ErrVMNameTaken) {
		t.Errorf("another restore's name: %v, want ErrVMNameTaken", err)
	}
	if _, err := c.CreateVMBeside(ctx, src.Ref, "DC0_H0_VM1", caps, "cbtflow restore R3"); !errors.Is(err, ErrVMNameTaken) {
		t.Errorf("an existing VM's name: %v, want ErrVMNameTaken", err)
	}
	if _, err := c.CreateVMBeside(ctx, src.Ref, "a/b", caps, "x"); err == nil || !strings.Contains(err.Error(), "without /") {
		t.Errorf("a name with /: %v", err)
	}
}

// An attempt that stopped after CreateVM_Task, before the disks were
// added, left a VM without disks whose notes name the restore: a retry
// gives it its disks, rather than returning it diskless (the restore then
// refused it: "has 0 disks").
func TestCreateVMBesideCompletesADisklessVM(t *testing.T) {
	f := startLab(t, lab.Options{})
	c := f.client(t)
	ctx := ctxT(t)
	src, err := c.FindVM(ctx, lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	var m mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, vmRef(src.Ref), []string{"parent", "resourcePool", "config.files.vmPathName"}, &m); err != nil {
		t.Fatal(err)
	}
	ds, _, _ := strings.Cut(m.Config.Files.VmPathName, "]")
	const note = "cbtflow restore R9"
	task, err := object.NewFolder(c.vim, *m.Parent).CreateVM(ctx, types.VirtualMachineConfigSpec{Name: "restored-9",
		GuestId: string(types.VirtualMachineGuestOsIdentifierOtherGuest), Annotation: note,
		Files: &types.VirtualMachineFileInfo{VmPathName: ds + "] restored-9/restored-9.vmx"}}, object.NewResourcePool(c.vim, *m.ResourcePool), nil)
	if err == nil {
		_, err = task.WaitForResult(ctx)
	}
	if err != nil {
		t.Fatal(err)
	}
	caps := []int64{1 << 30, 2 << 30}
	vm, err := c.CreateVMBeside(ctx, src.Ref, "restored-9", caps, note)
	if err != nil {
		t.Fatal(err)
	}
	if len(vm.Disks) != 2 || vm.Disks[0].Capacity != caps[0] || vm.Disks[1].Capacity != caps[1] {
		t.Errorf("the retry returned %+v, want the VM with two disks of %v", vm, caps)
	}
}
