package workflows

import (
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

// LookupVM resolves a VM, named as a backup names it (name, inventory
// path or moref; under the input's profile, else the worker's default),
// and returns what the worker found, without backing it up: the check of
// `starter schedule add`, which runs where the vCenter profiles and their
// passwords are, the worker. It fails as Backup's resolution fails
// (VMNotFound, ProfileNotFound, Unreachable after about 30 s).
func LookupVM(ctx workflow.Context, in activities.ResolveVMInput) (*activities.ResolveVMResult, error) {
	var vm activities.ResolveVMResult
	if err := workflow.ExecuteActivity(withShortActivity(ctx), vsphereActs.ResolveVM, in).Get(ctx, &vm); err != nil {
		return nil, err
	}
	return &vm, nil
}
