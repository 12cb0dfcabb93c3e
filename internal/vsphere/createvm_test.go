package vsphere

import (
	"errors"
	"strings"
	"testing"

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
