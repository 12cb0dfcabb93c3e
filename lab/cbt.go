package lab

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// snapRec is what the lab knows of one snapshot.
type snapRec struct {
	ref, vmRef, vmName, name string
	disks                    map[int32]*snapDisk
}

type snapDisk struct {
	d        *disk
	img      *frozenImage // nil when the freeze failed (err)
	err      error
	series   *series // nil when CBT was off
	gen      int
	changeID string
	capacity int64
	fileName string // backing file name in the snapshot's config
}

// hooks receives the simulator registry's object events.
type hooks struct{ lab *Lab }

func (h *hooks) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "CbtflowLab", Value: "cbtflow-lab"}
}

// PutObject runs inside CreateSnapshotEx's task, with the VM locked, right
// after the snapshot's config was copied from the VM: the moment to freeze.
func (h *hooks) PutObject(ctx *simulator.Context, obj mo.Reference) {
	if snap, ok := obj.(*simulator.VirtualMachineSnapshot); ok {
		defer h.lab.recoverHook("snapshot create")
		h.lab.onSnapshot(ctx, snap)
	}
}

// UpdateObject follows device changes of a VM (ReconfigVM, CreateVM,
// Destroy) into the disk images. The registry passes the embedded
// *mo.VirtualMachine, already changed; the VM is locked.
func (h *hooks) UpdateObject(_ *simulator.Context, obj mo.Reference, changes []types.PropertyChange) {
	if mvm, ok := obj.(*mo.VirtualMachine); ok {
		defer h.lab.recoverHook("device change")
		h.lab.onDevicesChanged(mvm, changes)
	}
}

// RemoveObject runs before the registry forgets ref; for a snapshot, the
// VM's snapshot tree is already updated.
func (h *hooks) RemoveObject(ctx *simulator.Context, ref types.ManagedObjectReference) {
	switch ref.Type {
	case "VirtualMachineSnapshot":
		defer h.lab.recoverHook("snapshot remove")
		h.lab.forgetSnapshot(ctx, ref, h.lab.goneInfo(ctx, ref))
		h.lab.onSnapshotRemoved(ctx, ref)
	case "VirtualMachine":
		defer h.lab.recoverHook("vm remove")
		h.lab.onVMRemoved(ctx, ref)
	}
}

// recoverHook keeps a bug in a hook from killing the process: hooks run in
// simulator task goroutines, where a panic is fatal.
func (l *Lab) recoverHook(what string) {
	if r := recover(); r != nil {
		l.log.Error("lab hook panicked", "hook", what, "panic", fmt.Sprint(r), "stack", string(debug.Stack()))
	}
}

// cbtVM adds QueryChangedDiskAreas to the simulator's VirtualMachine and
// watches the calls that matter to change tracking. It lives only in session
// registries; the global registry keeps the plain *simulator.VirtualMachine,
// which the simulator type-asserts everywhere.
type cbtVM struct {
	*simulator.VirtualMachine
	lab *Lab
}

// handler puts a cbtVM into the caller's session registry for every call on
// a VM: Service.call prefers the session's object over the handler result.
func (l *Lab) handler(ctx *simulator.Context, m *simulator.Method) (mo.Reference, types.BaseMethodFault) {
	if ctx.Session == nil || ctx.Session.Registry == nil {
		return nil, nil
	}
	switch m.This.Type {
	case "VirtualMachine":
	case "VirtualMachineSnapshot":
		return l.snapshotHandler(ctx, m)
	default:
		return nil, nil
	}
	sreg := ctx.Session.Registry
	cur, _ := sreg.Get(m.This).(*cbtVM)
	vm, ok := ctx.Map.Get(m.This).(*simulator.VirtualMachine)
	if !ok {
		if cur != nil {
			sreg.Remove(ctx, m.This)
		}
		return nil, nil
	}
	if cur != nil && cur.VirtualMachine == vm {
		return cur, nil
	}
	w := &cbtVM{VirtualMachine: vm, lab: l}
	// Registry.Put writes the entity status fields (same values): do it
	// under the VM's lock.
	ctx.Map.WithLock(ctx, vm, func() { sreg.Put(w) })
	l.mu.Lock()
	l.sessions[sreg] = struct{}{}
	l.mu.Unlock()
	return w, nil
}

// QueryChangedDiskAreas answers from the lab's change tracking.
func (w *cbtVM) QueryChangedDiskAreas(ctx *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := new(methods.QueryChangedDiskAreasBody)
	res, f := w.lab.queryChangedAreas(w.VirtualMachine, req)
	if f != nil {
		body.Fault_ = f
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *res}
	return body
}

