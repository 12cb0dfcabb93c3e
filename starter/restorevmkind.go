package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/units"
	"github.com/cbtflow/cbtflow/workflows"
)

// restoreVMKind is the RestoreVM workflow in `starter status`, `watch`
// and `cancel`: found by its workflow ID or the backup ID it restores.
var restoreVMKind = &workflowKind{
	name: "restore into a VM", kind: "restore-vm", workflowType: "RestoreVM", byBackupID: true,
	progress: func(ctx context.Context, c client.Client, w kindRun, en *statusEntry) error {
		p, err := queryProgress[workflows.RestoreVMProgress](ctx, c, w.WorkflowID, w.RunID)
		en.RestoreVM = &p
		if p.VM != "" {
			en.VM = p.VM
		}
		return err
	},
	header: "RESTORE INTO VM\tWORKFLOW\tVM\tPHASE\tSNAPSHOT\tRUNNING FOR\tDISKS",
	row: func(en statusEntry) string {
		p := en.RestoreVM
		return fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s", en.BackupID, en.WorkflowID, dash(en.VM), p.Phase, dash(p.Snapshot),
			units.Duration(time.Since(en.StartedAt).Round(time.Second)), dash(restoreVMDisksText(*p)))
	},
	watch: watchRestoreVM,
	canceled: func(w kindRun) string {
		return fmt.Sprintf("restore %s of backup %s into a VM canceled: its snapshot, if it took one, is kept (starter watch %s names it)",
			w.WorkflowID, w.BackupID, w.WorkflowID)
	},
}

func init() { workflowKinds = append(workflowKinds, restoreVMKind) }

// restoreVMDisksText is each disk's phase, mode and figures, on one line.
func restoreVMDisksText(p workflows.RestoreVMProgress) string {
	var parts []string
	for _, d := range p.Disks {
		s := fmt.Sprintf("%d %s", d.Key, d.Phase)
		if d.Mode != "" {
			s += " (" + d.Mode + ")"
		}
		if f := restoreFigures(d.Done, d.Total, d.Rate, d.ETASeconds); f != "" && d.Phase != "done" {
			s += " " + f
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; ")
}

// watchRestoreVM follows a RestoreVM (a line per change, not with
// --json), then prints its outcome as `restore --to-vm` does. Exit 0
// restored, 1 failed or canceled (the message names the kept snapshot),
// 4 interrupted.
func watchRestoreVM(ctx context.Context, e *env, c client.Client, w kindRun, asJSON bool) error {
	var res workflows.RestoreVMResult
	var err error
	if asJSON || !w.Running {
		err = c.GetWorkflow(ctx, w.WorkflowID, w.RunID).Get(ctx, &res)
	} else {
		err = followLines(ctx, c, e.stdout, w, &res, func(ctx context.Context) (string, error) {
			p, err := queryProgress[workflows.RestoreVMProgress](ctx, c, w.WorkflowID, w.RunID)
			return fmt.Sprintf("restore of backup %s into VM %s: %s %s", p.BackupID, p.VM, p.Phase, restoreVMDisksText(p)), err
		})
	}
	switch {
	case err != nil && ctx.Err() != nil:
		return exitError{code: exitDetached, err: fmt.Errorf("stopped watching: restore %s goes on", w.WorkflowID)}
	case isCanceled(err):
		msg := workflows.RestoreVMCanceledMessage(err)
		if msg == "" {
			msg = "canceled"
		}
		return exitError{code: 1, err: fmt.Errorf("restore %s of backup %s was canceled: %s", w.WorkflowID, w.BackupID, msg)}
	case err != nil:
		return exitError{code: 1, err: fmt.Errorf("restore %s of backup %s failed: %s", w.WorkflowID, w.BackupID, failureMessage(err))}
	}
	out := workflows.RestoreVMReport{Status: "completed", WorkflowID: w.WorkflowID, RestoreID: res.RestoreID, BackupID: res.BackupID,
		VM: res.VM, VMUUID: res.VMUUID, Snapshot: res.Snapshot, SnapshotRef: res.SnapshotRef, Disks: res.Disks, Seconds: res.Seconds}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(out)
	}
	return printRestoreVM(e, out, false)
}
