package lab

import (
	"context"
	"crypto/x509"
	"fmt"
	"net/url"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/view"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// SecondDiskVM is the VM of the default inventory that has two disks.
const SecondDiskVM = "DC0_H0_VM0"

// secondDiskCapacity is the size of SecondDiskVM's second disk.
const secondDiskCapacity = 10 << 30

// setupInventory shapes the simulator's VPX inventory through the vSphere
// API, as an operator would: CBT on for every VM, a second thin disk for
// SecondDiskVM, and an image for every disk.
func (l *Lab) setupInventory(ctx context.Context) error {
	c, logout, err := l.login(ctx)
	if err != nil {
		return err
	}
	defer logout()

	m := view.NewManager(c)
	v, err := m.CreateContainerView(ctx, c.ServiceContent.RootFolder, []string{"VirtualMachine"}, true)
	if err != nil {
		return fmt.Errorf("lab: setup: %w", err)
	}
	defer func() { _ = v.Destroy(context.WithoutCancel(ctx)) }()
	var vms []mo.VirtualMachine
	if err := v.Retrieve(ctx, []string{"VirtualMachine"}, []string{"name", "config.hardware.device"}, &vms); err != nil {
		return fmt.Errorf("lab: setup: %w", err)
	}
	for _, mvm := range vms {
		vm := object.NewVirtualMachine(c, mvm.Self)
		if mvm.Name == SecondDiskVM {
			if err := addSecondDisk(ctx, vm, mvm); err != nil {
				return fmt.Errorf("lab: setup: second disk of %s: %w", mvm.Name, err)
			}
		}
		task, err := vm.Reconfigure(ctx, types.VirtualMachineConfigSpec{ChangeTrackingEnabled: types.NewBool(true)})
		if err == nil {
			err = task.Wait(ctx)
		}
		if err != nil {
			return fmt.Errorf("lab: setup: enable CBT on %s: %w", mvm.Name, err)
		}
		disks, err := l.Disks(mvm.Self.Value)
		if err != nil {
			return err
		}
		for _, d := range disks {
			if _, err := l.disk(d.VMRef, d.Key, d.Capacity); err != nil {
				return err
			}
		}
	}
	return nil
}

func addSecondDisk(ctx context.Context, vm *object.VirtualMachine, mvm mo.VirtualMachine) error {
	devices := object.VirtualDeviceList(mvm.Config.Hardware.Device)
	disks := devices.SelectByType((*types.VirtualDisk)(nil))
	if len(disks) != 1 {
		return fmt.Errorf("expected one disk, found %d", len(disks))
	}
	first := disks[0].(*types.VirtualDisk)
	backing := first.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	ctrl, ok := devices.FindByKey(first.ControllerKey).(types.BaseVirtualController)
	if !ok {
		return fmt.Errorf("controller %d of the first disk not found", first.ControllerKey)
	}
	var p object.DatastorePath
	if !p.FromString(backing.FileName) {
		return fmt.Errorf("cannot parse %q", backing.FileName)
	}
	name := fmt.Sprintf("[%s] %s/disk2.vmdk", p.Datastore, mvm.Name)
	var ds types.ManagedObjectReference
	if backing.Datastore != nil {
		ds = *backing.Datastore
	}
	disk := devices.CreateDisk(ctrl, ds, name)
	disk.CapacityInKB = secondDiskCapacity / 1024
	return vm.AddDevice(ctx, disk)
}

// login opens a session on the lab's own SDK endpoint.
func (l *Lab) login(ctx context.Context) (*vim25.Client, func(), error) {
	sc := soap.NewClient(l.sdkURL, false)
	// Trust the lab's own certificate (a thumbprint would work too, but
	// govmomi tries the CA check first and the server logs that failure).
	pool := x509.NewCertPool()
	pool.AddCert(l.server.Certificate())
	sc.DefaultTransport().TLSClientConfig.RootCAs = pool
	c, err := vim25.NewClient(ctx, sc)
	if err != nil {
		return nil, nil, fmt.Errorf("lab: connect to own endpoint: %w", err)
	}
	sm := session.NewManager(c)
	if err := sm.Login(ctx, url.UserPassword(l.opts.User, l.password)); err != nil {
		return nil, nil, fmt.Errorf("lab: login to own endpoint: %w", err)
	}
	return c, func() {
		_ = sm.Logout(context.WithoutCancel(ctx))
		sc.CloseIdleConnections()
	}, nil
}