// ReconfigVMTask applies the lab's rules to disk changes (checkReconfig:
// no growth or removal with snapshots, capacities in whole KiB, no
// shrinking), refusing with a failed task as vSphere does. It ends the
// change-ID series of every disk when CBT is switched off; switching it on
// starts a new series at the next snapshot.
func (w *cbtVM) ReconfigVMTask(ctx *simulator.Context, req *types.ReconfigVM_Task) soap.HasFault {
	if rf := w.lab.checkReconfig(w.VirtualMachine, &req.Spec); rf != nil {
		w.lab.log.Info("reconfigure refused", "vm", w.Name, "err", rf.err)
		return refusedReconfigTask(ctx, w.VirtualMachine, rf.fault)
	}
	if v := req.Spec.ChangeTrackingEnabled; v != nil && !*v {
		w.lab.cbtOff(w.VirtualMachine)
	}
	return w.VirtualMachine.ReconfigVMTask(ctx, req)
}

// CreateSnapshotTask notes the snapshot's name for the change-ID log.
func (w *cbtVM) CreateSnapshotTask(ctx *simulator.Context, req *types.CreateSnapshot_Task) soap.HasFault {
	w.lab.setPending(w.Self.Value, req.Name)
	return w.VirtualMachine.CreateSnapshotTask(ctx, req)
}

// CreateSnapshotExTask notes the snapshot's name for the change-ID log.
func (w *cbtVM) CreateSnapshotExTask(ctx *simulator.Context, req *types.CreateSnapshotEx_Task) soap.HasFault {
	w.lab.setPending(w.Self.Value, req.Name)
	return w.VirtualMachine.CreateSnapshotExTask(ctx, req)
}

func (l *Lab) setPending(vmRef, name string) {
	l.mu.Lock()
	l.pending[vmRef] = name
	l.mu.Unlock()
}

func (l *Lab) snapDir() string { return filepath.Join(l.dir, "snapshots") }

// cbtOff ends the change-ID series of the VM's disks. Called with the VM
// locked.
func (l *Lab) cbtOff(vm *simulator.VirtualMachine) {
	for _, dev := range vm.Config.Hardware.Device {
		vd, backing := flatDisk(dev)
		if backing == nil {
			continue
		}
		l.mu.Lock()
		d := l.disks[diskID{vm.Self.Value, vd.Key}]
		l.mu.Unlock()
		if d != nil {
			d.mu.Lock()
			d.series = nil
			d.mu.Unlock()
		}
		backing.ChangeId = ""
	}
	l.log.Info("change tracking disabled", "vm", vm.Name)
}

func flatDisk(dev types.BaseVirtualDevice) (*types.VirtualDisk, *types.VirtualDiskFlatVer2BackingInfo) {
	vd, ok := dev.(*types.VirtualDisk)
	if !ok {
		return nil, nil
	}
	b, ok := vd.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	if !ok {
		return nil, nil
	}
	return vd, b
}

func capacityOf(vd *types.VirtualDisk) int64 {
	if vd.CapacityInBytes > 0 {
		return vd.CapacityInBytes
	}
	return vd.CapacityInKB * 1024
}

// disk returns the state of a tracked disk, creating its image on first
// use and following capacity changes.
func (l *Lab) disk(vmRef string, key int32, capacity int64) (*disk, error) {
	id := diskID{vmRef, key}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, fmt.Errorf("lab: closed")
	}
	d := l.disks[id]
	if d == nil {
		var err error
		d, err = openDisk(id, l.imagePath(vmRef, key), capacity, l.log)
		if err != nil {
			return nil, fmt.Errorf("lab: disk image of %s key %d: %w", vmRef, key, err)
		}
		l.disks[id] = d
		return d, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.resize(capacity); err != nil {
		return nil, fmt.Errorf("lab: resize disk image of %s key %d: %w", vmRef, key, err)
	}
	return d, nil
}

