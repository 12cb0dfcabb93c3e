package stacktest

import (
	"context"
	"net/url"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/lab"
)

// Snapshots lists the snapshots named cbtflow-* (activities.SnapshotPrefix)
// of the lab VM with managed object ID vmRef, at any depth of its snapshot
// tree, through the vSphere API as an operator would see them.
func Snapshots(ctx context.Context, l *lab.Lab, vmRef string) ([]string, error) {
	sc := soap.NewClient(l.URL(), true) // the lab, on loopback
	defer sc.CloseIdleConnections()
	c, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return nil, err
	}
	sm := session.NewManager(c)
	if err := sm.Login(ctx, url.UserPassword(l.User(), l.Password())); err != nil {
		return nil, err
	}
	defer func() { _ = sm.Logout(context.WithoutCancel(ctx)) }()
	vm := object.NewVirtualMachine(c, types.ManagedObjectReference{Type: "VirtualMachine", Value: vmRef})
	var mvm mo.VirtualMachine
	if err := vm.Properties(ctx, vm.Reference(), []string{"snapshot"}, &mvm); err != nil {
		return nil, err
	}
	var names []string
	var walk func([]types.VirtualMachineSnapshotTree)
	walk = func(trees []types.VirtualMachineSnapshotTree) {
		for _, s := range trees {
			if strings.HasPrefix(s.Name, activities.SnapshotPrefix) {
				names = append(names, s.Name)
			}
			walk(s.ChildSnapshotList)
		}
	}
	if mvm.Snapshot != nil {
		walk(mvm.Snapshot.RootSnapshotList)
	}
	return names, nil
}
