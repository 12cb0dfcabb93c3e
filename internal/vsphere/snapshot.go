package vsphere

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/task"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// Snapshot is a VM snapshot with the disks of its config.
type Snapshot struct {
	Ref     string // moref value, e.g. "snapshot-123"
	Name    string
	Created time.Time
	// Disks come from the snapshot's config (snapshot.config.hardware.device):
	// their ChangeID is the one the next backup queries from, and their
	// FileName is the frozen backing file a disk source opens.
	Disks []Disk
}

// SnapshotInfo is one snapshot found by Snapshots.
type SnapshotInfo struct {
	VMRef, VMName, VMUUID string
	Ref, Name             string
	Created               time.Time
}

func snapshotRef(value string) types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: value}
}

// createSnapshotTask reports whether a task is a snapshot creation
// (CreateSnapshot_Task, or CreateSnapshotEx_Task on newer vSphere).
func createSnapshotTask(info types.TaskInfo) bool {
	switch info.DescriptionId {
	case "VirtualMachine.createSnapshot", "VirtualMachine.createSnapshotEx":
		return true
	}
	switch info.Name {
	case "CreateSnapshot_Task", "CreateSnapshotEx_Task":
		return true
	}
	return false
}

// CreateSnapshot takes a crash-consistent snapshot of vm (no memory, no
// quiescing) named name, typically "cbtflow-<backup id>". It is idempotent:
// it first waits for the VM's snapshot creations still running (an earlier
// attempt's task), then returns the snapshot of that name if one exists
// anywhere in the VM's snapshot tree, and creates one only otherwise.
// Disks, with their change IDs and backing files, come from the snapshot's
// config.
func (c *Client) CreateSnapshot(ctx context.Context, vm *VM, name string) (*Snapshot, error) {
	return c.CreateSnapshotDescribed(ctx, vm, name, "cbtflow backup (removed when the backup ends)")
}

// CreateSnapshotDescribed is CreateSnapshot with the description the
// snapshot shows in vSphere's snapshot manager (a restore's says that
// reverting to it undoes the restore).
func (c *Client) CreateSnapshotDescribed(ctx context.Context, vm *VM, name, description string) (*Snapshot, error) {
	if name == "" {
		return nil, fmt.Errorf("vsphere: create snapshot of %s: empty snapshot name", vm.Name)
	}
	ref := vmRef(vm.Ref)
	// An earlier attempt's creation may still run: it is waited for
	// first, and only then is the tree read (read together, a task that
	// ends between the two reads would make a second snapshot of the
	// name).
	if err := c.waitSnapshotTasks(ctx, vm); err != nil {
		return nil, err
	}
	if s, err := c.FindSnapshot(ctx, vm.Ref, name); err != nil || s != nil {
		if s != nil {
			c.log.Info("snapshot exists, reusing it", "vm", vm.Name, "vm_ref", vm.Ref, "snapshot", s.Ref, "snapshot_name", name)
		}
		return s, err
	}
	const memory, quiesce = false, false // crash-consistent
	task, err := object.NewVirtualMachine(c.vim, ref).CreateSnapshot(ctx, name, description, memory, quiesce)
	if err != nil {
		return nil, fmt.Errorf("vsphere: create snapshot %q of %s (%s): %w", name, vm.Name, vm.Ref, vmNotFound(err))
	}
	info, err := c.waitTask(ctx, task.Reference())
	if err != nil {
		return nil, fmt.Errorf("vsphere: create snapshot %q of %s (%s): %w", name, vm.Name, vm.Ref, vmNotFound(err))
	}
	sref, ok := info.Result.(types.ManagedObjectReference)
	if !ok {
		return nil, fmt.Errorf("vsphere: create snapshot %q of %s (%s): task returned %T, not a snapshot", name, vm.Name, vm.Ref, info.Result)
	}
	c.log.Info("snapshot created", "vm", vm.Name, "vm_ref", vm.Ref, "snapshot", sref.Value, "snapshot_name", name)
	return c.createdSnapshot(ctx, vm, name, sref)
}