// onSnapshot freezes every disk of the VM and stamps change IDs into the
// snapshot's and the live config.
func (l *Lab) onSnapshot(ctx *simulator.Context, snap *simulator.VirtualMachineSnapshot) {
	vm, ok := ctx.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	enabled := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	l.mu.Lock()
	name := l.pending[vm.Self.Value]
	delete(l.pending, vm.Self.Value)
	l.mu.Unlock()

	rec := &snapRec{ref: snap.Self.Value, vmRef: vm.Self.Value, vmName: vm.Name, name: name, disks: map[int32]*snapDisk{}}
	snapDevices := object.VirtualDeviceList(snap.Config.Hardware.Device)
	now := time.Now()
	var stamps []Stamp
	for _, dev := range vm.Config.Hardware.Device {
		vd, backing := flatDisk(dev)
		if backing == nil {
			continue
		}
		sd := &snapDisk{capacity: capacityOf(vd), fileName: backing.FileName}
		rec.disks[vd.Key] = sd
		d, err := l.disk(vm.Self.Value, vd.Key, sd.capacity)
		if err != nil {
			sd.err = err
			l.log.Error("snapshot disk not frozen", "vm", vm.Name, "snapshot", rec.ref, "disk", vd.Key, "err", err)
			continue
		}
		sd.d = d
		d.mu.Lock()
		switch {
		case enabled && d.series == nil:
			d.series = newSeries()
		case !enabled:
			d.series = nil
		}
		if d.deltas == 0 {
			d.base = backing.FileName
		}
		sd.img, sd.err = d.freeze(l.snapDir())
		if sd.err == nil {
			l.log.Debug("disk frozen", "vm", vm.Name, "snapshot", rec.ref, "disk", vd.Key,
				"shared", d.frozen.shared, "linked", d.frozen.linked, "bytes_copied", d.frozen.bytes)
		}
		if d.series != nil {
			sd.series, sd.gen = d.series, d.series.gen
			sd.changeID = d.series.changeID(sd.gen)
		}
		d.deltas++
		live := deltaName(d.base, d.deltas)
		d.mu.Unlock()

		if sd.err != nil {
			l.log.Error("snapshot disk not frozen", "vm", vm.Name, "snapshot", rec.ref, "disk", vd.Key, "err", sd.err)
		}
		backing.ChangeId = sd.changeID
		backing.FileName = live
		if _, sb := flatDisk(snapDevices.FindByKey(vd.Key)); sb != nil {
			sb.ChangeId = sd.changeID
		}
		if sd.changeID != "" {
			stamps = append(stamps, Stamp{Time: now, VM: vm.Name, VMRef: vm.Self.Value, Snapshot: rec.ref,
				SnapshotName: name, DiskKey: vd.Key, ChangeID: sd.changeID})
		}
	}
	l.mu.Lock()
	l.snaps[rec.ref] = rec
	l.stamps = append(l.stamps, stamps...)
	l.mu.Unlock()
	for _, s := range stamps {
		l.log.Info("change id stamped", "vm", s.VM, "snapshot", s.Snapshot, "snapshot_name", s.SnapshotName, "disk", s.DiskKey, "change_id", s.ChangeID)
	}
	if len(stamps) == 0 {
		l.log.Info("snapshot without change tracking", "vm", vm.Name, "snapshot", rec.ref, "snapshot_name", name)
	}
}

// deltaName is the backing file name vSphere gives the running disk after
// its n-th snapshot: "[ds] vm/disk1.vmdk" -> "[ds] vm/disk1-00000n.vmdk".
func deltaName(base string, n int) string {
	if n == 0 {
		return base
	}
	return fmt.Sprintf("%s-%06d.vmdk", strings.TrimSuffix(base, ".vmdk"), n)
}

// onSnapshotRemoved frees the frozen images of every snapshot of the VM
// that left its snapshot tree (RemoveSnapshot with removeChildren removes
// only the parent from the registry), and restores the base disk names
// when the VM has no snapshot left.
func (l *Lab) onSnapshotRemoved(ctx *simulator.Context, ref types.ManagedObjectReference) {
	l.mu.Lock()
	rec := l.snaps[ref.Value]
	l.mu.Unlock()
	if rec == nil {
		return
	}
	vm, ok := ctx.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: rec.vmRef}).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	inTree := map[string]bool{}
	if vm.Snapshot != nil {
		var walk func([]types.VirtualMachineSnapshotTree)
		walk = func(ts []types.VirtualMachineSnapshotTree) {
			for _, t := range ts {
				inTree[t.Snapshot.Value] = true
				walk(t.ChildSnapshotList)
			}
		}
		walk(vm.Snapshot.RootSnapshotList)
	}
	delete(inTree, ref.Value)
	l.releaseSnapshots(rec.vmRef, func(r *snapRec) bool { return !inTree[r.ref] })

	if len(inTree) > 0 {
		return
	}
	for _, dev := range vm.Config.Hardware.Device {
		vd, backing := flatDisk(dev)
		if backing == nil {
			continue
		}
		l.mu.Lock()
		d := l.disks[diskID{vm.Self.Value, vd.Key}]
		l.mu.Unlock()
		if d == nil {
			continue
		}
		d.mu.Lock()
		if d.deltas > 0 {
			backing.FileName = d.base
			d.deltas = 0
		}
		d.mu.Unlock()
	}
}

