package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
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
		return usageError{errors.New("restore: --new-vm NAME needs --to-vm VM, the VM beside which the new one is made")}
	case o.newVM != "" && o.disk != "":
		return usageError{errors.New("restore: --new-vm restores every disk of the point: not with --disk")}
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
		res, err = followRestoreVM(ctx, c, e.stdout, wid, run.GetRunID())
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

// followRestoreVM waits for the RestoreVM wid and returns its result,
// drawing its progress on w (a terminal) meanwhile: a headline with the
// phase and the snapshot, then a bar per disk (its stage, mode, bytes of
// the areas to write, rate, ETA), as `restore --to` draws its bars.
func followRestoreVM(ctx context.Context, c client.Client, w io.Writer, wid, runID string) (workflows.RestoreVMResult, error) {
	return followWorkflow(ctx, c, wid, runID, newRestoreVMBarView(ctx, w))
}

// restoreVMDisk is what a disk's bar shows: its latest figures.
type restoreVMDisk struct {
	workflows.RestoreVMDiskProgress
	bar *mpb.Bar
}

// restoreVMBarView draws a restore into a VM: a headline, then a bar per
// disk once the plan names them (mpb, redrawn in place). A bar never
// goes back: an answer without the write's figures keeps the last ones.
type restoreVMBarView struct {
	p     *mpb.Progress
	mu    sync.Mutex
	last  workflows.RestoreVMProgress
	disks map[int32]*restoreVMDisk
	order []int32
	head  *mpb.Bar
	start time.Time
}

func newRestoreVMBarView(ctx context.Context, w io.Writer) *restoreVMBarView {
	v := &restoreVMBarView{p: mpb.NewWithContext(ctx, mpb.WithOutput(w), mpb.WithWidth(100), mpb.WithRefreshRate(200*time.Millisecond)),
		disks: map[int32]*restoreVMDisk{}, start: time.Now()}
	v.head = v.p.New(1, mpb.NopStyle(), mpb.PrependDecorators(decor.Any(func(decor.Statistics) string {
		v.mu.Lock()
		defer v.mu.Unlock()
		if v.last.BackupID == "" {
			return "starting the restore into the VM…"
		}
		snap := ""
		if v.last.Snapshot != "" {
			snap = fmt.Sprintf(", snapshot %s (%s)", v.last.Snapshot, v.last.SnapshotRef)
		}
		return fmt.Sprintf("restore of backup %s into VM %s: %s%s (%s)", v.last.BackupID, v.last.VM, v.last.Phase, snap,
			units.Duration(time.Since(v.start).Round(time.Second)))
	})))
	return v
}

func (v *restoreVMBarView) show(p workflows.RestoreVMProgress) {
	v.mu.Lock()
	v.last = p
	for _, d := range p.Disks {
		st := v.disks[d.Key]
		if st == nil {
			key := d.Key
			st = &restoreVMDisk{RestoreVMDiskProgress: d}
			st.bar = v.p.New(0, mpb.BarStyle().Lbound("[").Rbound("]"),
				mpb.PrependDecorators(decor.Any(func(decor.Statistics) string { return fmt.Sprintf("  disk %-6d", key) })),
				mpb.AppendDecorators(decor.Any(func(decor.Statistics) string {
					v.mu.Lock()
					defer v.mu.Unlock()
					s := v.disks[key]
					text := " " + s.Phase
					if s.Mode != "" {
						text += " (" + s.Mode + ")"
					}
					if f := restoreFigures(s.Done, s.Total, s.Rate, s.ETASeconds); f != "" {
						text += ", " + f
					}
					return text
				})))
			v.disks[key], v.order = st, append(v.order, key)
		}
		stageChanged := d.Phase != st.Phase
		if stageChanged || d.Done >= st.Done || d.Phase == "done" {
			bar := st.bar
			st.RestoreVMDiskProgress = d
			st.bar = bar
		}
	}
	type update struct {
		bar         *mpb.Bar
		done, total int64
		finished    bool
	}
	var ups []update
	for _, k := range v.order {
		st := v.disks[k]
		ups = append(ups, update{st.bar, st.Done, st.Total, st.Phase == "done"})
	}
	v.mu.Unlock()
	for _, u := range ups {
		if u.bar.Completed() {
			continue
		}
		if u.total > 0 {
			u.bar.SetTotal(u.total, false)
		}
		u.bar.SetCurrent(u.done)
		if u.finished {
			u.bar.SetTotal(max(u.total, 1), true)
		}
	}
}

// end completes the bars with the completed restore's result or, when
// the restore did not complete, leaves them where they stood.
func (v *restoreVMBarView) end(completed bool, res workflows.RestoreVMResult) {
	if completed {
		p := v.last
		p.Phase, p.BackupID, p.VM, p.Snapshot, p.SnapshotRef = workflows.RestoreVMCompleted, res.BackupID, res.VM, res.Snapshot, res.SnapshotRef
		p.Disks = nil
		for _, d := range res.Disks {
			p.Disks = append(p.Disks, workflows.RestoreVMDiskProgress{Key: d.Key, Phase: "done", Mode: d.Mode,
				Done: d.DifferingBytes, Total: d.DifferingBytes, Percent: 100})
		}
		v.show(p)
	}
	bars := []*mpb.Bar{v.head}
	v.mu.Lock()
	for _, k := range v.order {
		bars = append(bars, v.disks[k].bar)
	}
	v.mu.Unlock()
	for _, b := range bars {
		if !b.Completed() {
			if completed {
				b.SetTotal(-1, true)
			} else {
				b.Abort(false)
			}
		}
	}
	v.p.Wait()
}
