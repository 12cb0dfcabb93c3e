package activities_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.temporal.io/api/serviceerror"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// noWorkflows is a Temporal that runs nothing: every backup is abandoned.
type noWorkflows struct{}

func (noWorkflows) DescribeWorkflow(context.Context, string, string) (*client.WorkflowExecutionDescription, error) {
	return nil, serviceerror.NewNotFound("workflow not found")
}

func (noWorkflows) ListWorkflow(context.Context, *workflowservice.ListWorkflowExecutionsRequest) (*workflowservice.ListWorkflowExecutionsResponse, error) {
	return &workflowservice.ListWorkflowExecutionsResponse{}, nil
}

// One vCenter under two profiles shows the sweeper each snapshot twice: an
// abandoned snapshot is still listed once, so it is removed and its backup
// failed once.
func TestFindOrphansOnceAcrossProfiles(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	const backupID = "20260101T000000Z-0123456789ab"
	snap := f.snapshot(t, env, vm, backupID)

	alias := f.profile
	alias.Name = "lab-alias"
	sessions := vsphere.NewSessions(map[string]vsphere.Profile{profileLab: f.profile, alias.Name: alias}, f.log)
	t.Cleanup(func() {
		if err := sessions.Close(context.Background()); err != nil {
			t.Error(err)
		}
	})
	cat, err := catalog.Open(ctxT(t, time.Minute), testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	sw := &activities.Sweeper{Sessions: sessions, Catalog: cat, Repo: f.repo, Workflows: noWorkflows{}, Namespace: "default"}
	res := mustExecute[activities.FindOrphansResult](t, newActivityEnv(t, f.log, sw), sw.FindOrphans, activities.FindOrphansInput{})
	if len(res.Snapshots) != 1 || res.Snapshots[0].SnapshotRef != snap.SnapshotRef || res.Snapshots[0].BackupID != backupID || res.Snapshots[0].VMRef != vm.ref {
		t.Errorf("orphan snapshots %+v, want %s (%s) of %s once", res.Snapshots, snap.SnapshotRef, activities.SnapshotPrefix+backupID, vm.ref)
	}
	if len(res.Backups) != 0 {
		t.Errorf("orphan backups %v, want none besides the snapshot's", res.Backups)
	}
}

// One vCenter that cannot be swept must not stop the sweep of the others:
// here a vCenter that went away after its session was made (listing its
// snapshots fails) and one whose login is refused come before and after
// the lab in the sweep's order. The lab's abandoned snapshot is still
// found, and the result names both failed profiles.
func TestFindOrphansOneVCenterFailing(t *testing.T) {
	f := newFixture(t, lab.Options{})
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	const backupID = "20260101T000000Z-0123456789ac"
	snap := f.snapshot(t, env, vm, backupID)

	other, err := lab.Start(context.Background(), lab.Options{Dir: filepath.Join(t.TempDir(), "lab"), Logger: f.log})
	if err != nil {
		t.Fatalf("lab.Start: %v", err)
	}
	otherOpen := true
	t.Cleanup(func() {
		if otherOpen {
			_ = other.Close()
		}
	})
	pw := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pw, []byte(other.Password()), 0o600); err != nil {
		t.Fatal(err)
	}
	gone := vsphere.Profile{Name: "gone", URL: other.URL().String(), User: other.User(), PasswordFile: pw,
		Thumbprint: other.Thumbprint(), Source: vsphere.SourceLab}
	refused := f.profile
	refused.Name, refused.PasswordFile = "lab-refused", filepath.Join(t.TempDir(), "wrong")
	if err := os.WriteFile(refused.PasswordFile, []byte(wrongPassword), 0o600); err != nil {
		t.Fatal(err)
	}
	sessions := vsphere.NewSessions(map[string]vsphere.Profile{gone.Name: gone, profileLab: f.profile, refused.Name: refused}, f.log)
	// Logging out of the vCenter that went away fails: that is the point.
	t.Cleanup(func() { _ = sessions.Close(context.Background()) })
	if _, err := sessions.Client(ctxT(t, time.Minute), gone.Name); err != nil {
		t.Fatal(err)
	}
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}
	otherOpen = false

	cat, err := catalog.Open(ctxT(t, time.Minute), testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cat.Close)
	sw := &activities.Sweeper{Sessions: sessions, Catalog: cat, Repo: f.repo, Workflows: noWorkflows{}, Namespace: "default"}
	res, err := execute[activities.FindOrphansResult](t, newActivityEnv(t, f.log, sw), sw.FindOrphans, activities.FindOrphansInput{})
	if err != nil {
		t.Fatalf("FindOrphans failed as a whole: %v", err)
	}
	if len(res.Snapshots) != 1 || res.Snapshots[0].SnapshotRef != snap.SnapshotRef || res.Snapshots[0].Profile != profileLab {
		t.Errorf("orphan snapshots %+v, want %s of profile %s", res.Snapshots, snap.SnapshotRef, profileLab)
	}
	if len(res.Errors) != 2 || !strings.Contains(res.Errors[0], `"gone"`) || !strings.Contains(res.Errors[1], `"lab-refused"`) {
		t.Errorf("errors %q, want one naming profile gone, then one naming lab-refused", res.Errors)
	}
}
