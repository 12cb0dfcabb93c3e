package workflows

import (
	"context"
	"sync"
	"testing"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
)

// A backup started without a profile ({"vm": ...} from the Web UI) leaves
// the choice to the worker's configuration: the workflow, which cannot
// read it, asks ResolveVM with no profile and uses the profile ResolveVM
// answers with from then on (here "prod"; never a built-in "lab").
func TestBackupWithoutProfileUsesResolvedProfile(t *testing.T) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterWorkflow(Backup)
	env.RegisterWorkflow(BackupVM)
	env.RegisterActivity(&activities.VSphere{})
	env.RegisterActivity(&activities.Catalog{})
	var mu sync.Mutex
	var resolved []activities.ResolveVMInput
	var prepared []activities.PrepareVMInput
	env.OnActivity(vsphereActs.ResolveVM, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.ResolveVMInput) (*activities.ResolveVMResult, error) {
			mu.Lock()
			defer mu.Unlock()
			resolved = append(resolved, in)
			profile := in.Profile
			if profile == "" {
				profile = "prod" // the worker's default
			}
			return &activities.ResolveVMResult{Profile: profile, VMRef: "vm-62", VMUUID: "uuid-0", VMName: "vm0", VCenterUUID: "vc-0"}, nil
		})
	env.OnActivity(vsphereActs.PrepareVM, mock.Anything, mock.Anything).Return(
		func(_ context.Context, in activities.PrepareVMInput) (*activities.PrepareVMResult, error) {
			mu.Lock()
			defer mu.Unlock()
			prepared = append(prepared, in)
			// Stop here: what follows takes its profile from the child's input.
			return nil, temporal.NewNonRetryableApplicationError("stop", activities.ErrTypeNoDisks, nil)
		})
	env.ExecuteWorkflow(Backup, BackupInput{VM: "vm0"})
	if env.GetWorkflowError() == nil {
		t.Fatal("the backup succeeded although PrepareVM failed")
	}
	if len(resolved) != 1 || resolved[0].Profile != "" {
		t.Errorf("ResolveVM got %+v, want one call without a profile (the worker's default)", resolved)
	}
	if len(prepared) != 1 || prepared[0].Profile != "prod" {
		t.Errorf("PrepareVM got %+v, want one call under the resolved profile prod", prepared)
	}
}
