package vsphere

import (
	"context"
	"fmt"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// AllocatedBytes returns, per disk key of vm, the bytes its disk's files
// hold on the datastore: the sum of the sizes of the extent files
// (layoutEx file type diskExtent, e.g. "disk-flat.vmdk", and the delta
// extents of snapshots) of every unit of the disk's chain. A thin disk's
// extent reports its allocated size, a thick one its capacity. It is what
// a full backup will read at most (the allocated areas), an upper bound
// when the chain has deltas (they overlap their parents), so each value is
// clipped to the disk's capacity.
//
// It asks vCenter to refresh the VM's storage information first
// (RefreshStorageInfo: layoutEx may be minutes old otherwise); a refusal
// of that is no error, the layout as it stands is read. A disk absent from
// the layout is absent from the map: its allocation is unknown.
func (c *Client) AllocatedBytes(ctx context.Context, vm *VM) (map[int32]int64, error) {
	ref := vmRef(vm.Ref)
	if err := object.NewVirtualMachine(c.vim, ref).RefreshStorageInfo(ctx); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		c.log.Warn("refreshing the VM's storage information failed: its file layout may be stale", "vm", vm.Name, "vm_ref", vm.Ref, "err", err)
	}
	var mvm mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, ref, []string{"layoutEx"}, &mvm); err != nil {
		if isFault(err, &types.ManagedObjectNotFound{}) {
			return nil, fmt.Errorf("vsphere: file layout of %s (%s): %w", vm.Name, vm.Ref, ErrVMNotFound)
		}
		return nil, fmt.Errorf("vsphere: file layout of %s (%s): %w", vm.Name, vm.Ref, err)
	}
	capacity := map[int32]int64{}
	for _, d := range vm.Disks {
		capacity[d.Key] = d.Capacity
	}
	return allocatedOf(mvm.LayoutEx, capacity), nil
}

// allocatedOf sums each disk's extent files in layout; capacity clips them
// (a disk missing from capacity is left out).
func allocatedOf(layout *types.VirtualMachineFileLayoutEx, capacity map[int32]int64) map[int32]int64 {
	out := map[int32]int64{}
	if layout == nil {
		return out
	}
	files := map[int32]types.VirtualMachineFileLayoutExFileInfo{}
	for _, f := range layout.File {
		files[f.Key] = f
	}
	for _, d := range layout.Disk {
		c, ok := capacity[d.Key]
		if !ok {
			continue
		}
		var n int64
		seen := map[int32]bool{}
		for _, unit := range d.Chain {
			for _, k := range unit.FileKey {
				f, ok := files[k]
				if !ok || seen[k] || f.Type != string(types.VirtualMachineFileLayoutExFileTypeDiskExtent) {
					continue
				}
				seen[k] = true
				n += max(f.Size, 0)
			}
		}
		out[d.Key] = min(n, c)
	}
	return out
}
