package activities

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/vsphere"
)

// WorkflowLookup is the part of the Temporal client the sweeper uses to
// tell whether a backup still runs; client.Client is one.
type WorkflowLookup interface {
	DescribeWorkflow(ctx context.Context, workflowID, runID string) (*client.WorkflowExecutionDescription, error)
	ListWorkflow(ctx context.Context, req *workflowservice.ListWorkflowExecutionsRequest) (*workflowservice.ListWorkflowExecutionsResponse, error)
}

// Sweeper holds the activity that finds what dead backups left behind: a
// terminated workflow runs no cleanup code, so its snapshot stays on the
// VM and its catalog row stays "running".
type Sweeper struct {
	Sessions  *vsphere.Sessions
	Catalog   *catalog.Catalog
	Repo      *repository.Repository
	Workflows WorkflowLookup
	Namespace string
}

// FindOrphansInput bounds what counts as abandoned.
type FindOrphansInput struct {
	// MinAgeSeconds: snapshots and running backups younger than this are
	// left alone, whatever their workflow's state.
	MinAgeSeconds int64 `json:"min_age_seconds"`
}

// OrphanSnapshot is a cbtflow snapshot no running backup owns.
type OrphanSnapshot struct {
	Profile      string    `json:"profile"`
	VMRef        string    `json:"vm_ref"`
	VMName       string    `json:"vm_name"`
	SnapshotRef  string    `json:"snapshot_ref"`
	SnapshotName string    `json:"snapshot_name"`
	BackupID     string    `json:"backup_id"`
	Created      time.Time `json:"created"`
}

// FindOrphansResult lists what to clean up.
type FindOrphansResult struct {
	Snapshots []OrphanSnapshot `json:"snapshots,omitempty"`
	// Backups are backups the catalog calls running whose workflow is
	// not running, and backups whose working folder is still in the
	// repository although no workflow runs them (e.g. their catalog was
	// dropped mid-backup): FailBackup removes what they left.
	Backups []string `json:"backups,omitempty"`
	// Errors name each vCenter profile that could not be swept (not
	// reachable, login refused, its snapshots not listed) and why. The
	// others were swept all the same; the next sweep tries again.
	Errors []string `json:"errors,omitempty"`
}

// FindOrphans lists cbtflow snapshots older than the minimum age whose
// backup is not running, on every configured vCenter, and running catalog
// backups whose workflow has ended. It also records as failed the
// restores into VMs whose workflow ended without recording their outcome
// (finishAbandonedRestores).
func (a *Sweeper) FindOrphans(ctx context.Context, in FindOrphansInput) (*FindOrphansResult, error) {
	defer heartbeatEvery(ctx, 10*time.Second, nil)()
	minAge := time.Duration(in.MinAgeSeconds) * time.Second
	now := time.Now()
	res := &FindOrphansResult{}
	failed := map[string]bool{}
	// Two profiles of one vCenter list the same snapshots: each is an
	// orphan once, by the vCenter's identity and its moref.
	listed := map[string]bool{}
	// One vCenter that cannot be swept must not stop the sweep of the
	// others: its failure is logged, named in the result, and the next
	// sweep tries again. Only this activity's own end stops the loop.
	skip := func(profile string, err error) {
		activity.GetLogger(ctx).Warn("sweeper: vCenter not swept", "vcenter", profile, "error", err)
		res.Errors = append(res.Errors, fmt.Sprintf("vCenter profile %q not swept: %v", profile, err))
	}
	for _, profile := range a.Sessions.Names() {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		c, err := a.Sessions.Client(ctx, profile)
		if err != nil {
			skip(profile, err)
			continue
		}
		snaps, err := c.Snapshots(ctx, SnapshotPrefix)
		if err != nil {
			skip(profile, err)
			continue
		}
		vcenter := c.InstanceUUID()
		if vcenter == "" {
			vcenter = "profile:" + profile // no identity of its own: the profile is all there is
		}
		for _, s := range snaps {
			if now.Sub(s.Created) < minAge || listed[vcenter+"/"+s.Ref] {
				continue
			}
			listed[vcenter+"/"+s.Ref] = true
			if strings.HasPrefix(s.Name, RestoreSnapshotPrefix) {
				// A restore into a VM keeps its snapshot when it fails,
				// for the operator to revert to: only the operator
				// removes it.
				continue
			}
			id := strings.TrimPrefix(s.Name, SnapshotPrefix)
			if repository.CheckComponent("backup ID", id) != nil {
				continue // not a name cbtflow gives
			}
			running, err := a.backupRunning(ctx, id)
			if err != nil {
				return nil, err
			}
			if running {
				continue
			}
			res.Snapshots = append(res.Snapshots, OrphanSnapshot{Profile: profile, VMRef: s.VMRef, VMName: s.VMName,
				SnapshotRef: s.Ref, SnapshotName: s.Name, BackupID: id, Created: s.Created})
			failed[id] = true
		}
	}
	backups, err := a.Catalog.List(ctx, catalog.ListFilter{Status: catalog.StatusRunning})
	if err != nil && !catalog.Unusable(err) {
		return nil, err
	}
	for _, b := range backups {
		if failed[b.ID] || now.Sub(b.StartedAt) < minAge {
			continue
		}
		running, err := a.backupRunning(ctx, b.ID)
		if err != nil {
			return nil, err
		}
		if !running {
			res.Backups = append(res.Backups, b.ID)
			failed[b.ID] = true
		}
	}
	staged, err := a.stagedBackups(now, minAge)
	if err != nil {
		return nil, err
	}
	for _, id := range staged {
		if failed[id] {
			continue
		}
		running, err := a.backupRunning(ctx, id)
		if err != nil {
			return nil, err
		}
		if !running {
			res.Backups = append(res.Backups, id)
		}
	}
	if err := a.finishAbandonedRestores(ctx, now, minAge); err != nil {
		return nil, err
	}
	return res, nil
}

