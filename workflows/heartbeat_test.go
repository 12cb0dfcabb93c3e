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

// A worker that dies in any step of a backup is noticed within 30 s (the
// README's promise), the first vCenter calls (ResolveVM, PrepareVM)
// included: an activity by its heartbeat timeout (without one, a dead
// worker there was noticed only at their StartToCloseTimeout), a local
// activity by the timeout of the workflow task that runs it (10 s: the
// starter, Backup and the schedules leave Temporal's default).
func TestFirstContactStepsNoticeADeadWorker(t *testing.T) {
	var s testsuite.WorkflowTestSuite
	env := s.NewTestWorkflowEnvironment()
	env.RegisterWorkflow(Backup)
	env.RegisterWorkflow(BackupVM)
	env.RegisterActivity(&activities.VSphere{})
	env.RegisterActivity(&activities.Catalog{})
	var mu sync.Mutex
	timeouts := map[string]time.Duration{}
	local := map[string]bool{}
	env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
		mu.Lock()
		defer mu.Unlock()
		timeouts[info.ActivityType.Name] = info.HeartbeatTimeout
	})
	env.SetOnLocalActivityStartedListener(func(info *activity.Info, _ context.Context, _ []any) {
		mu.Lock()
		defer mu.Unlock()
		local[info.ActivityType.Name] = true
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
		got, ok := timeouts[name]
		switch {
		case local[name] && ok:
			t.Errorf("%s ran as an activity and as a local activity", name)
		case local[name]:
		case !ok || got <= 0 || got > 30*time.Second:
			t.Errorf("%s: heartbeat timeout %v (started: %v), want one of at most 30s, or a local activity", name, got, ok)
		}
	}
}
