package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/units"
	"github.com/cbtflow/cbtflow/workflows"
)

// restoreVMRun runs `restore BACKUP_ID --to-vm VM`: the RestoreVM
// workflow, waited for (unless --wait=false). Interrupted, it leaves the
// restore running (exit 4): canceling a restore halfway would leave a
// partly written VM to revert.
func restoreVMRun(ctx context.Context, e *env, cfg *config.Config, backupID string, o restoreOptions) error {
	in := workflows.RestoreVMInput{BackupID: backupID, VM: o.toVM, Profile: o.profile, NewVM: o.newVM}
	switch {
	case o.to != "" || o.toDevice != "":
		return usageError{errors.New("restore: --to-vm writes into a VM: not with --to or --to-device")}
	case o.local || o.force:
		return usageError{errors.New("restore: --local and --force are for --to FILE, not --to-vm")}
	case o.newVM != "" && o.toVM == "":
		return usageError{errors.New("restore: --new-vm NAME needs --to-vm VM, the VM whose place the new one takes")}
	}
	if o.disk != "" {
		key, err := strconv.ParseInt(o.disk, 10, 32)
		if err != nil || key == 0 {
			return usageError{fmt.Errorf("restore: --disk %q is not a device key", o.disk)}
		}
		in.DiskKey = int32(key)
	}
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	wid := fmt.Sprintf("restore-vm/%s/%s", backupID, randomID())
	out := workflows.RestoreVMReport{Status: "running", WorkflowID: wid, BackupID: backupID, VM: o.toVM, Disks: []activities.WriteVMDiskResult{}}
	run, err := c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: wid, TaskQueue: workflows.TaskQueue}, workflows.RestoreVM, in)
	if err != nil {
		return fmt.Errorf("restore: start: %w", err)
	}
	e.log.Info("restore into VM started", "backup", backupID, "vm", o.toVM, "workflow", wid)
	if !o.wait {
		return printRestoreVM(e, out, o.asJSON)
	}
	var res workflows.RestoreVMResult
	if isTerminal(e.stdout) && !o.asJSON {
		res, err = followRestoreVM(ctx, c, e.stderr, wid, run.GetRunID())
	} else {
		err = run.Get(ctx, &res)
	}
	if err != nil && ctx.Err() != nil {
		_ = printRestoreVM(e, out, o.asJSON)
		return exitError{code: exitDetached, err: fmt.Errorf(
			"interrupted: the restore of backup %s into VM %s goes on in the background (workflow %s); the starter did not cancel it (a cancel keeps the restore's snapshot for a revert: temporal workflow cancel --workflow-id %s)",
			backupID, o.toVM, wid, shellQuote(wid))}
	}
	if err != nil {
		out.Status, out.Error = "failed", failureMessage(err)
		if isCanceled(err) {
			out.Status, out.Error = "canceled", workflows.RestoreVMCanceledMessage(err)
			if out.Error == "" {
				out.Error = fmt.Sprintf("the restore of backup %s into VM %s was canceled", backupID, o.toVM)
			}
		}
		_ = printRestoreVM(e, out, o.asJSON)
		return exitError{code: 1, err: errors.New(out.Error), quiet: o.asJSON}
	}
	out = workflows.RestoreVMReport{Status: "completed", WorkflowID: wid, RestoreID: res.RestoreID, BackupID: res.BackupID, VM: res.VM,
		VMUUID: res.VMUUID, Snapshot: res.Snapshot, SnapshotRef: res.SnapshotRef, Disks: res.Disks, Seconds: res.Seconds}
	if out.Disks == nil {
		out.Disks = []activities.WriteVMDiskResult{}
	}
	return printRestoreVM(e, out, o.asJSON)
}

// printRestoreVM prints the report: with --json one JSON object
// (workflows.RestoreVMReport), else lines for a person.
func printRestoreVM(e *env, out workflows.RestoreVMReport, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(out)
	}
	fmt.Fprintf(e.stdout, "restore of backup %s into VM %s: %s (workflow %s)\n", out.BackupID, out.VM, out.Status, out.WorkflowID)
	if out.Error != "" {
		fmt.Fprintf(e.stdout, "error: %s\n", out.Error)
	}
	for _, d := range out.Disks {
		fmt.Fprintf(e.stdout, "  disk %d %-15s written %s, zeroed %s of %s, %s\n    why: %s\n", d.Key, d.Mode,
			units.Bytes(d.WrittenBytes), units.Bytes(d.ZeroedBytes), units.Bytes(d.DifferingBytes), units.Seconds(d.Seconds), d.Why)
	}
	if out.Status == "completed" {
		fmt.Fprintf(e.stdout, "snapshot %s (%s) removed; the next backup of the VM is full\n", out.Snapshot, out.SnapshotRef)
	}
	return nil
}

// queryRestoreVMProgress asks a RestoreVM workflow for its progress.
func queryRestoreVMProgress(ctx context.Context, c client.Client, wid, runID string) (workflows.RestoreVMProgress, error) {
	v, err := c.QueryWorkflow(ctx, wid, runID, workflows.QueryProgress)
	if err != nil {
		return workflows.RestoreVMProgress{}, err
	}
	var p workflows.RestoreVMProgress
	err = v.Get(&p)
	return p, err
}

// followRestoreVM waits for the RestoreVM wid and returns its result,
// writing a line to w (a terminal) whenever the phase or a disk's stage
// changes, and each disk's figures every few seconds.
func followRestoreVM(ctx context.Context, c client.Client, w io.Writer, wid, runID string) (workflows.RestoreVMResult, error) {
	var res workflows.RestoreVMResult
	done := make(chan error, 1)
	go func() { done <- c.GetWorkflow(ctx, wid, runID).Get(ctx, &res) }()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	last, lastFigures := "", time.Time{}
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if p, err := queryRestoreVMProgress(qctx, c, wid, runID); err == nil {
			line := fmt.Sprintf("restore of backup %s into VM %s: %s", p.BackupID, p.VM, p.Phase)
			if p.Snapshot != "" {
				line += fmt.Sprintf(" (snapshot %s, %s)", p.Snapshot, p.SnapshotRef)
			}
			for _, d := range p.Disks {
				line += fmt.Sprintf("\n  disk %d %s %s", d.Key, d.Phase, d.Mode)
			}
			if line != last || time.Since(lastFigures) > 3*time.Second {
				fmt.Fprintln(w, line)
				for _, d := range p.Disks {
					if d.Phase == "verifying" || d.Phase == "writing" {
						fmt.Fprintf(w, "  disk %d %s\n", d.Key, restoreFigures(d.Done, d.Total, d.Rate, d.ETASeconds))
					}
				}
				last, lastFigures = line, time.Now()
			}
		}
		cancel()
		select {
		case err := <-done:
			return res, err
		case <-tick.C:
		}
	}
}