// createdSnapshot reads a snapshot just created as a retry would find it:
// its name and time from the VM's tree, its disks from its config, both
// in one call.
func (c *Client) createdSnapshot(ctx context.Context, vm *VM, name string, sref types.ManagedObjectReference) (*Snapshot, error) {
	ref := vmRef(vm.Ref)
	res, err := property.DefaultCollector(c.vim).RetrieveProperties(ctx, types.RetrieveProperties{SpecSet: []types.PropertyFilterSpec{{
		ObjectSet: []types.ObjectSpec{{Obj: ref}, {Obj: sref}},
		PropSet: []types.PropertySpec{
			{Type: ref.Type, PathSet: []string{"name", "snapshot"}},
			{Type: sref.Type, PathSet: []string{"config.hardware.device"}},
		},
	}}})
	if err != nil {
		if isFault(err, &types.ManagedObjectNotFound{}) {
			// The VM or the snapshot is gone: the reads of a retry say
			// which.
			s, ferr := c.findSnapshot(ctx, vm.Ref, name, func(t types.VirtualMachineSnapshotTree) bool { return t.Snapshot.Value == sref.Value })
			if ferr == nil && s == nil {
				ferr = fmt.Errorf("vsphere: %w: snapshot %s (%q) of %s is gone right after its creation", ErrSnapshotNotFound, sref.Value, name, vm.Name)
			}
			return s, ferr
		}
		return nil, fmt.Errorf("vsphere: snapshot %s (%q) of %s: %w", sref.Value, name, vm.Name, err)
	}
	var mvm mo.VirtualMachine
	var ms *mo.VirtualMachineSnapshot
	for _, oc := range res.Returnval {
		// By type and value: a server may name its GUID in the answer.
		switch (types.ManagedObjectReference{Type: oc.Obj.Type, Value: oc.Obj.Value}) {
		case ref:
			err = mo.LoadObjectContent([]types.ObjectContent{oc}, &mvm)
		case sref:
			ms = &mo.VirtualMachineSnapshot{}
			err = mo.LoadObjectContent([]types.ObjectContent{oc}, ms)
		}
		if err != nil {
			return nil, fmt.Errorf("vsphere: snapshot %s (%q) of %s: %w", sref.Value, name, vm.Name, err)
		}
	}
	var at *types.VirtualMachineSnapshotTree
	if mvm.Snapshot != nil {
		walkSnapshots(mvm.Snapshot.RootSnapshotList, func(t types.VirtualMachineSnapshotTree) {
			if t.Snapshot.Type == sref.Type && t.Snapshot.Value == sref.Value && at == nil {
				at = &t
			}
		})
	}
	if at == nil || ms == nil {
		return nil, fmt.Errorf("vsphere: %w: snapshot %s (%q) of %s is not in its snapshot tree after creation", ErrSnapshotNotFound, sref.Value, name, vm.Name)
	}
	return &Snapshot{Ref: sref.Value, Name: at.Name, Created: at.CreateTime, Disks: disksOf(ms.Config.Hardware.Device)}, nil
}

// waitTask waits for a task to end and returns its info; a task that
// failed returns its fault, as object.Task.WaitForResult does. The task's
// info is read once first: a task that ended already (a snapshot of the
// lab, a removal of a small delta) then costs that one call instead of
// the five of a property collector's wait.
func (c *Client) waitTask(ctx context.Context, ref types.ManagedObjectReference) (*types.TaskInfo, error) {
	var t mo.Task
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, ref, []string{"info"}, &t); err == nil {
		switch t.Info.State {
		case types.TaskInfoStateSuccess:
			return &t.Info, nil
		case types.TaskInfoStateError:
			return &t.Info, task.Error{LocalizedMethodFault: t.Info.Error, Description: t.Info.Description}
		}
	}
	return object.NewTask(c.vim, ref).WaitForResult(ctx)
}

// vmNotFound adds ErrVMNotFound to a ManagedObjectNotFound fault.
func vmNotFound(err error) error {
	if isFault(err, &types.ManagedObjectNotFound{}) {
		return fmt.Errorf("%w: %w", ErrVMNotFound, err)
	}
	return err
}

