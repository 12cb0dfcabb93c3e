package workflows

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"

	"github.com/cbtflow/cbtflow/activities"
)

// Every activity of a backup has a heartbeat timeout, so a worker that
// dies in any step is noticed within it (the README's promise), the first
// vCenter calls (ResolveVM, PrepareVM) included: without one, a dead
// worker there was noticed only at their StartToCloseTimeout.
func TestFirstContactActivitiesHaveHeartbeatTimeout(t *testing.T) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterWorkflow(Backup)
	env.RegisterWorkflow(BackupVM)
	env.RegisterActivity(&activities.VSphere{})
	env.RegisterActivity(&activities.Catalog{})
	var mu sync.Mutex
	timeouts := map[string]time.Duration{}
	env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
		mu.Lock()
		defer mu.Unlock()
		timeouts[info.ActivityType.Name] = info.HeartbeatTimeout
	})
	env.OnActivity(vsphereActs.ResolveVM, mock.Anything, mock.Anything).Return(
		&activities.ResolveVMResult{Profile: "vc", VMRef: "vm-62", VMUUID: "uuid-0", VMName: "vm0"}, nil)
	// PrepareVM fails for good: nothing after it runs.
	env.OnActivity(vsphereActs.PrepareVM, mock.Anything, mock.Anything).Return(
		nil, temporal.NewNonRetryableApplicationError("no disks", activities.ErrTypeNoDisks, nil))
	env.ExecuteWorkflow(Backup, BackupInput{VM: "vm0", Profile: "vc"})
	if env.GetWorkflowError() == nil {
		t.Fatal("the backup succeeded although PrepareVM failed")
	}
	for _, name := range []string{"ResolveVM", "PrepareVM"} {
		if got, ok := timeouts[name]; !ok || got <= 0 || got > 30*time.Second {
			t.Errorf("%s: heartbeat timeout %v (started: %v), want one of at most 30s", name, got, ok)
		}
	}
}
