package chaos

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
)

// adminSnapshot is what the renamed snapshot is called: an
// administrator's snapshot that a backup's moref names now.
const adminSnapshot = "admin-before-upgrade"

// snapshotMoref makes the moref of a running backup's snapshot name an
// administrator's snapshot — the lab renames it through the vSphere API,
// which is what a moref reissued by a restarted vCenter looks like to the
// backup — right after the snapshot was taken and in the middle of a
// transfer. Each such backup must fail at once (one attempt of the
// activity that finds out, typed SnapshotIdentity), name both snapshots,
// commit nothing, leave no image, keep the administrator's snapshot, and
// leave the chain restorable; the next backup must succeed.
func snapshotMoref(t *testing.T, ctx context.Context) []*Tally {
	e := newEnv(t, ctx, envConfig{name: "moref"})
	tl := tallied(t, "snapshot moref names another snapshot")
	const vm = "DC0_C0_RP0_VM0"
	r := e.backup(tl, "moref-1", vm, 700, 32*MiB, nil, false, backupTimeout)
	e.check(tl, r)
	for i, step := range []struct {
		point, activity string
		bytes           int64
	}{
		{faultpoint.AfterSnapshot, "ChangedAreas", 32 * MiB},
		{faultpoint.MidTransfer, "TransferDisk", 256 * MiB},
	} {
		f, renamed := e.renameSnapshotAt(step.point, vm)
		r = e.backup(tl, fmt.Sprintf("moref-%d", 2+2*i), vm, uint64(701+2*i), step.bytes, f, true, backupTimeout)
		if n, typ, err := e.attempts(r.out.WorkflowID, step.activity); err != nil || n != 1 || typ != activities.ErrTypeSnapshotIdentity {
			e.problem(tl, "%s: %s ran %d attempt(s) and failed with type %q (%v), want one attempt failing %s",
				r.label, step.activity, n, typ, err, activities.ErrTypeSnapshotIdentity)
		}
		for _, want := range []string{adminSnapshot, activities.SnapshotPrefix + r.out.BackupID} {
			if r.out.Error != "" && !strings.Contains(r.out.Error, want) {
				e.problem(tl, "%s: failure %q does not name %q", r.label, r.out.Error, want)
			}
		}
		e.check(tl, r)
		e.removeAdminSnapshot(tl, r.label, vm, renamed())
		e.reverify(tl, vm)
		r = e.backup(tl, fmt.Sprintf("moref-%d", 3+2*i), vm, uint64(702+2*i), 32*MiB, nil, false, backupTimeout)
		e.check(tl, r)
	}
	return []*Tally{tl}
}

// renameSnapshotAt renames vm's cbtflow snapshot to adminSnapshot while
// the backup stands at point, then lets it go on. renamed returns the
// moref renamed, once the backup ended.
func (e *env) renameSnapshotAt(point, vm string) (f *fault, renamed func() string) {
	g := e.s.FaultPoints()
	var mu sync.Mutex
	var ref string
	return &fault{
			name: "snapshot renamed at " + point,
			arm:  func() error { return g.Arm(point) },
			act: func(ictx context.Context) error {
				defer func() { _ = g.Release(point) }()
				if _, err := g.Wait(ictx, point); err != nil {
					return err
				}
				snaps, err := e.l.Snapshots(vm)
				if err != nil {
					return err
				}
				var ours []lab.SnapshotInfo
				for _, s := range snaps {
					if strings.HasPrefix(s.Name, activities.SnapshotPrefix) {
						ours = append(ours, s)
					}
				}
				if len(ours) != 1 {
					return fmt.Errorf("snapshots of %s at %s: %+v, want one of cbtflow's", vm, point, snaps)
				}
				if err := e.l.RenameSnapshot(vm, ours[0].Ref, adminSnapshot); err != nil {
					return err
				}
				mu.Lock()
				ref = ours[0].Ref
				mu.Unlock()
				return g.Release(point)
			},
			settle: func() { _ = g.Release(point) },
		}, func() string {
			mu.Lock()
			defer mu.Unlock()
			return ref
		}
}

// removeAdminSnapshot checks that the renamed snapshot outlived the failed
// backup, then removes it, as its administrator would, so that the next
// scenarios see the VM as before.
func (e *env) removeAdminSnapshot(tl *Tally, label, vm, ref string) {
	snaps, err := e.l.Snapshots(vm)
	if err != nil {
		e.problem(tl, "%s: snapshots of %s: %v", label, vm, err)
		return
	}
	found := false
	for _, s := range snaps {
		found = found || (s.Ref == ref && s.Name == adminSnapshot)
	}
	if !found {
		e.problem(tl, "%s: the administrator's snapshot %s (%s) is gone: %+v", label, adminSnapshot, ref, snaps)
		return
	}
	profiles, err := vsphere.LoadProfiles(e.s.VCentersFile())
	if err != nil {
		e.problem(tl, "%s: %v", label, err)
		return
	}
	sessions := vsphere.NewSessions(profiles, slog.New(slog.DiscardHandler))
	defer func() { _ = sessions.Close(context.WithoutCancel(e.ctx)) }()
	c, err := sessions.Client(e.ctx, "lab")
	if err == nil {
		var info lab.VMInfo
		if info, err = e.l.VM(vm); err == nil {
			err = c.RemoveSnapshot(e.ctx, info.Ref, ref)
		}
	}
	if err != nil {
		e.problem(tl, "%s: removing the administrator's snapshot: %v", label, err)
	}
}