// releaseSnapshots forgets the VM's snapshots that match and frees their
// frozen images.
func (l *Lab) releaseSnapshots(vmRef string, match func(*snapRec) bool) {
	var gone []*snapRec
	l.mu.Lock()
	for k, r := range l.snaps {
		if r.vmRef == vmRef && match(r) {
			gone = append(gone, r)
			delete(l.snaps, k)
		}
	}
	l.mu.Unlock()
	for _, r := range gone {
		for key, sd := range r.disks {
			if sd.img == nil {
				continue
			}
			if err := sd.d.release(sd.img); err != nil {
				l.log.Warn("frozen image not removed", "snapshot", r.ref, "disk", key, "err", err)
			}
		}
		l.log.Info("snapshot released", "vm", r.vmName, "snapshot", r.ref, "snapshot_name", r.name)
	}
}

// goneInfo describes a snapshot about to leave the registry.
func (l *Lab) goneInfo(ctx *simulator.Context, ref types.ManagedObjectReference) goneSnapshot {
	l.mu.Lock()
	rec := l.snaps[ref.Value]
	l.mu.Unlock()
	if rec != nil {
		return goneSnapshot{vmRef: rec.vmRef, vmName: rec.vmName, name: rec.name}
	}
	var g goneSnapshot
	if snap, ok := ctx.Map.Get(ref).(*simulator.VirtualMachineSnapshot); ok {
		g.vmRef = snap.Vm.Value
	}
	return g
}

// onVMRemoved drops a destroyed VM's disks, snapshots and session wrappers.
// vSphere deletes a VM's snapshots with it; the simulator leaves them in
// its registry, where every later call on them (RemoveSnapshot_Task
// first) dereferences the missing VM and panics. They leave the registry
// here, so that calls on them fail with ManagedObjectNotFound, as on
// vCenter. Called inside the Destroy task, with the VM locked.
func (l *Lab) onVMRemoved(ctx *simulator.Context, ref types.ManagedObjectReference) {
	var snaps []SnapshotInfo
	vmName := ref.Value
	if vm, ok := ctx.Map.Get(ref).(*simulator.VirtualMachine); ok {
		snaps = snapshotRefsOf(vm)
		vmName = vm.Name
	}
	l.mu.Lock()
	for _, r := range l.snaps {
		if r.vmRef == ref.Value && !slices.ContainsFunc(snaps, func(s SnapshotInfo) bool { return s.Ref == r.ref }) {
			snaps = append(snaps, SnapshotInfo{Ref: r.ref, Name: r.name})
		}
	}
	l.trimGone()
	for _, s := range snaps {
		l.gone[s.Ref] = goneSnapshot{vmRef: ref.Value, vmName: vmName, name: s.Name, withVM: true}
	}
	l.mu.Unlock()
	l.releaseSnapshots(ref.Value, func(*snapRec) bool { return true })
	for _, s := range snaps {
		sref := types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: s.Ref}
		if ctx.Map.Get(sref) != nil {
			ctx.Map.Remove(ctx, sref)
		}
	}
	if len(snaps) > 0 {
		l.log.Info("snapshots removed with their VM", "vm", vmName, "vm_ref", ref.Value, "snapshots", len(snaps))
	}
	var gone []*disk
	l.mu.Lock()
	for id, d := range l.disks {
		if id.vm == ref.Value {
			gone = append(gone, d)
			delete(l.disks, id)
		}
	}
	sessions := make([]*simulator.Registry, 0, len(l.sessions))
	for r := range l.sessions {
		sessions = append(sessions, r)
	}
	l.mu.Unlock()
	for _, d := range gone {
		d.close(true)
	}
	for _, r := range sessions {
		if r.Get(ref) != nil {
			r.Remove(ctx, ref)
		}
	}
}

func invalidArgument(prop, format string, args ...any) *soap.Fault {
	return simulator.Fault(fmt.Sprintf(format, args...), &types.InvalidArgument{InvalidProperty: prop})
}

// systemError is how the lab reports its own failures (a disk it could not
// freeze, an image it cannot read), as vCenter reports an internal error.
// Never FileFault or InvalidArgument: vCenter answers those for a change ID
// it refuses, and a client rightly reads them as a CBT reset and starts a
// new chain, which would turn a lab failure into a full backup.
func systemError(format string, args ...any) *soap.Fault {
	msg := fmt.Sprintf(format, args...)
	return simulator.Fault(msg, &types.SystemError{Reason: msg})
}

