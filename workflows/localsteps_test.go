package workflows

import (
	"context"
	"maps"
	"slices"
	"sync"
	"testing"

	"github.com/stretchr/testify/mock"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"
)

// A backup runs its short steps as local activities (changeLocalSteps;
// AllocatedBytes since changeAllocationWhenFull, here for the full disks),
// and as activities the snapshot, the transfers and the failure path:
// here a backup that succeeds, then one whose second space check finds
// the repository full.
func TestShortStepsRunAsLocalActivities(t *testing.T) {
	for _, c := range []struct {
		name, spaceFull string
		local, remote   []string
	}{
		{"completed", "",
			[]string{"AllocatedBytes", "BeginBackup", "ChangedAreas", "CheckSpace", "CommitRestorePoint", "PrepareVM", "RemoveSnapshot", "ResolveVM"},
			[]string{"CreateSnapshot", "TransferDisks"}},
		{"failed", "after",
			[]string{"AllocatedBytes", "BeginBackup", "ChangedAreas", "CheckSpace", "PrepareVM", "RemoveSnapshot", "ResolveVM"},
			[]string{"CreateSnapshot", "FailBackup"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &fakeVM{spaceFull: c.spaceFull}
			env := newEnv(t, f)
			env.OnActivity(vsphereActs.ChangedAreas, mock.Anything, mock.Anything).Return(f.changedAreas(nil))
			onTransfers(env, f.transferOK)
			var mu sync.Mutex
			ran := map[bool]map[string]bool{true: {}, false: {}}
			env.SetOnActivityStartedListener(func(info *activity.Info, _ context.Context, _ converter.EncodedValues) {
				mu.Lock()
				defer mu.Unlock()
				ran[false][info.ActivityType.Name] = true
			})
			env.SetOnLocalActivityStartedListener(func(info *activity.Info, _ context.Context, _ []any) {
				mu.Lock()
				defer mu.Unlock()
				ran[true][info.ActivityType.Name] = true
			})
			env.ExecuteWorkflow(Backup, BackupInput{VM: "vm0"})
			if err := env.GetWorkflowError(); (err == nil) != (c.spaceFull == "") {
				t.Fatalf("backup ended with %v", err)
			}
			for local, want := range map[bool][]string{true: c.local, false: c.remote} {
				if got := slices.Sorted(maps.Keys(ran[local])); !slices.Equal(got, want) {
					t.Errorf("local %v: ran %q, want %q", local, got, want)
				}
			}
		})
	}
}
