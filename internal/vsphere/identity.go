package vsphere

import (
	"context"
	"errors"
	"fmt"

	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// ErrSnapshotIdentity: a snapshot moref no longer names the snapshot the
// caller took: the snapshot there has another name, or belongs to another
// VM (renamed by an administrator, or a moref that vCenter reissued after
// a restart). Permanent: nothing may be read from, committed for or
// removed under that moref. A *SnapshotIdentityError matches it.
var ErrSnapshotIdentity = errors.New("snapshot identity mismatch")

// SnapshotIdentityError says what a snapshot moref names instead of the
// snapshot expected. It matches ErrSnapshotIdentity.
type SnapshotIdentityError struct {
	VMRef  string // the VM the snapshot should be on
	VMName string // its name, when known
	Ref    string // the moref checked
	Want   string // the name expected at Ref, e.g. "cbtflow-<backup id>"
	// Got is the name of the snapshot Ref names now; empty when Ref names
	// no snapshot (then WantRef is set).
	Got string
	// GotVMRef is the VM of the snapshot Ref names now, when not VMRef.
	GotVMRef string
	// WantRef is the moref of the snapshot named Want on VMRef now, if
	// there is one.
	WantRef string
}

// Error names both snapshots: the one expected (name and moref) and what
// the moref names now.
func (e *SnapshotIdentityError) Error() string {
	now := fmt.Sprintf("names snapshot %q", e.Got)
	switch {
	case e.Got == "" && e.GotVMRef == "":
		now = "names no snapshot"
	case e.GotVMRef != "":
		now = fmt.Sprintf("names snapshot %q of another VM, %s", e.Got, e.GotVMRef)
	}
	where := fmt.Sprintf("no snapshot %q is on the VM", e.Want)
	if e.WantRef != "" {
		where = fmt.Sprintf("snapshot %q is %s now", e.Want, e.WantRef)
	}
	vm := e.VMRef
	if e.VMName != "" {
		vm = fmt.Sprintf("%q (%s)", e.VMName, e.VMRef)
	}
	return fmt.Sprintf("vsphere: %v: snapshot moref %s of VM %s, taken as %q, now %s (%s)",
		ErrSnapshotIdentity, e.Ref, vm, e.Want, now, where)
}

// Is makes a *SnapshotIdentityError match ErrSnapshotIdentity.
func (e *SnapshotIdentityError) Is(target error) bool { return target == ErrSnapshotIdentity }

// CheckSnapshot checks that the moref snapRef still names, on VM vmRef, the
// snapshot named name: a backup checks its own snapshot ("cbtflow-<backup
// id>") before every operation on it, since a moref alone proves nothing
// after a vCenter restart.
//
// It returns the VM's name, for messages, and nil when it does; a
// *SnapshotIdentityError (ErrSnapshotIdentity)
// when the moref names another snapshot, one of another VM, or nothing
// while a snapshot of that name is elsewhere on the VM; an error wrapping
// ErrSnapshotNotFound when neither the moref nor the name is on the VM;
// and one wrapping both ErrVMNotFound and ErrSnapshotNotFound when the VM
// itself is gone (its snapshots went with it).
func (c *Client) CheckSnapshot(ctx context.Context, vmRefValue, snapRef, name string) (vmName string, err error) {
	if vmRefValue == "" || snapRef == "" || name == "" {
		return "", fmt.Errorf("vsphere: check snapshot: VM %q, moref %q and name %q must all be given", vmRefValue, snapRef, name)
	}
	pc := property.DefaultCollector(c.vim)
	var mvm mo.VirtualMachine
	if err := pc.RetrieveOne(ctx, vmRef(vmRefValue), []string{"name", "snapshot"}, &mvm); err != nil {
		if isFault(err, &types.ManagedObjectNotFound{}) {
			return "", &vmGoneError{vmRef: vmRefValue, snapRef: snapRef, name: name}
		}
		return "", fmt.Errorf("vsphere: check snapshot %q (%s) of VM %s: %w", name, snapRef, vmRefValue, err)
	}
	var at, named *types.VirtualMachineSnapshotTree
	if mvm.Snapshot != nil {
		walkSnapshots(mvm.Snapshot.RootSnapshotList, func(t types.VirtualMachineSnapshotTree) {
			if t.Snapshot.Value == snapRef && at == nil {
				at = &t
			}
			if t.Name == name && named == nil {
				named = &t
			}
		})
	}
	if at != nil && at.Name == name {
		return mvm.Name, nil
	}
	ie := &SnapshotIdentityError{VMRef: vmRefValue, VMName: mvm.Name, Ref: snapRef, Want: name}
	if named != nil {
		ie.WantRef = named.Snapshot.Value
	}
	if at != nil {
		ie.Got = at.Name
		return mvm.Name, ie
	}
	// Not in the VM's tree: a snapshot of another VM, or nothing.
	var ms mo.VirtualMachineSnapshot
	err = pc.RetrieveOne(ctx, snapshotRef(snapRef), []string{"vm"}, &ms)
	switch {
	case err == nil && ms.Vm.Value != vmRefValue:
		ie.GotVMRef = ms.Vm.Value
		ie.Got = c.snapshotName(ctx, ms.Vm, snapRef)
		return mvm.Name, ie
	case err == nil, !isFault(err, &types.ManagedObjectNotFound{}):
		if err == nil { // in no tree, yet there: a removal in progress
			err = fmt.Errorf("not in the snapshot tree of %s", vmRefValue)
		}
		return mvm.Name, fmt.Errorf("vsphere: check snapshot %q (%s) of VM %q (%s): %w", name, snapRef, mvm.Name, vmRefValue, err)
	case named != nil:
		return mvm.Name, ie
	}
	return mvm.Name, fmt.Errorf("vsphere: %w: snapshot %q (%s) of VM %q (%s) is gone", ErrSnapshotNotFound, name, snapRef, mvm.Name, vmRefValue)
}

// vmGoneError: the VM of a snapshot no longer exists, and its snapshots
// went with it. It matches ErrVMNotFound and ErrSnapshotNotFound.
type vmGoneError struct{ vmRef, snapRef, name string }

func (e *vmGoneError) Error() string {
	return fmt.Sprintf("vsphere: VM %s no longer exists (ManagedObjectNotFound: removed from the inventory), and its snapshot %q (%s) went with it",
		e.vmRef, e.name, e.snapRef)
}

func (e *vmGoneError) Is(target error) bool {
	return target == ErrVMNotFound || target == ErrSnapshotNotFound
}

// snapshotName reads the name of snapshot snapRef from the tree of VM vm,
// or "" when it cannot.
func (c *Client) snapshotName(ctx context.Context, vm types.ManagedObjectReference, snapRef string) string {
	var mvm mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, vm, []string{"snapshot"}, &mvm); err != nil || mvm.Snapshot == nil {
		return ""
	}
	name := ""
	walkSnapshots(mvm.Snapshot.RootSnapshotList, func(t types.VirtualMachineSnapshotTree) {
		if t.Snapshot.Value == snapRef {
			name = t.Name
		}
	})
	return name
}

