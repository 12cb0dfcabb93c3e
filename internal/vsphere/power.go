package vsphere

import (
	"context"
	"fmt"

	"github.com/vmware/govmomi/property"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// PoweredOff is the power state (runtime.powerState) in which a VM's
// disks may be written (a restore into the VM).
const PoweredOff = string(types.VirtualMachinePowerStatePoweredOff)

// PowerState returns the VM's runtime.powerState: "poweredOn",
// "poweredOff" or "suspended". A VM that is gone is ErrVMNotFound.
func (c *Client) PowerState(ctx context.Context, vmRefValue string) (string, error) {
	var mvm mo.VirtualMachine
	if err := property.DefaultCollector(c.vim).RetrieveOne(ctx, vmRef(vmRefValue), []string{"runtime.powerState"}, &mvm); err != nil {
		return "", fmt.Errorf("vsphere: power state of %s: %w", vmRefValue, vmNotFound(err))
	}
	return string(mvm.Runtime.PowerState), nil
}
