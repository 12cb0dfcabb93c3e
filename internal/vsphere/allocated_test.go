package vsphere

import (
	"bytes"
	"testing"

	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab"
)

// The lab's disks are sparse images: the layout reports what is written,
// per disk, before and after a snapshot (whose delta holds nothing).
func TestAllocatedBytes(t *testing.T) {
	f := startLab(t, lab.Options{})
	ctx := ctxT(t)
	c := f.client(t)
	vm, err := c.FindVM(ctx, lab.SecondDiskVM)
	if err != nil {
		t.Fatal(err)
	}
	const mib = 1 << 20
	if _, err := f.lab.WriteDisk(vm.Name, vm.Disks[1].Key, 8*mib, bytes.NewReader(bytes.Repeat([]byte{7}, 3*mib))); err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		got, err := c.AllocatedBytes(ctx, vm)
		if err != nil {
			t.Fatalf("%s: AllocatedBytes: %v", when, err)
		}
		if len(got) != 2 {
			t.Fatalf("%s: allocated = %v, want both disks", when, got)
		}
		if n := got[vm.Disks[1].Key]; n < 3*mib || n > 3*mib+lab.BlockSize {
			t.Errorf("%s: disk %d allocated %d bytes, want about 3 MiB", when, vm.Disks[1].Key, n)
		}
		if n := got[vm.Disks[0].Key]; n > got[vm.Disks[1].Key] {
			t.Errorf("%s: untouched disk %d allocated %d bytes", when, vm.Disks[0].Key, n)
		}
	}
	check("before a snapshot")
	if _, err := c.CreateSnapshot(ctx, vm, "cbtflow-alloc"); err != nil {
		t.Fatal(err)
	}
	check("with a snapshot")
}

func TestAllocatedOf(t *testing.T) {
	ext, desc := string(types.VirtualMachineFileLayoutExFileTypeDiskExtent), string(types.VirtualMachineFileLayoutExFileTypeDiskDescriptor)
	layout := &types.VirtualMachineFileLayoutEx{
		File: []types.VirtualMachineFileLayoutExFileInfo{
			{Key: 1, Type: desc, Size: 500}, {Key: 2, Type: ext, Size: 1000},
			{Key: 3, Type: desc, Size: 500}, {Key: 4, Type: ext, Size: 300},
			{Key: 5, Type: ext, Size: 9000},
		},
		Disk: []types.VirtualMachineFileLayoutExDiskLayout{
			{Key: 204, Chain: []types.VirtualMachineFileLayoutExDiskUnit{{FileKey: []int32{1, 2}}, {FileKey: []int32{3, 4}}}},
			{Key: 205, Chain: []types.VirtualMachineFileLayoutExDiskUnit{{FileKey: []int32{5}}}},
			{Key: 206, Chain: []types.VirtualMachineFileLayoutExDiskUnit{{FileKey: []int32{5}}}},
		},
	}
	got := allocatedOf(layout, map[int32]int64{204: 4096, 205: 4096})
	if len(got) != 2 || got[204] != 1300 || got[205] != 4096 {
		t.Errorf("allocated = %v, want 204: 1300 (extents of the chain, no descriptors), 205: 4096 (clipped to capacity), no 206", got)
	}
}
