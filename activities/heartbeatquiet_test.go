package activities_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/converter"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// A transfer attempt sends no heartbeat within its HeartbeatQuiet, and
// heartbeats as before after it: with none, it heartbeats at once while
// it waits for a slot; with a quiet start shorter than its wait, its
// first heartbeat comes after the wait, from its copy or its check; with
// one longer than the attempt, it sends none. Each copies the disk whole.
func TestTransferHeartbeatQuiet(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	f.apply(t, vm.disks[1].Key, write{off: 0, n: 4 << 20, seed: 41}, write{off: 1 << 30, n: 1 << 20, seed: 42})

	const wait = 600 * time.Millisecond // at most, for its slot
	for i, c := range []struct {
		name  string
		quiet time.Duration
	}{{"none", 0}, {"shorter than the wait", wait / 2}, {"longer than the attempt", time.Hour}} {
		t.Run(c.name, func(t *testing.T) {
			f.tr.HeartbeatQuiet = c.quiet
			// One slot, taken here: the transfer waits for it until it is
			// given back.
			f.tr.Slots = activities.NewTransferSlots(1)
			release := f.tr.Slots.TakeForTest()
			b := f.takeBackup(t, env, vm, fmt.Sprintf("quiet%d", i), "*")

			env := f.newEnv(t)
			var mu sync.Mutex
			var stages []string
			waiting := make(chan struct{}, 1)
			env.SetOnActivityHeartbeatListener(func(_ *activity.Info, details converter.EncodedValues) {
				var p activities.TransferProgress
				if err := details.Get(&p); err != nil {
					t.Errorf("heartbeat details: %v", err)
				}
				mu.Lock()
				defer mu.Unlock()
				stages = append(stages, p.Stage)
				if p.Stage == activities.TransferStageWaiting {
					select {
					case waiting <- struct{}{}:
					default:
					}
				}
			})
			go func() {
				select {
				case <-waiting:
				case <-time.After(wait):
				}
				release()
			}()
			res := mustExecute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, b.input(""))
			f.checkResult(t, b, res)

			mu.Lock()
			defer mu.Unlock()
			switch {
			case c.quiet == 0:
				if len(stages) == 0 || stages[0] != activities.TransferStageWaiting {
					t.Errorf("heartbeats by stage %q: want the first while it waits", stages)
				}
			case c.quiet < wait:
				if len(stages) == 0 || slices.Contains(stages, activities.TransferStageWaiting) {
					t.Errorf("heartbeats by stage %q: want some, none while it waits", stages)
				}
			default:
				if len(stages) != 0 {
					t.Errorf("heartbeats by stage %q within the quiet start of %s: want none", stages, c.quiet)
				}
			}
		})
	}
}
