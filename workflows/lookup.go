package workflows

import (
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
)

// LookupTimeout bounds LookupVM's resolution of a VM.
const LookupTimeout = 90 * time.Second

// LookupVM resolves a VM, named as a backup names it (name, inventory
// path or moref; under the input's profile, else the worker's default),
// and returns what the worker found, without backing it up: the check of
// `starter schedule add`, which runs where the vCenter profiles and their
// passwords are, the worker. It fails as Backup's resolution fails
// (VMNotFound, ProfileNotFound), except that an operator waits for it:
// it gives up after 3 attempts and at most 90 s (LookupTimeout).
func LookupVM(ctx workflow.Context, in activities.ResolveVMInput) (*activities.ResolveVMResult, error) {
	actx := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout:    time.Minute,
		ScheduleToCloseTimeout: LookupTimeout,
		HeartbeatTimeout:       30 * time.Second,
		RetryPolicy:            &temporal.RetryPolicy{InitialInterval: time.Second, MaximumInterval: 5 * time.Second, MaximumAttempts: 3},
	})
	var vm activities.ResolveVMResult
	if err := workflow.ExecuteActivity(actx, vsphereActs.ResolveVM, in).Get(ctx, &vm); err != nil {
		return nil, err
	}
	return &vm, nil
}
