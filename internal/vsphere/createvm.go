package vsphere

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// ErrVMNameTaken is wrapped by CreateVMBeside's error when another VM
// already has the name.
var ErrVMNameTaken = errors.New("VM name taken")

// CreateVMBeside creates a powered-off VM named name in the folder,
// resource pool, host and datastore of VM besideRef, with one thin disk
// per capacity (in that order, on one paravirtual SCSI controller) and
// annotation as its notes (a restore into a new VM says which point it
// holds). It is idempotent: a VM of that name whose notes are annotation
// is the one an earlier attempt made, and is returned (given its disks
// first when that attempt stopped before them); a VM of that name
// with other notes is ErrVMNameTaken. Names with "/", "\" or "%" are
// refused (they would be escaped into another name).
func (c *Client) CreateVMBeside(ctx context.Context, besideRef, name string, capacities []int64, annotation string) (*VM, error) {
	if name == "" || len(name) > 80 || strings.ContainsAny(name, `/\%`) || strings.TrimSpace(name) != name {
		return nil, fmt.Errorf("vsphere: create VM %q: a name of 1 to 80 characters without /, \\, %% or surrounding spaces is needed", name)
	}
	existing, err := c.vmsNamed(ctx, name)
	if err != nil {
		return nil, err
	}
	if len(existing) > 0 {
		var mvm mo.VirtualMachine
		if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, existing[0], []string{"config.annotation"}, &mvm); err != nil {
			return nil, fmt.Errorf("vsphere: VM %q: %w", name, err)
		}
		if len(existing) != 1 || mvm.Config == nil || mvm.Config.Annotation != annotation {
			return nil, fmt.Errorf("vsphere: %w: a VM named %q exists (%s)", ErrVMNameTaken, name, existing[0].Value)
		}
		vm, err := c.loadVM(ctx, existing[0], name)
		if err != nil || len(vm.Disks) > 0 {
			return vm, err
		}
		// An earlier attempt made the VM and stopped before its disks
		// (they are added in one reconfiguration: all or none): they are
		// added now.
	}
	var src mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, vmRef(besideRef),
		[]string{"name", "parent", "resourcePool", "runtime.host", "config.files.vmPathName"}, &src); err != nil {
		return nil, fmt.Errorf("vsphere: create VM %q beside %s: %w", name, besideRef, vmNotFound(err))
	}
	if src.Parent == nil || src.ResourcePool == nil || src.Config == nil {
		return nil, fmt.Errorf("vsphere: create VM %q beside %q (%s): it has no folder, resource pool or config", name, src.Name, besideRef)
	}
	ds, _, ok := strings.Cut(src.Config.Files.VmPathName, "]")
	if !ok || !strings.HasPrefix(ds, "[") {
		return nil, fmt.Errorf("vsphere: create VM %q beside %q: its path %q names no datastore", name, src.Name, src.Config.Files.VmPathName)
	}
	ds += "]"
	var host *object.HostSystem
	if src.Runtime.Host != nil {
		host = object.NewHostSystem(c.vim, *src.Runtime.Host)
	}
	folder := object.NewFolder(c.vim, *src.Parent)
	pool := object.NewResourcePool(c.vim, *src.ResourcePool)
	// The VM first, its disks in a second step, as the lab creates its
	// own: a VM that exists without disks is found (by name and notes)
	// and completed by a retry.
	spec := types.VirtualMachineConfigSpec{
		Name:       name,
		GuestId:    string(types.VirtualMachineGuestOsIdentifierOtherGuest),
		Files:      &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("%s %s/%s.vmx", ds, name, name)},
		Annotation: annotation,
		NumCPUs:    1,
		MemoryMB:   128,
	}
	var ref types.ManagedObjectReference
	if len(existing) > 0 {
		ref = existing[0]
	} else {
		task, err := folder.CreateVM(ctx, spec, pool, host)
		if err != nil {
			return nil, fmt.Errorf("vsphere: create VM %q: %w", name, err)
		}
		res, err := task.WaitForResult(ctx)
		if err != nil {
			return nil, fmt.Errorf("vsphere: create VM %q: %w", name, err)
		}
		var ok bool
		if ref, ok = res.Result.(types.ManagedObjectReference); !ok {
			return nil, fmt.Errorf("vsphere: create VM %q: task returned %T, not a VM", name, res.Result)
		}
	}
	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return nil, err
	}
	devices = append(devices, scsi)
	changes := []types.BaseVirtualDeviceConfigSpec{
		&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: scsi},
	}
	for i, capacity := range capacities {
		file := fmt.Sprintf("%s %s/%s.vmdk", ds, name, name)
		if i > 0 {
			file = fmt.Sprintf("%s %s/%s_%d.vmdk", ds, name, name, i)
		}
		disk := devices.CreateDisk(scsi.(types.BaseVirtualController), types.ManagedObjectReference{}, file)
		disk.CapacityInBytes, disk.CapacityInKB = capacity, capacity/1024
		devices = append(devices, disk)
		changes = append(changes, &types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate, Device: disk})
	}
	vm := object.NewVirtualMachine(c.vim, ref)
	rt, err := vm.Reconfigure(ctx, types.VirtualMachineConfigSpec{DeviceChange: changes})
	if err == nil {
		err = rt.Wait(ctx)
	}
	if err != nil {
		// A VM without its disks is no use: it goes, so that a retry
		// creates it afresh.
		if dt, derr := vm.Destroy(ctx); derr == nil {
			_ = dt.Wait(ctx)
		}
		return nil, fmt.Errorf("vsphere: create VM %q: its disks: %w", name, err)
	}
	c.log.Info("VM created", "vm", name, "vm_ref", ref.Value, "beside", src.Name, "disks", len(capacities))
	return c.loadVM(ctx, ref, name)
}