// finishAbandonedRestores records as failed the restores into VMs older
// than minAge that the catalog has as unfinished although their workflow
// no longer runs (terminated, or it ended without recording its outcome):
// until then catalog.RestoredSince makes every backup of the VM full. The
// restore's snapshot, named in its row, is left for the operator.
func (a *Sweeper) finishAbandonedRestores(ctx context.Context, now time.Time, minAge time.Duration) error {
	restores, err := a.Catalog.UnfinishedVMRestores(ctx, "")
	if catalog.Unusable(err) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, r := range restores {
		if now.Sub(r.StartedAt) < minAge || r.WorkflowID == "" {
			continue
		}
		d, err := a.Workflows.DescribeWorkflow(ctx, r.WorkflowID, "")
		var nf *serviceerror.NotFound
		switch {
		case errors.As(err, &nf):
		case err != nil:
			return fmt.Errorf("sweeper: describe workflow %s: %w", r.WorkflowID, err)
		case d.Status == enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING:
			continue
		}
		why := "its workflow " + r.WorkflowID + " ended without recording the restore's outcome"
		if r.Snapshot != "" {
			why += "; the VM's snapshot " + r.Snapshot + " was kept: revert the VM to it to undo a partial restore"
		}
		if err := a.Catalog.FinishVMRestore(ctx, r.ID, catalog.RestoreFailed, why); err != nil {
			return err
		}
		activity.GetLogger(ctx).Warn("sweeper: abandoned restore into a VM recorded as failed", "restore", r.ID, "vm", r.VMName,
			"workflow", r.WorkflowID, "snapshot", r.Snapshot)
	}
	return nil
}

// stagedBackups lists the backups whose working folder in the repository
// is older than minAge. A backup's folder goes when it commits or fails:
// one that stays belongs to a backup whose cleanup could not run.
func (a *Sweeper) stagedBackups(now time.Time, minAge time.Duration) ([]string, error) {
	if a.Repo == nil {
		return nil, nil
	}
	dir := filepath.Join(a.Repo.Root(), ".staging")
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, permanent(err)
	}
	var ids []string
	for _, e := range entries {
		info, err := e.Info()
		if err != nil || !e.IsDir() || repository.CheckComponent("backup ID", e.Name()) != nil {
			continue
		}
		if now.Sub(info.ModTime()) >= minAge {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// backupRunning asks Temporal whether the workflow of a backup runs: by
// the workflow and run the catalog recorded, or else by the
// CbtflowBackupID search attribute.
func (a *Sweeper) backupRunning(ctx context.Context, backupID string) (bool, error) {
	b, err := a.Catalog.Get(ctx, backupID)
	switch {
	case err == nil && b.WorkflowID != "":
		if b.Status != catalog.StatusRunning {
			return false, nil
		}
		d, err := a.Workflows.DescribeWorkflow(ctx, b.WorkflowID, b.RunID)
		var nf *serviceerror.NotFound
		if errors.As(err, &nf) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("sweeper: describe workflow %s: %w", b.WorkflowID, err)
		}
		return d.Status == enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING, nil
	case err != nil && !errors.Is(err, catalog.ErrNotFound) && !catalog.Unusable(err):
		return false, err
	}
	// Unknown to the catalog, or no catalog to ask: Temporal knows.
	return a.workflowRunning(ctx, backupID)
}

// workflowRunning asks Temporal whether a workflow with the backup's
// CbtflowBackupID search attribute runs.
func (a *Sweeper) workflowRunning(ctx context.Context, backupID string) (bool, error) {
	resp, err := a.Workflows.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{
		Namespace: a.Namespace,
		Query:     fmt.Sprintf(`CbtflowBackupID = %q AND ExecutionStatus = "Running"`, backupID),
	})
	if err != nil {
		return false, fmt.Errorf("sweeper: list workflows of backup %s: %w", backupID, err)
	}
	return len(resp.GetExecutions()) > 0, nil
}