// waitSnapshotTasks waits for the VM's snapshot creations that are queued
// or running. Their outcome does not matter here: the caller looks for the
// snapshot by name afterwards.
func (c *Client) waitSnapshotTasks(ctx context.Context, vm *VM) error {
	pc := property.DefaultCollector(c.vim)
	var mvm mo.VirtualMachine
	if err := pc.RetrieveOne(ctx, vmRef(vm.Ref), []string{"recentTask"}, &mvm); err != nil {
		return fmt.Errorf("vsphere: snapshot tasks of %s (%s): %w", vm.Name, vm.Ref, vmNotFound(err))
	}
	if len(mvm.RecentTask) == 0 {
		return nil
	}
	var tasks []mo.Task
	if err := pc.Retrieve(ctx, mvm.RecentTask, []string{"info"}, &tasks); err != nil {
		// A task can expire between the two reads; one bad reference fails
		// the whole retrieval, so look at them one by one.
		tasks = tasks[:0]
		for _, ref := range mvm.RecentTask {
			var t mo.Task
			if err := pc.RetrieveOne(ctx, ref, []string{"info"}, &t); err != nil {
				if isFault(err, &types.ManagedObjectNotFound{}) {
					continue
				}
				return fmt.Errorf("vsphere: snapshot tasks of %s (%s): %w", vm.Name, vm.Ref, err)
			}
			tasks = append(tasks, t)
		}
	}
	for _, t := range tasks {
		info := t.Info
		if !createSnapshotTask(info) || (info.State != types.TaskInfoStateQueued && info.State != types.TaskInfoStateRunning) {
			continue
		}
		c.log.Info("waiting for a running snapshot task", "vm", vm.Name, "vm_ref", vm.Ref, "task", t.Self.Value)
		if _, err := c.waitTask(ctx, t.Self); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("vsphere: waiting for snapshot task %s of %s: %w", t.Self.Value, vm.Name, ctx.Err())
			}
			// A failed earlier attempt: the caller makes its own snapshot.
			c.log.Info("earlier snapshot task failed", "vm", vm.Name, "task", t.Self.Value, "err", err)
		}
	}
	return nil
}

// FindSnapshot returns the VM's snapshot named name (searching the whole
// snapshot tree) with the disks of its config, or nil, nil when there is
// none. Should two carry the name, the oldest is returned.
func (c *Client) FindSnapshot(ctx context.Context, vmRefValue, name string) (*Snapshot, error) {
	return c.findSnapshot(ctx, vmRefValue, name, func(t types.VirtualMachineSnapshotTree) bool { return t.Name == name })
}

// findSnapshot returns the oldest snapshot in the VM's tree that matches,
// or nil, nil. what names the snapshot for logs and errors.
func (c *Client) findSnapshot(ctx context.Context, vmRefValue, what string, match func(types.VirtualMachineSnapshotTree) bool) (*Snapshot, error) {
	var mvm mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, vmRef(vmRefValue), []string{"name", "snapshot"}, &mvm); err != nil {
		return nil, fmt.Errorf("vsphere: find snapshot %q of %s: %w", what, vmRefValue, vmNotFound(err))
	}
	var found []types.VirtualMachineSnapshotTree
	if mvm.Snapshot != nil {
		walkSnapshots(mvm.Snapshot.RootSnapshotList, func(t types.VirtualMachineSnapshotTree) {
			if match(t) {
				found = append(found, t)
			}
		})
	}
	if len(found) == 0 {
		return nil, nil
	}
	slices.SortStableFunc(found, func(a, b types.VirtualMachineSnapshotTree) int { return a.CreateTime.Compare(b.CreateTime) })
	if len(found) > 1 {
		c.log.Warn("several snapshots have the same name, using the oldest", "vm", mvm.Name, "vm_ref", vmRefValue,
			"snapshot_name", what, "count", len(found), "snapshot", found[0].Snapshot.Value)
	}
	t := found[0]
	disks, err := c.snapshotDisks(ctx, t.Snapshot)
	if err != nil {
		return nil, err
	}
	return &Snapshot{Ref: t.Snapshot.Value, Name: t.Name, Created: t.CreateTime, Disks: disks}, nil
}

