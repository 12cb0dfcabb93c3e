package vsphere

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// VM is a virtual machine as a backup sees it.
type VM struct {
	Ref        string // moref value, e.g. "vm-62"
	UUID       string // instance UUID (config.instanceUuid)
	Name       string
	CBTEnabled bool // config.changeTrackingEnabled
	Disks      []Disk
}

// Disk is one virtual disk of a VM's or a snapshot's config.
type Disk struct {
	Key      int32 // device key, stable for the life of the disk
	Label    string
	Capacity int64  // bytes
	FileName string // backing file, "[ds] vm/disk.vmdk"
	ChangeID string // CBT change ID of the backing; empty when CBT is off
}

// vmProps are the properties loaded for a VM.
var vmProps = []string{"name", "config.instanceUuid", "config.changeTrackingEnabled", "config.hardware.device"}

var vmMorefRE = regexp.MustCompile(`^vm-[0-9]+$`)

func vmRef(value string) types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "VirtualMachine", Value: value}
}

// FindVM resolves a VM by inventory path ("/DC0/vm/X", starts with "/"),
// moref value ("vm-62") or name, as stored ("web%2f01") or as shown
// ("web/01"; see escapeName). A name must be unique in the vCenter
// (ErrAmbiguousVM otherwise). Unknown: an error wrapping ErrVMNotFound that
// names ref.
func (c *Client) FindVM(ctx context.Context, ref string) (*VM, error) {
	if strings.TrimSpace(ref) == "" {
		return nil, fmt.Errorf("vsphere: %w: empty VM reference", ErrVMNotFound)
	}
	if strings.HasPrefix(ref, "/") {
		mref, err := object.NewSearchIndex(c.vim).FindByInventoryPath(ctx, ref)
		if err != nil {
			return nil, fmt.Errorf("vsphere: find VM %q: %w", ref, err)
		}
		if mref == nil || mref.Reference().Type != "VirtualMachine" {
			return nil, fmt.Errorf("vsphere: %w: no VM at inventory path %q", ErrVMNotFound, ref)
		}
		return c.loadVM(ctx, mref.Reference(), ref)
	}
	if vmMorefRE.MatchString(ref) {
		vm, err := c.loadVM(ctx, vmRef(ref), ref)
		if err == nil {
			return vm, nil
		}
		if !isNotFoundErr(err) {
			return nil, err
		}
		// Not a moref after all: perhaps a VM named like one.
	}
	refs, err := c.vmsNamed(ctx, ref)
	if err != nil {
		return nil, err
	}
	if esc := escapeName(ref); len(refs) == 0 && esc != ref {
		// A name as the vSphere Client shows it ("web/01"): vCenter stores
		// it escaped ("web%2f01").
		if refs, err = c.vmsNamed(ctx, esc); err != nil {
			return nil, err
		}
	}
	switch len(refs) {
	case 0:
		return nil, fmt.Errorf("vsphere: %w: no VM named %q (give a name, an inventory path /DC/vm/NAME or a moref vm-N)", ErrVMNotFound, ref)
	case 1:
		return c.loadVM(ctx, refs[0], ref)
	}
	vals := make([]string, len(refs))
	for i, r := range refs {
		vals[i] = r.Value
	}
	return nil, fmt.Errorf("vsphere: %w: %d VMs are named %q (%s): give the inventory path or the moref",
		ErrAmbiguousVM, len(refs), ref, strings.Join(vals, ", "))
}

