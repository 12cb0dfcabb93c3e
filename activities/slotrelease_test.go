//go:build cbtflow_faultpoints

package activities_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// runOnceAt is a faultpoint.Holder that runs fn the first time a transfer
// reaches point, and holds it until fn returns.
type runOnceAt struct {
	point faultpoint.Point
	once  sync.Once
	fn    func()
}

func (r *runOnceAt) Hold(_ context.Context, p faultpoint.Point) {
	if p == r.point {
		r.once.Do(r.fn)
	}
}

// A transfer gives its slot back once its copy is durable and its NBD
// servers are stopped: with one slot, a second transfer copies while the
// first is held before its image check and seal. (Before, the second
// waited for the first to return, and here that would never happen.)
func TestTransferSlotFreedBeforeCheck(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	f.tr.Slots = activities.NewTransferSlots(1)
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	f.apply(t, vm.disks[1].Key, write{off: 0, n: 4 << 20, seed: 31}, write{off: 1 << 30, n: 1 << 20, seed: 32})
	first := f.takeBackup(t, env, vm, "slot1", "*")
	second := f.takeBackup(t, env, vm, "slot2", "*")

	other := f.newEnv(t)
	var secondRes *activities.TransferDiskResult
	var secondErr error
	ran := false
	hold := &runOnceAt{point: faultpoint.BeforeCheck, fn: func() {
		ran = true
		done := make(chan struct{})
		go func() {
			defer close(done)
			secondRes, secondErr = execute[activities.TransferDiskResult](t, other, f.tr.TransferDisk, second.input(""))
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Minute):
			secondErr = context.DeadlineExceeded
		}
	}}
	holdAt(env, hold)
	firstRes := mustExecute[activities.TransferDiskResult](t, env, f.tr.TransferDisk, first.input(""))
	if !ran {
		t.Fatal("the first transfer never reached its image check")
	}
	if secondErr != nil {
		t.Fatalf("the second transfer, run while the first was held before its image check: %v (it waited for the first's slot?)", secondErr)
	}
	f.checkResult(t, first, firstRes)
	f.checkResult(t, second, secondRes)
}

// TransferDisks checks the snapshot after every disk's copy: removed
// while a disk is held before its image check, the activity fails, naming
// the snapshot, "after the copy".
func TestTransferDisksSnapshotGoneAfterCopy(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	f.apply(t, vm.disks[0].Key, write{off: 0, n: 1 << 20, seed: 41})
	f.apply(t, vm.disks[1].Key, write{off: 0, n: 1 << 20, seed: 42})
	db := f.takeDisksBackup(t, env, vm, "goneafter1")
	snap := db.backups[0].snap
	other := f.newEnv(t)
	var removeErr error
	holdAt(env, &runOnceAt{point: faultpoint.BeforeCheck, fn: func() {
		removeErr = runRemove(t, other, f, activities.RemoveSnapshotInput{Profile: profileLab, VMRef: vm.ref,
			SnapshotRef: snap.SnapshotRef, SnapshotName: snap.SnapshotName})
	}})
	_, err := execute[activities.TransferDisksResult](t, env, f.tr.TransferDisks, db.in)
	if removeErr != nil {
		t.Fatal(removeErr)
	}
	wantAppError(t, err, activities.ErrTypeSnapshotGone, snap.SnapshotRef, "after the copy")
}