// RemoveOwnSnapshot removes the caller's snapshot named name from VM vmRef
// and never another: the one at moref snapRef if it still is that
// snapshot (CheckSnapshot); otherwise, whatever the moref names now is
// left alone, and the snapshot of that name on the VM, if any, is removed
// instead (its moref may have been reissued). snapRef may be empty (the
// moref was never learned). It returns the moref removed, "" when there
// was nothing to remove: no snapshot of that name, or the VM is gone (its
// snapshots went with it). A moref that names another snapshot is logged
// as a warning naming both.
func (c *Client) RemoveOwnSnapshot(ctx context.Context, vmRefValue, snapRef, name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("vsphere: remove snapshot %s of %s: no snapshot name to check it against", snapRef, vmRefValue)
	}
	if snapRef != "" {
		_, err := c.CheckSnapshot(ctx, vmRefValue, snapRef, name)
		switch {
		case err == nil:
			return snapRef, c.removeSnapshot(ctx, vmRefValue, snapRef, true)
		case errors.Is(err, ErrVMNotFound):
			c.log.Info("snapshot not removed: its VM is gone", "vm_ref", vmRefValue, "snapshot", snapRef, "snapshot_name", name)
			return "", nil
		case errors.Is(err, ErrSnapshotIdentity):
			c.log.Warn("snapshot moref names another snapshot now: left alone", "vm_ref", vmRefValue, "snapshot", snapRef,
				"snapshot_name", name, "err", err)
		case errors.Is(err, ErrSnapshotNotFound):
		default:
			return "", err
		}
	}
	s, err := c.FindSnapshot(ctx, vmRefValue, name)
	switch {
	case errors.Is(err, ErrVMNotFound):
		return "", nil
	case err != nil:
		return "", err
	case s == nil:
		return "", nil
	}
	// Checked again by moref, right before the removal.
	if _, err := c.CheckSnapshot(ctx, vmRefValue, s.Ref, name); err != nil {
		if errors.Is(err, ErrVMNotFound) || (errors.Is(err, ErrSnapshotNotFound) && !errors.Is(err, ErrSnapshotIdentity)) {
			return "", nil
		}
		return "", err
	}
	return s.Ref, c.removeSnapshot(ctx, vmRefValue, s.Ref, true)
}
