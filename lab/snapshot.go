package lab

import (
	"context"
	"fmt"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// SnapshotInfo is one snapshot in a VM's snapshot tree.
type SnapshotInfo struct {
	Ref  string `json:"ref"` // moref value, e.g. snapshot-123
	Name string `json:"name"`
}

// goneSnapshot is what the lab remembers of a removed snapshot, to say why
// its moref is unknown now.
type goneSnapshot struct {
	vmRef, vmName, name string
	withVM              bool // removed because its VM was destroyed
}

// labSnapshot wraps the simulator's VirtualMachineSnapshot in the session
// registries, as cbtVM wraps the VM (see Lab.handler). It exists for two
// reasons:
//
//   - The simulator's snapshot methods look their VM up inside the task and
//     type-assert it: once the VM is destroyed, RemoveSnapshot_Task panics
//     in a task goroutine and kills the process. The wrappers check, with
//     the VM locked, that VM and snapshot still exist and answer
//     ManagedObjectNotFound otherwise, as vCenter does for a moref that
//     names nothing. The lock is handed on to the simulator's task (locks
//     are shared within one call's context), so a Destroy cannot slip in
//     between the check and the task.
//   - RenameSnapshot, which the simulator does not implement.
type labSnapshot struct {
	*simulator.VirtualMachineSnapshot
	lab *Lab
}

// snapshotHandler puts a labSnapshot into the caller's session registry for
// every call on a snapshot that exists; for one that does not, it removes a
// stale wrapper so the simulator answers ManagedObjectNotFound.
func (l *Lab) snapshotHandler(ctx *simulator.Context, m *simulator.Method) (mo.Reference, types.BaseMethodFault) {
	sreg := ctx.Session.Registry
	cur, _ := sreg.Get(m.This).(*labSnapshot)
	snap, ok := ctx.Map.Get(m.This).(*simulator.VirtualMachineSnapshot)
	if !ok || l.isGone(m.This.Value) {
		if cur != nil {
			sreg.Remove(ctx, m.This)
		}
		return nil, nil
	}
	if cur != nil && cur.VirtualMachineSnapshot == snap {
		return cur, nil
	}
	w := &labSnapshot{VirtualMachineSnapshot: snap, lab: l}
	l.mu.Lock()
	l.sessions[sreg] = struct{}{}
	l.mu.Unlock()
	sreg.Put(w)
	// A removal that ran its hook between the lookup above and the Put did
	// not see this wrapper: take it out again, or property reads through
	// this session would keep finding the removed snapshot.
	if l.isGone(m.This.Value) {
		sreg.Remove(ctx, m.This)
		return nil, nil
	}
	return w, nil
}

// maxGone bounds what a long-running lab remembers of removed snapshots.
const maxGone = 10000

// trimGone forgets every removed snapshot once there are maxGone of them:
// the simulator never reuses a moref, so a forgotten one only loses its
// explanation ("no snapshot X" instead of "removed with its VM"). Called
// with l.mu held.
func (l *Lab) trimGone() {
	if len(l.gone) >= maxGone {
		clear(l.gone)
	}
}

func (l *Lab) isGone(ref string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, gone := l.gone[ref]
	return gone
}

// forgetSnapshot runs when the registry removes a snapshot: it remembers
// why, and removes the snapshot's wrappers from every session registry
// (the global registry forgets it right after the hooks).
func (l *Lab) forgetSnapshot(ctx *simulator.Context, ref types.ManagedObjectReference, g goneSnapshot) {
	l.mu.Lock()
	l.trimGone()
	if old, ok := l.gone[ref.Value]; !ok || !old.withVM {
		l.gone[ref.Value] = g
	}
	sessions := make([]*simulator.Registry, 0, len(l.sessions))
	for r := range l.sessions {
		sessions = append(sessions, r)
	}
	l.mu.Unlock()
	for _, r := range sessions {
		if r.Get(ref) != nil {
			r.Remove(ctx, ref)
		}
	}
}

// withLiveSnapshot runs f with the snapshot's VM locked, if VM and
// snapshot still exist; otherwise it returns the fault vCenter answers for
// a snapshot moref that names nothing.
func (s *labSnapshot) withLiveSnapshot(ctx *simulator.Context, f func(vm *simulator.VirtualMachine)) *soap.Fault {
	var fault *soap.Fault
	ctx.WithLock(s.Vm, func() {
		vm, ok := ctx.Map.Get(s.Vm).(*simulator.VirtualMachine)
		snap, _ := ctx.Map.Get(s.Self).(*simulator.VirtualMachineSnapshot)
		if !ok || snap != s.VirtualMachineSnapshot || s.lab.isGone(s.Self.Value) {
			fault = s.lab.snapshotNotFound(s.Self)
			return
		}
		f(vm)
	})
	return fault
}

// snapshotNotFound is ManagedObjectNotFound for a snapshot moref, with a
// message that says what the lab knows of it.
func (l *Lab) snapshotNotFound(ref types.ManagedObjectReference) *soap.Fault {
	return simulator.Fault(l.goneReason(ref.Value), &types.ManagedObjectNotFound{Obj: ref})
}

// goneReason explains an unknown snapshot moref.
func (l *Lab) goneReason(ref string) string {
	l.mu.Lock()
	g, ok := l.gone[ref]
	l.mu.Unlock()
	switch {
	case ok && g.withVM:
		return fmt.Sprintf("ManagedObjectNotFound: snapshot %s (%q) was removed with its VM %q (%s)", ref, g.name, g.vmName, g.vmRef)
	case ok:
		return fmt.Sprintf("ManagedObjectNotFound: snapshot %s (%q) of VM %q (%s) was removed", ref, g.name, g.vmName, g.vmRef)
	}
	return fmt.Sprintf("ManagedObjectNotFound: no snapshot %s", ref)
}

// RemoveSnapshotTask removes the snapshot if it and its VM still exist.
func (s *labSnapshot) RemoveSnapshotTask(ctx *simulator.Context, req *types.RemoveSnapshot_Task) soap.HasFault {
	var body soap.HasFault
	if f := s.withLiveSnapshot(ctx, func(*simulator.VirtualMachine) {
		body = s.VirtualMachineSnapshot.RemoveSnapshotTask(ctx, req)
	}); f != nil {
		return &methods.RemoveSnapshot_TaskBody{Fault_: f}
	}
	return body
}

// RevertToSnapshotTask reverts if the snapshot and its VM still exist.
func (s *labSnapshot) RevertToSnapshotTask(ctx *simulator.Context, req *types.RevertToSnapshot_Task) soap.HasFault {
	var body soap.HasFault
	if f := s.withLiveSnapshot(ctx, func(*simulator.VirtualMachine) {
		body = s.VirtualMachineSnapshot.RevertToSnapshotTask(ctx, req)
	}); f != nil {
		return &methods.RevertToSnapshot_TaskBody{Fault_: f}
	}
	return body
}

// ExportSnapshot exports if the snapshot and its VM still exist.
func (s *labSnapshot) ExportSnapshot(ctx *simulator.Context, req *types.ExportSnapshot) soap.HasFault {
	var body soap.HasFault
	if f := s.withLiveSnapshot(ctx, func(*simulator.VirtualMachine) {
		body = s.VirtualMachineSnapshot.ExportSnapshot(ctx, req)
	}); f != nil {
		return &methods.ExportSnapshotBody{Fault_: f}
	}
	return body
}

// maxSnapshotName is the longest snapshot name vSphere accepts.
const maxSnapshotName = 255

// RenameSnapshot changes the snapshot's name and/or description in its
// VM's snapshot tree, as vSphere's RenameSnapshot does (an empty field is
// left unchanged). The moref, the snapshot's config, its frozen images and
// change IDs stay: to a client that remembers only the moref, the moref
// now names another snapshot.
func (s *labSnapshot) RenameSnapshot(ctx *simulator.Context, req *types.RenameSnapshot) soap.HasFault {
	body := new(methods.RenameSnapshotBody)
	if len(req.Name) > maxSnapshotName {
		body.Fault_ = simulator.Fault(fmt.Sprintf("snapshot name longer than %d bytes", maxSnapshotName), &types.InvalidName{Name: req.Name})
		return body
	}
	var old string
	f := s.withLiveSnapshot(ctx, func(vm *simulator.VirtualMachine) {
		var node *types.VirtualMachineSnapshotTree
		if vm.Snapshot != nil {
			node = findSnapshotNode(vm.Snapshot.RootSnapshotList, s.Self)
		}
		if node == nil {
			body.Fault_ = s.lab.snapshotNotFound(s.Self)
			return
		}
		old = node.Name
		if req.Name != "" {
			node.Name = req.Name
		}
		if req.Description != "" {
			node.Description = req.Description
		}
		ctx.Update(vm, []types.PropertyChange{{Name: "snapshot.rootSnapshotList", Val: vm.Snapshot.RootSnapshotList}})
		body.Res = new(types.RenameSnapshotResponse)
	})
	if f != nil {
		body.Fault_ = f
		return body
	}
	if body.Res != nil && req.Name != "" {
		s.lab.mu.Lock()
		if rec := s.lab.snaps[s.Self.Value]; rec != nil {
			rec.name = req.Name
		}
		s.lab.mu.Unlock()
		s.lab.log.Info("snapshot renamed", "vm", s.Vm.Value, "snapshot", s.Self.Value, "from", old, "to", req.Name)
	}
	return body
}

// findSnapshotNode returns the tree node of ref, or nil.
func findSnapshotNode(ts []types.VirtualMachineSnapshotTree, ref types.ManagedObjectReference) *types.VirtualMachineSnapshotTree {
	for i := range ts {
		if ts[i].Snapshot == ref {
			return &ts[i]
		}
		if n := findSnapshotNode(ts[i].ChildSnapshotList, ref); n != nil {
			return n
		}
	}
	return nil
}

// snapshotRefsOf lists every snapshot in a VM's tree. Called with the VM
// locked.
func snapshotRefsOf(vm *simulator.VirtualMachine) []SnapshotInfo {
	var out []SnapshotInfo
	if vm.Snapshot == nil {
		return nil
	}
	var walk func([]types.VirtualMachineSnapshotTree)
	walk = func(ts []types.VirtualMachineSnapshotTree) {
		for _, t := range ts {
			out = append(out, SnapshotInfo{Ref: t.Snapshot.Value, Name: t.Name})
			walk(t.ChildSnapshotList)
		}
	}
	walk(vm.Snapshot.RootSnapshotList)
	return out
}

// Snapshots lists the snapshots of a VM (by name or moref value), parents
// before children, as its snapshot tree shows them.
func (l *Lab) Snapshots(vmName string) ([]SnapshotInfo, error) {
	vm, err := l.findVM(vmName)
	if err != nil {
		return nil, err
	}
	var out []SnapshotInfo
	l.model.Service.Context.Map.WithLock(l.lockCtx(), vm, func() { out = snapshotRefsOf(vm) })
	if out == nil {
		out = []SnapshotInfo{}
	}
	return out, nil
}

// RenameSnapshot renames a snapshot of a VM (by name or moref value)
// through the vSphere API's RenameSnapshot, as an administrator would. To
// a backup that remembers the snapshot by moref, the moref now names
// another snapshot: the same as a vCenter that reissued the moref after a
// restart.
func (l *Lab) RenameSnapshot(vmName, snapshot, newName string) error {
	vm, err := l.findVM(vmName)
	if err != nil {
		return err
	}
	known := false
	l.model.Service.Context.Map.WithLock(l.lockCtx(), vm, func() {
		for _, s := range snapshotRefsOf(vm) {
			known = known || s.Ref == snapshot
		}
	})
	if !known {
		return fmt.Errorf("lab: %w %q on VM %q", ErrUnknownSnapshot, snapshot, vmName)
	}
	return l.session(func(ctx context.Context, c *vim25.Client) error {
		ref := types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: snapshot}
		if _, err := methods.RenameSnapshot(ctx, c, &types.RenameSnapshot{This: ref, Name: newName}); err != nil {
			return fmt.Errorf("lab: rename snapshot %s of %s: %w", snapshot, vmName, err)
		}
		return nil
	})
}