// escapeName returns a name as vCenter stores it: "%" as "%25", "/" as
// "%2f" and "\" as "%5c".
func escapeName(name string) string {
	return strings.NewReplacer("%", "%25", "/", "%2f", `\`, "%5c").Replace(name)
}

// VMByUUID finds a VM by its instance UUID.
func (c *Client) VMByUUID(ctx context.Context, uuid string) (*VM, error) {
	if uuid == "" {
		return nil, fmt.Errorf("vsphere: %w: empty instance UUID", ErrVMNotFound)
	}
	mref, err := object.NewSearchIndex(c.vim).FindByUuid(ctx, nil, uuid, true, types.NewBool(true))
	if err != nil {
		return nil, fmt.Errorf("vsphere: find VM by instance UUID %s: %w", uuid, err)
	}
	if mref == nil {
		return nil, fmt.Errorf("vsphere: %w: no VM has instance UUID %s", ErrVMNotFound, uuid)
	}
	return c.loadVM(ctx, mref.Reference(), uuid)
}

// VMAt returns the VM at moref ref while it is still the VM of instance
// UUID uuid, read in one call of two small properties; else (the moref
// gone or reissued to another VM, or none given) the VM of that UUID, as
// VMByUUID finds it. A step that a backup's earlier step resolved (its
// snapshot, after PrepareVM) needs no more: found at ref, the VM has only
// Ref, UUID and Name (neither its disks nor CBTEnabled).
func (c *Client) VMAt(ctx context.Context, ref, uuid string) (*VM, error) {
	if uuid == "" {
		return nil, fmt.Errorf("vsphere: %w: empty instance UUID", ErrVMNotFound)
	}
	if ref != "" {
		var mvm mo.VirtualMachine
		err := property.DefaultCollector(c.vim).RetrieveOne(ctx, vmRef(ref), []string{"name", "config.instanceUuid"}, &mvm)
		switch {
		case err == nil && mvm.Config != nil && strings.EqualFold(mvm.Config.InstanceUuid, uuid):
			return &VM{Ref: ref, UUID: uuid, Name: mvm.Name}, nil
		case err != nil && !isFault(err, &types.ManagedObjectNotFound{}):
			return nil, fmt.Errorf("vsphere: VM %s (instance UUID %s): %w", ref, uuid, err)
		}
	}
	return c.VMByUUID(ctx, uuid)
}

// vmsNamed lists the VMs whose name is exactly name. Names are compared
// here, not in a property filter, whose patterns would treat '*' specially.
func (c *Client) vmsNamed(ctx context.Context, name string) ([]types.ManagedObjectReference, error) {
	vms, err := c.allVMs(ctx, []string{"name"})
	if err != nil {
		return nil, fmt.Errorf("vsphere: find VM %q: %w", name, err)
	}
	var out []types.ManagedObjectReference
	for _, vm := range vms {
		if vm.Name == name {
			out = append(out, vm.Self)
		}
	}
	return out, nil
}

// allVMs retrieves props of every VM in the inventory.
func (c *Client) allVMs(ctx context.Context, props []string) ([]mo.VirtualMachine, error) {
	m := view.NewManager(c.vim)
	v, err := m.CreateContainerView(ctx, c.vim.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		return nil, err
	}
	defer func() { _ = v.Destroy(context.WithoutCancel(ctx)) }()
	var vms []mo.VirtualMachine
	if err := v.Retrieve(ctx, []string{"VirtualMachine"}, props, &vms); err != nil {
		return nil, err
	}
	return vms, nil
}

// loadVM reads a VM's properties in one call. asked is what the
// caller named the VM by, for errors.
func (c *Client) loadVM(ctx context.Context, ref types.ManagedObjectReference, asked string) (*VM, error) {
	var mvm mo.VirtualMachine
	err := property.DefaultCollector(c.vim).RetrieveOne(ctx, ref, vmProps, &mvm)
	if err != nil {
		if isFault(err, &types.ManagedObjectNotFound{}) {
			return nil, &notFoundError{fmt.Errorf("vsphere: %w: %q (no VM %s)", ErrVMNotFound, asked, ref.Value)}
		}
		return nil, fmt.Errorf("vsphere: VM %q (%s): %w", asked, ref.Value, err)
	}
	if mvm.Config == nil {
		return nil, fmt.Errorf("vsphere: VM %q (%s) has no config (inaccessible or orphaned?)", asked, ref.Value)
	}
	return &VM{
		Ref:        ref.Value,
		UUID:       mvm.Config.InstanceUuid,
		Name:       mvm.Name,
		CBTEnabled: mvm.Config.ChangeTrackingEnabled != nil && *mvm.Config.ChangeTrackingEnabled,
		Disks:      disksOf(mvm.Config.Hardware.Device),
	}, nil
}

// notFoundError marks an ErrVMNotFound that came from a missing moref, so
// that FindVM can fall back to a name lookup.
type notFoundError struct{ err error }

func (e *notFoundError) Error() string { return e.err.Error() }
func (e *notFoundError) Unwrap() error { return e.err }

func isNotFoundErr(err error) bool {
	var nf *notFoundError
	return errors.As(err, &nf)
}

// disksOf lists the virtual disks of a device list, in device order.
func disksOf(devices []types.BaseVirtualDevice) []Disk {
	var out []Disk
	for _, dev := range devices {
		vd, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		d := Disk{Key: vd.Key, Capacity: vd.CapacityInBytes}
		if d.Capacity <= 0 {
			d.Capacity = vd.CapacityInKB * 1024
		}
		if info := vd.DeviceInfo; info != nil {
			d.Label = info.GetDescription().Label
		}
		switch b := vd.Backing.(type) {
		case *types.VirtualDiskFlatVer2BackingInfo:
			d.FileName, d.ChangeID = b.FileName, b.ChangeId
		case *types.VirtualDiskSparseVer2BackingInfo:
			d.FileName, d.ChangeID = b.FileName, b.ChangeId
		case *types.VirtualDiskRawDiskMappingVer1BackingInfo:
			d.FileName, d.ChangeID = b.FileName, b.ChangeId
		case *types.VirtualDiskSeSparseBackingInfo:
			d.FileName, d.ChangeID = b.FileName, b.ChangeId
		case types.BaseVirtualDeviceFileBackingInfo:
			d.FileName = b.GetVirtualDeviceFileBackingInfo().FileName
		}
		out = append(out, d)
	}
	return out
}

// EnableCBT switches change tracking on when it is off (ReconfigVM with
// changeTrackingEnabled) and reports whether it did. It reads the VM's
// current setting rather than trusting vm. vSphere applies the change at
// the next stun cycle (a snapshot does), so the first backup after
// enabling must be a full one. vm.CBTEnabled is updated.
func (c *Client) EnableCBT(ctx context.Context, vm *VM) (changed bool, err error) {
	ref := vmRef(vm.Ref)
	var mvm mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, ref, []string{"config.changeTrackingEnabled"}, &mvm); err != nil {
		if isFault(err, &types.ManagedObjectNotFound{}) {
			return false, fmt.Errorf("vsphere: enable CBT on %s (%s): %w", vm.Name, vm.Ref, ErrVMNotFound)
		}
		return false, fmt.Errorf("vsphere: enable CBT on %s (%s): %w", vm.Name, vm.Ref, err)
	}
	if mvm.Config != nil && mvm.Config.ChangeTrackingEnabled != nil && *mvm.Config.ChangeTrackingEnabled {
		vm.CBTEnabled = true
		return false, nil
	}
	task, err := object.NewVirtualMachine(c.vim, ref).Reconfigure(ctx, types.VirtualMachineConfigSpec{ChangeTrackingEnabled: types.NewBool(true)})
	if err == nil {
		_, err = c.waitTask(ctx, task.Reference())
	}
	if err != nil {
		return false, fmt.Errorf("vsphere: enable CBT on %s (%s): %w", vm.Name, vm.Ref, err)
	}
	vm.CBTEnabled = true
	c.log.Info("change tracking enabled", "vm", vm.Name, "vm_ref", vm.Ref)
	return true, nil
}
