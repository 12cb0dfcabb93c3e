package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/lab/labapi"
)

// Errors of the configuration changes (GrowDisk, AddDisk, RemoveDisk,
// CreateVM); test with errors.Is.
var (
	ErrHasSnapshots = labapi.ErrHasSnapshots
	ErrBadCapacity  = labapi.ErrBadCapacity
	ErrBadName      = labapi.ErrBadName
	ErrVMExists     = labapi.ErrVMExists
)

// MaxDiskCapacity is the largest capacity the lab gives a disk: vSphere's
// limit for a VMDK (62 TB). The lab's file system may refuse less (ext4
// stops at 16 TiB per file).
const MaxDiskCapacity = 62 << 40

// CapacityUnit is the granularity of disk capacities: the lab is strict
// where vSphere is loose. A VM's config reports a disk's size twice,
// capacityInBytes and the older capacityInKB, and many clients still read
// the latter; with whole KiB both always agree. (vSphere itself only needs
// whole 512-byte sectors and rounds capacityInKB down.)
const CapacityUnit = 1 << 10

// MaxNameLength is the longest VM name the lab accepts, counted in
// characters after escaping (see CreateVM).
const MaxNameLength = 80

// opTimeout bounds one configuration change of the Go API.
const opTimeout = 2 * time.Minute

// Where CreateVM puts VMs: the VPX model's standalone host DC0_H0.
const (
	createDatacenter = "/DC0"
	createHost       = "/DC0/host/DC0_H0/DC0_H0"
	createDatastore  = "LocalDS_0"
)