// snapshotDisks reads the disks of a snapshot's config.
func (c *Client) snapshotDisks(ctx context.Context, ref types.ManagedObjectReference) ([]Disk, error) {
	var ms mo.VirtualMachineSnapshot
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, ref, []string{"config.hardware.device"}, &ms); err != nil {
		if isFault(err, &types.ManagedObjectNotFound{}) {
			return nil, fmt.Errorf("vsphere: %w: %s", ErrSnapshotNotFound, ref.Value)
		}
		return nil, fmt.Errorf("vsphere: config of snapshot %s: %w", ref.Value, err)
	}
	return disksOf(ms.Config.Hardware.Device), nil
}

func walkSnapshots(ts []types.VirtualMachineSnapshotTree, fn func(types.VirtualMachineSnapshotTree)) {
	for _, t := range ts {
		fn(t)
		walkSnapshots(t.ChildSnapshotList, fn)
	}
}

// RemoveSnapshot removes one snapshot of a VM (not its children) and
// consolidates. A snapshot that is already gone is not an error, so the
// call can be repeated. A snapshot of another VM is refused. It trusts the
// moref: a backup removes its own snapshot with RemoveOwnSnapshot, which
// checks that the moref still names it.
func (c *Client) RemoveSnapshot(ctx context.Context, vmRefValue, snapRef string) error {
	return c.removeSnapshot(ctx, vmRefValue, snapRef, false)
}

// removeSnapshot is RemoveSnapshot; inTree: the caller just found the
// snapshot in the VM's tree (CheckSnapshot), so whose it is is not read
// again.
func (c *Client) removeSnapshot(ctx context.Context, vmRefValue, snapRef string, inTree bool) error {
	ref := snapshotRef(snapRef)
	if !inTree {
		var ms mo.VirtualMachineSnapshot
		if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, ref, []string{"vm"}, &ms); err != nil {
			if isFault(err, &types.ManagedObjectNotFound{}) {
				return nil
			}
			return fmt.Errorf("vsphere: remove snapshot %s of %s: %w", snapRef, vmRefValue, err)
		}
		if ms.Vm.Value != vmRefValue {
			return fmt.Errorf("vsphere: remove snapshot %s: it belongs to VM %s, not %s", snapRef, ms.Vm.Value, vmRefValue)
		}
	}
	res, err := methods.RemoveSnapshot_Task(ctx, c.vim, &types.RemoveSnapshot_Task{
		This: ref, RemoveChildren: false, Consolidate: types.NewBool(true)})
	if err == nil {
		_, err = c.waitTask(ctx, res.Returnval)
	}
	if err != nil {
		if isFault(err, &types.ManagedObjectNotFound{}) || isFault(err, &types.NotFound{}) {
			return nil
		}
		return fmt.Errorf("vsphere: remove snapshot %s of %s: %w", snapRef, vmRefValue, err)
	}
	c.log.Info("snapshot removed", "vm_ref", vmRefValue, "snapshot", snapRef)
	return nil
}

// Snapshots lists the snapshots, anywhere in the snapshot trees of all VMs,
// whose name starts with prefix (e.g. "cbtflow-"), for the sweeper.
func (c *Client) Snapshots(ctx context.Context, prefix string) ([]SnapshotInfo, error) {
	vms, err := c.allVMs(ctx, []string{"name", "config.instanceUuid", "snapshot"})
	if err != nil {
		return nil, fmt.Errorf("vsphere: list snapshots: %w", err)
	}
	var out []SnapshotInfo
	for _, vm := range vms {
		if vm.Snapshot == nil {
			continue
		}
		uuid := ""
		if vm.Config != nil {
			uuid = vm.Config.InstanceUuid
		}
		walkSnapshots(vm.Snapshot.RootSnapshotList, func(t types.VirtualMachineSnapshotTree) {
			if strings.HasPrefix(t.Name, prefix) {
				out = append(out, SnapshotInfo{VMRef: vm.Self.Value, VMName: vm.Name, VMUUID: uuid,
					Ref: t.Snapshot.Value, Name: t.Name, Created: t.CreateTime})
			}
		})
	}
	slices.SortFunc(out, func(a, b SnapshotInfo) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.Ref, b.Ref)
	})
	return out, nil
}
