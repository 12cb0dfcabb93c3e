//go:build cbtflow_faultpoints

package activities_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// holdAt makes the activities env runs hold at fault points as h decides:
// h reaches them through the context they all derive from, as a worker's
// fault points do (faultpoint.With).
func holdAt(env *testsuite.TestActivityEnvironment, h faultpoint.Holder) {
	env.SetWorkerOptions(worker.Options{BackgroundActivityContext: faultpoint.With(context.Background(), h)})
}

// The snapshot is renamed, or vanishes, while its disk is copied: the copy
// itself reads on (the source was opened before), but TransferDisk checks
// again before it returns, and fails non-retryably: nothing is reported
// for a commit.
func TestTransferDiskSnapshotChangesDuringCopy(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	f.tr.Copy = copier.Options{FlushBytes: 2 << 20, FlushInterval: 50 * time.Millisecond, ProgressInterval: time.Millisecond, InFlight: 4}
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	key := vm.disks[1].Key
	var ws []write
	for i := range 8 {
		ws = append(ws, write{off: int64(i) * (256 << 20), n: 4 << 20, seed: byte(20 + i)})
	}
	f.apply(t, key, ws...)

	for _, tc := range []struct {
		id, typ string
		act     func(b backup) error
		names   []string
	}{
		{"mid-rename", activities.ErrTypeSnapshotIdentity,
			func(b backup) error { return f.lab.RenameSnapshot(vm.ref, b.snap.SnapshotRef, adminName) },
			[]string{adminName, "after the copy"}},
		{"mid-remove", activities.ErrTypeSnapshotGone,
			func(b backup) error {
				c, err := f.sessions.Client(context.Background(), profileLab)
				if err != nil {
					return err
				}
				return c.RemoveSnapshot(context.Background(), vm.ref, b.snap.SnapshotRef)
			},
			[]string{"gone", "after the copy"}},
	} {
		t.Run(tc.id, func(t *testing.T) {
			b := f.takeBackup(t, env, vm, tc.id, "*")
			var once sync.Once
			var actErr error
			reached := false
			held := newActivityEnv(t, f.log, f.tr)
			holdAt(held, faultpoint.HolderFunc(func(_ context.Context, p faultpoint.Point) {
				if p == faultpoint.MidTransfer {
					once.Do(func() { reached = true; actErr = tc.act(b) })
				}
			}))
			_, err := execute[activities.TransferDiskResult](t, held, f.tr.TransferDisk, b.input(""))
			if !reached || actErr != nil {
				t.Fatalf("the snapshot was not changed mid-copy (reached %v): %v", reached, actErr)
			}
			wantAppError(t, err, tc.typ, append(tc.names, activities.SnapshotPrefix+tc.id, b.snap.SnapshotRef)...)
			if tc.typ == activities.ErrTypeSnapshotIdentity {
				if names := f.labSnapshotNames(t, vm.ref); !slices.Contains(names, adminName) {
					t.Errorf("the renamed snapshot is gone: %v", names)
				}
			}
		})
	}
}
