package activities_test

import (
	"context"
	"testing"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// A restore into a VM keeps its snapshot, cbtflow-restore-<id>, when it
// fails, for the operator to revert to: the sweeper never calls it an
// orphan, though no workflow runs it, while an abandoned backup's
// snapshot on the same VM is one.
func TestFindOrphansLeavesRestoreSnapshots(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	const backupID = "20260101T000000Z-0123456789ab"
	backupSnap := f.snapshot(t, env, vm, backupID)
	c, err := f.sessions.Client(ctxT(t, time.Minute), profileLab)
	if err != nil {
		t.Fatal(err)
	}
	v, err := c.VMByUUID(ctxT(t, time.Minute), vm.uuid)
	if err != nil {
		t.Fatal(err)
	}
	kept, err := c.CreateSnapshot(ctxT(t, time.Minute), v, activities.RestoreSnapshotPrefix+"20260101T000100Z-0123456789ab")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.RemoveSnapshot(context.Background(), vm.ref, kept.Ref) })
	cat, err := catalog.Open(ctxT(t, time.Minute), testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	sw := &activities.Sweeper{Sessions: f.sessions, Catalog: cat, Repo: f.repo, Workflows: noWorkflows{}, Namespace: "default"}
	res := mustExecute[activities.FindOrphansResult](t, newActivityEnv(t, f.log, sw), sw.FindOrphans, activities.FindOrphansInput{})
	if len(res.Snapshots) != 1 || res.Snapshots[0].SnapshotRef != backupSnap.SnapshotRef {
		t.Errorf("orphan snapshots %+v, want only the backup's %s, never the restore's %s (%s)", res.Snapshots,
			backupSnap.SnapshotRef, kept.Name, kept.Ref)
	}
}