// EscapeName returns a VM name as vCenter stores it: "%" becomes "%25",
// "/" becomes "%2f" and "\" becomes "%5c" (the simulator escapes every "%";
// vCenter keeps a "%" that already starts an escape sequence). The stored,
// escaped name is what the VM's name property, inventory paths and the
// datastore folder show: "web/01" is found at /DC0/vm/web%2f01.
func EscapeName(name string) string {
	name = strings.ReplaceAll(name, `%`, "%25")
	name = strings.ReplaceAll(name, `/`, "%2f")
	return strings.ReplaceAll(name, `\`, "%5c")
}

func checkCapacity(capacity int64) error {
	switch {
	case capacity <= 0:
		return fmt.Errorf("lab: %w: %d bytes: a disk needs a positive capacity", ErrBadCapacity, capacity)
	case capacity%CapacityUnit != 0:
		return fmt.Errorf("lab: %w: %d bytes is not a multiple of %d (capacityInKB must equal capacityInBytes/1024)", ErrBadCapacity, capacity, CapacityUnit)
	case capacity > MaxDiskCapacity:
		return fmt.Errorf("lab: %w: %d bytes is more than the %d of a VMDK", ErrBadCapacity, capacity, int64(MaxDiskCapacity))
	}
	return nil
}

func checkName(name string) error {
	escaped := EscapeName(name)
	switch {
	case name == "":
		return fmt.Errorf("lab: %w: empty", ErrBadName)
	case !utf8.ValidString(name):
		return fmt.Errorf("lab: %w %q: not UTF-8", ErrBadName, name)
	case strings.IndexFunc(name, unicode.IsControl) >= 0:
		return fmt.Errorf("lab: %w %q: control characters", ErrBadName, name)
	case strings.TrimSpace(name) != name:
		return fmt.Errorf("lab: %w %q: leading or trailing white space", ErrBadName, name)
	case name == "." || name == "..":
		return fmt.Errorf("lab: %w %q: not a folder name", ErrBadName, name)
	case utf8.RuneCountInString(escaped) > MaxNameLength:
		return fmt.Errorf("lab: %w %q: more than %d characters escaped", ErrBadName, name, MaxNameLength)
	}
	return nil
}

func hasSnapshots(vm *simulator.VirtualMachine) bool {
	return vm.Snapshot != nil && (len(vm.Snapshot.RootSnapshotList) > 0 || vm.Snapshot.CurrentSnapshot != nil)
}

// requestedCapacity reads the capacity a disk edit asks for, as vSphere
// does: capacityInBytes when it differs from the current one, else
// capacityInKB; a field left at zero or at the current value asks for no
// change. Both changed and disagreeing is an invalid spec (ok false).
func requestedCapacity(cur int64, d *types.VirtualDisk) (int64, bool) {
	byBytes := d.CapacityInBytes != 0 && d.CapacityInBytes != cur
	byKB := d.CapacityInKB != 0 && d.CapacityInKB*1024 != cur
	switch {
	case byBytes && byKB && d.CapacityInBytes != d.CapacityInKB*1024:
		return 0, false
	case byBytes:
		return d.CapacityInBytes, true
	case byKB:
		return d.CapacityInKB * 1024, true
	}
	return cur, true
}

// reconfigFault is a refused configuration change: the vSphere fault a
// client sees and the lab's error.
type reconfigFault struct {
	fault types.BaseMethodFault
	err   error
}

func refuse(f types.BaseMethodFault, err error) *reconfigFault {
	msg := strings.TrimPrefix(err.Error(), "lab: ")
	f.GetMethodFault().FaultMessage = []types.LocalizableMessage{{Key: "com.cbtflow.lab.reconfigure", Message: msg}}
	return &reconfigFault{fault: f, err: err}
}

// checkReconfig applies the lab's rules to the disk changes of a
// ReconfigVM spec and fills in both capacity fields of every disk edit and
// new disk (the simulator mishandles an edit that sets only capacityInKB).
// Called with the VM locked.
func (l *Lab) checkReconfig(vm *simulator.VirtualMachine, spec *types.VirtualMachineConfigSpec) *reconfigFault {
	devices := object.VirtualDeviceList(vm.Config.Hardware.Device)
	for i, change := range spec.DeviceChange {
		ds := change.GetVirtualDeviceConfigSpec()
		vd, ok := ds.Device.(*types.VirtualDisk)
		if !ok {
			continue
		}
		prop := func(p string) types.InvalidDeviceSpec {
			return types.InvalidDeviceSpec{InvalidVmConfig: types.InvalidVmConfig{Property: p}, DeviceIndex: int32(i)}
		}
		switch ds.Operation {
		case types.VirtualDeviceConfigSpecOperationAdd:
			if ds.FileOperation != types.VirtualDeviceConfigSpecFileOperationCreate {
				continue // attaching an existing file
			}
			capacity := vd.CapacityInBytes
			if capacity == 0 {
				capacity = vd.CapacityInKB * 1024
			} else if vd.CapacityInKB != 0 && vd.CapacityInKB*1024 != capacity {
				f := prop("virtualDeviceSpec.device.capacityInKB")
				return refuse(&f, fmt.Errorf("lab: %w: new disk: capacityInBytes %d and capacityInKB %d disagree", ErrBadCapacity, capacity, vd.CapacityInKB))
			}
			if err := checkCapacity(capacity); err != nil {
				f := prop("virtualDeviceSpec.device.capacityInBytes")
				return refuse(&f, err)
			}
			vd.CapacityInBytes, vd.CapacityInKB = capacity, capacity/1024
		case types.VirtualDeviceConfigSpecOperationEdit:
			old, backing := flatDisk(devices.FindByKey(vd.Key))
			if backing == nil {
				continue
			}
			cur := capacityOf(old)
			capacity, ok := requestedCapacity(cur, vd)
			switch {
			case !ok:
				f := prop("virtualDeviceSpec.device.capacityInKB")
				return refuse(&f, fmt.Errorf("lab: %w: disk %d: capacityInBytes %d and capacityInKB %d disagree", ErrBadCapacity, vd.Key, vd.CapacityInBytes, vd.CapacityInKB))
			case capacity < cur:
				f := &types.InvalidDeviceOperation{InvalidDeviceSpec: prop("virtualDeviceSpec.device.capacityInBytes")}
				return refuse(f, fmt.Errorf("lab: %w: disk %d: %d bytes is less than its capacity %d: disks do not shrink", ErrBadCapacity, vd.Key, capacity, cur))
			case capacity > cur && hasSnapshots(vm):
				f := &types.InvalidDeviceOperation{InvalidDeviceSpec: prop("virtualDeviceSpec.device.capacityInBytes")}
				return refuse(f, fmt.Errorf("lab: %w: disk %d of %q cannot be extended while the VM has snapshots", ErrHasSnapshots, vd.Key, vm.Name))
			case capacity > cur:
				if err := checkCapacity(capacity); err != nil {
					f := prop("virtualDeviceSpec.device.capacityInBytes")
					return refuse(&f, err)
				}
			}
			vd.CapacityInBytes, vd.CapacityInKB = capacity, capacity/1024
		case types.VirtualDeviceConfigSpecOperationRemove:
			if _, backing := flatDisk(devices.FindByKey(vd.Key)); backing != nil && hasSnapshots(vm) {
				f := &types.InvalidDeviceOperation{InvalidDeviceSpec: prop("virtualDeviceSpec.operation")}
				return refuse(f, fmt.Errorf("lab: %w: disk %d of %q cannot be removed while the VM has snapshots", ErrHasSnapshots, vd.Key, vm.Name))
			}
		}
	}
	return nil
}

// refusedReconfigTask answers ReconfigVM_Task with a task that fails with
// f, as vSphere reports a refused device change.
func refusedReconfigTask(ctx *simulator.Context, vm *simulator.VirtualMachine, f types.BaseMethodFault) soap.HasFault {
	task := simulator.CreateTask(vm, "reconfigVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, f
	})
	return &methods.ReconfigVM_TaskBody{Res: &types.ReconfigVM_TaskResponse{Returnval: task.Run(ctx)}}
}

// onDevicesChanged follows a VM's device changes into the disk images:
// a new disk gets a new, empty image; a removed disk loses its image; an
// edited disk follows its capacity (a grown image marks the new range as
// changed, see disk.resize). It runs inside the simulator's task, with the
// VM locked, right after the change was applied to the config.
func (l *Lab) onDevicesChanged(mvm *mo.VirtualMachine, changes []types.PropertyChange) {
	if !l.ready.Load() || mvm.Config == nil {
		return
	}
	const prefix = "config.hardware.device["
	devices := object.VirtualDeviceList(mvm.Config.Hardware.Device)
	vmRef := mvm.Self.Value
	for _, c := range changes {
		rest, ok := strings.CutPrefix(c.Name, prefix)
		if !ok {
			continue
		}
		k, err := strconv.ParseInt(strings.TrimSuffix(rest, "]"), 10, 32)
		if err != nil {
			continue
		}
		key := int32(k)
		vd, backing := flatDisk(devices.FindByKey(key))
		switch {
		case c.Op == types.PropertyChangeOpRemove && backing == nil:
			l.dropDisk(vmRef, key)
		case c.Op == types.PropertyChangeOpAdd && backing != nil:
			if err := l.newDisk(vmRef, key, capacityOf(vd)); err != nil {
				l.log.Error("disk image not created", "vm", mvm.Name, "disk", key, "err", err)
				continue
			}
			l.log.Info("disk added", "vm", mvm.Name, "disk", key, "capacity", capacityOf(vd), "file", backing.FileName)
		case backing != nil:
			before := l.trackedCapacity(vmRef, key)
			if _, err := l.disk(vmRef, key, capacityOf(vd)); err != nil {
				l.log.Error("disk image not resized", "vm", mvm.Name, "disk", key, "err", err)
				continue
			}
			if before != capacityOf(vd) {
				l.log.Info("disk capacity changed", "vm", mvm.Name, "disk", key, "from", before, "to", capacityOf(vd))
			}
		}
	}
}

func (l *Lab) imagePath(vmRef string, key int32) string {
	return filepath.Join(l.dir, "disks", fmt.Sprintf("%s-%d.raw", vmRef, key))
}

func (l *Lab) trackedCapacity(vmRef string, key int32) int64 {
	l.mu.Lock()
	d := l.disks[diskID{vmRef, key}]
	l.mu.Unlock()
	if d == nil {
		return -1
	}
	return d.capacitySafe()
}

// newDisk starts tracking a disk that was just added: a new, empty image,
// whatever an earlier lab left under that name.
func (l *Lab) newDisk(vmRef string, key int32, capacity int64) error {
	id := diskID{vmRef, key}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return errors.New("lab: closed")
	}
	if old := l.disks[id]; old != nil {
		old.close(true)
		delete(l.disks, id)
	}
	p := l.imagePath(vmRef, key)
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	d, err := openDisk(id, p, capacity, l.log)
	if err != nil {
		return err
	}
	l.disks[id] = d
	return nil
}

// dropDisk stops tracking a removed disk and deletes its live image.
func (l *Lab) dropDisk(vmRef string, key int32) {
	id := diskID{vmRef, key}
	l.mu.Lock()
	d := l.disks[id]
	delete(l.disks, id)
	l.mu.Unlock()
	if d != nil {
		d.close(true)
		l.log.Info("disk removed", "vm", vmRef, "disk", key)
	}
}

// close closes the live image, and deletes it when remove is set. Frozen
// images stay until their snapshots go (one that was the live image's
// file keeps it under its own name).
func (d *disk) close(remove bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f != nil {
		d.f.Close()
		d.f = nil
	}
	d.last = nil
	d.gone = true
	if remove {
		_ = os.Remove(d.path)
	}
}

// removeStaleImages deletes live images that no disk of the inventory
// uses: disks and VMs added by an earlier lab on the same Dir, which the
// simulator's in-memory inventory forgot.
func (l *Lab) removeStaleImages() error {
	entries, err := os.ReadDir(filepath.Join(l.dir, "disks"))
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	l.mu.Lock()
	used := map[string]bool{}
	for _, d := range l.disks {
		used[filepath.Base(d.path)] = true
	}
	l.mu.Unlock()
	for _, e := range entries {
		// "<image>.unshare": a copy disk.unshare did not finish.
		stale := strings.HasSuffix(e.Name(), ".raw") || strings.HasSuffix(e.Name(), ".raw.unshare")
		if e.IsDir() || used[e.Name()] || !stale {
			continue
		}
		if err := os.Remove(filepath.Join(l.dir, "disks", e.Name())); err != nil {
			return fmt.Errorf("lab: remove stale image: %w", err)
		}
		l.log.Info("stale disk image removed", "file", e.Name())
	}
	return nil
}

// session runs f with a session on the lab's own endpoint. Configuration
// changes of the Go API are serialised, so that AddDisk can tell its new
// disk from the others.
func (l *Lab) session(f func(ctx context.Context, c *vim25.Client) error) error {
	l.cfgMu.Lock()
	defer l.cfgMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	c, logout, err := l.login(ctx)
	if err != nil {
		return err
	}
	defer logout()
	return f(ctx, c)
}

// reconfigure sends spec through ReconfigVM_Task, after the lab's own
// check (which the server repeats atomically): a refusal is the lab's
// error, not just the vSphere fault.
func (l *Lab) reconfigure(ctx context.Context, c *vim25.Client, vm *simulator.VirtualMachine, spec types.VirtualMachineConfigSpec) error {
	check := func() error {
		s := spec
		s.DeviceChange = slices.Clone(spec.DeviceChange)
		var rf *reconfigFault
		l.model.Service.Context.Map.WithLock(l.lockCtx(), vm, func() { rf = l.checkReconfig(vm, &s) })
		if rf != nil {
			return rf.err
		}
		return nil
	}
	if err := check(); err != nil {
		return err
	}
	task, err := object.NewVirtualMachine(c, vm.Self).Reconfigure(ctx, spec)
	if err == nil {
		err = task.Wait(ctx)
	}
	if err != nil {
		if cerr := check(); cerr != nil {
			return cerr // the VM changed in between, e.g. a snapshot
		}
		return fmt.Errorf("lab: reconfigure %s: %w", vm.Self.Value, err)
	}
	return nil
}

// GrowDisk extends a VM's disk to capacity bytes, as ReconfigVM with a
// larger capacityInBytes does. It is refused (ErrHasSnapshots) while the
// VM has snapshots, as vSphere refuses it; capacity must be larger than
// the current one, a multiple of CapacityUnit and at most MaxDiskCapacity
// (ErrBadCapacity). The image grows sparsely and keeps its content. The
// change-ID series goes on: a change ID from before the growth stays valid
// for later snapshots, which report the whole grown range (from the block
// holding the old end) as changed, besides what was written; it reads as
// zeros unless written.
func (l *Lab) GrowDisk(vmName string, key int32, capacity int64) error {
	vm, err := l.findVM(vmName)
	if err != nil {
		return err
	}
	info, err := l.Disk(vm.Self.Value, key)
	if err != nil {
		return err
	}
	if capacity <= info.Capacity {
		return fmt.Errorf("lab: %w: %d bytes is not more than the capacity %d of disk %d", ErrBadCapacity, capacity, info.Capacity, key)
	}
	if err := checkCapacity(capacity); err != nil {
		return err
	}
	return l.session(func(ctx context.Context, c *vim25.Client) error {
		devices, err := object.NewVirtualMachine(c, vm.Self).Device(ctx)
		if err != nil {
			return fmt.Errorf("lab: grow disk: %w", err)
		}
		vd, backing := flatDisk(devices.FindByKey(key))
		if backing == nil {
			return fmt.Errorf("lab: %w %d on VM %q", ErrUnknownDisk, key, vmName)
		}
		vd.CapacityInBytes, vd.CapacityInKB = capacity, capacity/1024
		spec := types.VirtualMachineConfigSpec{DeviceChange: []types.BaseVirtualDeviceConfigSpec{
			&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationEdit, Device: vd},
		}}
		return l.reconfigure(ctx, c, vm, spec)
	})
}

// AddDisk adds a new thin disk of capacity bytes to a VM through
// ReconfigVM and returns its device key. The simulator names the file in
// the VM's folder after the VM ("[LocalDS_0] vm/vm.vmdk", then
// "vm_1.vmdk", ...). The disk is tracked like the others, with an empty
// image; its change-ID series starts at the next snapshot taken with CBT
// on. Allowed while the VM has snapshots (they do not know the disk).
func (l *Lab) AddDisk(vmName string, capacity int64) (int32, error) {
	if err := checkCapacity(capacity); err != nil {
		return 0, err
	}
	vm, err := l.findVM(vmName)
	if err != nil {
		return 0, err
	}
	var key int32
	err = l.session(func(ctx context.Context, c *vim25.Client) error {
		ovm := object.NewVirtualMachine(c, vm.Self)
		devices, err := ovm.Device(ctx)
		if err != nil {
			return fmt.Errorf("lab: add disk: %w", err)
		}
		before := map[int32]bool{}
		for _, d := range devices {
			before[d.GetVirtualDevice().Key] = true
		}
		var changes []types.BaseVirtualDeviceConfigSpec
		ctrl := devices.PickController((*types.VirtualSCSIController)(nil))
		if ctrl == nil {
			dev, err := devices.CreateSCSIController("pvscsi")
			if err != nil {
				return fmt.Errorf("lab: add disk: %w", err)
			}
			devices = append(devices, dev)
			ctrl = dev.(types.BaseVirtualController)
			changes = append(changes, &types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: dev})
		}
		disk := devices.CreateDisk(ctrl, types.ManagedObjectReference{}, "")
		disk.CapacityInBytes, disk.CapacityInKB = capacity, capacity/1024
		changes = append(changes, &types.VirtualDeviceConfigSpec{
			Operation:     types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
			Device:        disk,
		})
		if err := l.reconfigure(ctx, c, vm, types.VirtualMachineConfigSpec{DeviceChange: changes}); err != nil {
			return err
		}
		after, err := ovm.Device(ctx)
		if err != nil {
			return fmt.Errorf("lab: add disk: %w", err)
		}
		for _, d := range after {
			if _, b := flatDisk(d); b != nil && !before[d.GetVirtualDevice().Key] {
				key = max(key, d.GetVirtualDevice().Key)
			}
		}
		if key == 0 {
			return fmt.Errorf("lab: add disk: no new disk on %s", vm.Self.Value)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	// The hook made the image; make sure of it.
	info, err := l.Disk(vm.Self.Value, key)
	if err != nil {
		return 0, err
	}
	if _, err := l.disk(info.VMRef, key, info.Capacity); err != nil {
		return 0, err
	}
	return key, nil
}

// RemoveDisk removes a disk from a VM through ReconfigVM (deleting its
// files) and stops tracking it; its live image is deleted. Stricter than
// vSphere, it is refused while the VM has snapshots (ErrHasSnapshots).
func (l *Lab) RemoveDisk(vmName string, key int32) error {
	vm, err := l.findVM(vmName)
	if err != nil {
		return err
	}
	if _, err := l.Disk(vm.Self.Value, key); err != nil {
		return err
	}
	return l.session(func(ctx context.Context, c *vim25.Client) error {
		devices, err := object.NewVirtualMachine(c, vm.Self).Device(ctx)
		if err != nil {
			return fmt.Errorf("lab: remove disk: %w", err)
		}
		vd, backing := flatDisk(devices.FindByKey(key))
		if backing == nil {
			return fmt.Errorf("lab: %w %d on VM %q", ErrUnknownDisk, key, vmName)
		}
		spec := types.VirtualMachineConfigSpec{DeviceChange: []types.BaseVirtualDeviceConfigSpec{
			&types.VirtualDeviceConfigSpec{
				Operation:     types.VirtualDeviceConfigSpecOperationRemove,
				FileOperation: types.VirtualDeviceConfigSpecFileOperationDestroy,
				Device:        vd,
			},
		}}
		return l.reconfigure(ctx, c, vm, spec)
	})
}

// CreateVM creates a powered-on VM in /DC0/vm on host DC0_H0 (its
// resource pool, datastore LocalDS_0) with one thin disk per capacity
// (none is fine), CBT enabled and every disk tracked like those of the
// default VMs. It returns the VM's moref value.
//
// Names are stored as vCenter stores them (see EscapeName): "web/01"
// becomes the name "web%2f01", with folder and files
// "[LocalDS_0] web%2f01/web%2f01.vmx", "web%2f01.vmdk", "web%2f01_1.vmdk",
// ...; "../../etc" becomes "..%2f..%2fetc", one folder inside the
// datastore. The lab's API and endpoints accept the name as given or as
// stored; govmomi's finder needs the stored one ("/DC0/vm/web%2f01"),
// since it splits paths at "/". Refused (ErrBadName): empty names, "." and
// "..", control characters, leading or trailing blanks, invalid UTF-8 and
// more than MaxNameLength characters once escaped; a name another VM has
// (anywhere in the inventory) is ErrVMExists.
func (l *Lab) CreateVM(name string, diskCapacities ...int64) (string, error) {
	if err := checkName(name); err != nil {
		return "", err
	}
	for _, c := range diskCapacities {
		if err := checkCapacity(c); err != nil {
			return "", err
		}
	}
	escaped := EscapeName(name)
	var ref types.ManagedObjectReference
	err := l.session(func(ctx context.Context, c *vim25.Client) error {
		if len(l.vmsNamed(name)) > 0 {
			return fmt.Errorf("lab: %w: %q", ErrVMExists, escaped)
		}
		finder := find.NewFinder(c)
		dc, err := finder.Datacenter(ctx, createDatacenter)
		if err != nil {
			return fmt.Errorf("lab: create VM: %w", err)
		}
		finder.SetDatacenter(dc)
		folders, err := dc.Folders(ctx)
		if err != nil {
			return fmt.Errorf("lab: create VM: %w", err)
		}
		host, err := finder.HostSystem(ctx, createHost)
		if err != nil {
			return fmt.Errorf("lab: create VM: %w", err)
		}
		pool, err := host.ResourcePool(ctx)
		if err != nil {
			return fmt.Errorf("lab: create VM: %w", err)
		}
		// The devices come in a second step: for a name with "/", "\" or
		// "%", the simulator's CreateVM duplicates the spec's device list
		// (it decodes a copy of the spec onto itself) and refuses it.
		spec := types.VirtualMachineConfigSpec{
			Name:                  name, // the simulator escapes it, as vCenter does
			GuestId:               string(types.VirtualMachineGuestOsIdentifierOtherGuest),
			Files:                 &types.VirtualMachineFileInfo{VmPathName: "[" + createDatastore + "] " + escaped + "/" + escaped + ".vmx"},
			ChangeTrackingEnabled: types.NewBool(true),
		}
		task, err := folders.VmFolder.CreateVM(ctx, spec, pool, host)
		if err != nil {
			return fmt.Errorf("lab: create VM %q: %w", escaped, err)
		}
		res, err := task.WaitForResult(ctx, nil)
		if err != nil {
			return fmt.Errorf("lab: create VM %q: %w", escaped, err)
		}
		ref = res.Result.(types.ManagedObjectReference)
		vm, ok := l.model.Service.Context.Map.Get(ref).(*simulator.VirtualMachine)
		if !ok {
			return fmt.Errorf("lab: create VM %q: %s not in the inventory", escaped, ref.Value)
		}
		// vSphere derives this from the hardware version, the simulator
		// from the disks: a VM without disks supports CBT too.
		l.model.Service.Context.Map.WithLock(l.lockCtx(), vm, func() { vm.Capability.ChangeTrackingSupported = true })
		if err := l.reconfigure(ctx, c, vm, types.VirtualMachineConfigSpec{DeviceChange: newDisks(escaped, diskCapacities)}); err != nil {
			if task, derr := object.NewVirtualMachine(c, ref).Destroy(ctx); derr == nil {
				_ = task.Wait(ctx)
			}
			return fmt.Errorf("lab: create VM %q: disks: %w", escaped, err)
		}
		task, err = object.NewVirtualMachine(c, ref).PowerOn(ctx)
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			return fmt.Errorf("lab: power on %q: %w", escaped, err)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	disks, err := l.Disks(ref.Value)
	if err != nil {
		return "", err
	}
	for _, d := range disks {
		if _, err := l.disk(d.VMRef, d.Key, d.Capacity); err != nil {
			return "", err
		}
	}
	l.log.Info("VM created", "vm", escaped, "ref", ref.Value, "disks", len(disks))
	return ref.Value, nil
}

// newDisks is the device change that gives a new VM a SCSI controller and
// thin disks named as vSphere names them: "[ds] folder/name.vmdk",
// "name_1.vmdk", ...
func newDisks(escaped string, capacities []int64) []types.BaseVirtualDeviceConfigSpec {
	var devices object.VirtualDeviceList
	scsi, _ := devices.CreateSCSIController("pvscsi") // a known type: no error
	devices = append(devices, scsi)
	changes := []types.BaseVirtualDeviceConfigSpec{
		&types.VirtualDeviceConfigSpec{Operation: types.VirtualDeviceConfigSpecOperationAdd, Device: scsi},
	}
	folder := "[" + createDatastore + "] " + escaped + "/"
	for i, capacity := range capacities {
		file := escaped + ".vmdk"
		if i > 0 {
			file = fmt.Sprintf("%s_%d.vmdk", escaped, i)
		}
		disk := devices.CreateDisk(scsi.(types.BaseVirtualController), types.ManagedObjectReference{}, folder+file)
		disk.CapacityInBytes, disk.CapacityInKB = capacity, capacity/1024
		devices = append(devices, disk)
		changes = append(changes, &types.VirtualDeviceConfigSpec{
			Operation:     types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
			Device:        disk,
		})
	}
	return changes
}

// RemoveVM powers a VM off and destroys it, with its files, snapshots,
// frozen and live images.
func (l *Lab) RemoveVM(vmName string) error {
	vm, err := l.findVM(vmName)
	if err != nil {
		return err
	}
	return l.session(func(ctx context.Context, c *vim25.Client) error {
		ovm := object.NewVirtualMachine(c, vm.Self)
		state, err := ovm.PowerState(ctx)
		if err != nil {
			return fmt.Errorf("lab: remove VM: %w", err)
		}
		if state != types.VirtualMachinePowerStatePoweredOff {
			task, err := ovm.PowerOff(ctx)
			if err == nil {
				err = task.Wait(ctx)
			}
			if err != nil {
				return fmt.Errorf("lab: remove VM: power off: %w", err)
			}
		}
		task, err := ovm.Destroy(ctx)
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			return fmt.Errorf("lab: remove VM: %w", err)
		}
		l.mu.Lock()
		delete(l.pending, vm.Self.Value)
		l.mu.Unlock()
		l.log.Info("VM removed", "vm", vm.Self.Value)
		return nil
	})
}