// queryChangedAreas implements QueryChangedDiskAreas for one snapshot's
// disk. The request is checked in full (faults a vCenter gives for a bad
// argument or a refused change ID) before the lab's own state can fail it.
// Called with the VM locked.
func (l *Lab) queryChangedAreas(vm *simulator.VirtualMachine, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, *soap.Fault) {
	if req.Snapshot == nil {
		return nil, invalidArgument("snapshot", "the lab answers QueryChangedDiskAreas only for a snapshot")
	}
	l.mu.Lock()
	rec := l.snaps[req.Snapshot.Value]
	l.mu.Unlock()
	if rec == nil || rec.vmRef != vm.Self.Value {
		return nil, simulator.Fault(fmt.Sprintf("snapshot %s of %s not found", req.Snapshot.Value, vm.Self.Value), &types.NotFound{})
	}
	sd := rec.disks[req.DeviceKey]
	if sd == nil {
		return nil, invalidArgument("deviceKey", "device %d is not a virtual disk of snapshot %s", req.DeviceKey, rec.ref)
	}
	if req.StartOffset < 0 || req.StartOffset > sd.capacity {
		return nil, invalidArgument("startOffset", "start offset %d is outside the disk (capacity %d)", req.StartOffset, sd.capacity)
	}
	if sd.series == nil {
		// What vCenter answers for a snapshot taken with CBT off.
		return nil, simulator.Fault("change tracking was not enabled for the disk when the snapshot was taken",
			&types.FileFault{File: sd.fileName})
	}
	gen := 0
	if req.ChangeId != "*" {
		id, g, ok := parseChangeID(req.ChangeId)
		switch {
		case !ok:
			return nil, invalidArgument("changeId", "malformed change ID %q", req.ChangeId)
		case id != sd.series.uuid:
			return nil, invalidArgument("changeId", "change ID %q is not of this disk's change tracking (reset, other disk or other vCenter)", req.ChangeId)
		case g > sd.gen:
			return nil, invalidArgument("changeId", "change ID %q is newer than snapshot %s", req.ChangeId, rec.ref)
		}
		gen = g
	}
	if sd.img == nil {
		return nil, systemError("lab: disk %d of snapshot %s was not frozen: %v", req.DeviceKey, rec.ref, sd.err)
	}

	var areas []Extent
	if req.ChangeId == "*" {
		f, err := os.Open(sd.img.path)
		if err != nil {
			return nil, systemError("lab: frozen image of disk %d of snapshot %s: %v", req.DeviceKey, rec.ref, err)
		}
		exts, err := dataExtents(f, sd.capacity)
		f.Close()
		if err != nil {
			return nil, systemError("lab: allocated areas of disk %d of snapshot %s: %v", req.DeviceKey, rec.ref, err)
		}
		areas = alignExtents(exts, sd.capacity)
	} else {
		sd.d.mu.Lock()
		areas = unionExtents(sd.series.changes[gen:sd.gen]...)
		sd.d.mu.Unlock()
	}
	info := pageAreas(areas, req.StartOffset, sd.capacity, l.opts.MaxExtentsPerPage)
	return &info, nil
}

// parseChangeID splits "<uuid>/<n>" (n >= 1).
func parseChangeID(s string) (string, int, bool) {
	i := strings.LastIndexByte(s, '/')
	if i < 0 {
		return "", 0, false
	}
	id, err := uuid.Parse(s[:i])
	if err != nil || id.String() != s[:i] {
		return "", 0, false
	}
	n, err := strconv.Atoi(s[i+1:])
	if err != nil || n < 1 || strconv.Itoa(n) != s[i+1:] {
		return "", 0, false
	}
	return s[:i], n, true
}

// pageAreas returns the areas from start on, at most maxN of them (0: all).
// The answer covers [start, start+Length): up to the end of its last area
// when more follow, the rest of the disk otherwise.
func pageAreas(areas []Extent, start, capacity int64, maxN int) types.DiskChangeInfo {
	info := types.DiskChangeInfo{StartOffset: start, Length: capacity - start}
	for _, a := range areas {
		if a.End() <= start {
			continue
		}
		if maxN > 0 && len(info.ChangedArea) == maxN {
			last := info.ChangedArea[maxN-1]
			info.Length = last.Start + last.Length - start
			return info
		}
		s := max(a.Offset, start)
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: s, Length: a.End() - s})
	}
	return info
}
