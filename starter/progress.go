package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"
	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/workflows"

	"github.com/cbtflow/cbtflow/internal/units"
)

// pollInterval is how often a watching starter asks for the progress: the
// worker's transfers heartbeat every second, and each query costs the
// worker a workflow task and the server a describe.
const pollInterval = 500 * time.Millisecond

// isTerminal reports whether w is a terminal (where progress bars go).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// runningBackup is a BackupVM workflow found by backup ID or VM.
type runningBackup struct {
	WorkflowID string
	RunID      string
	BackupID   string
	VM         string
	Running    bool
	Started    time.Time
}

// findBackup finds the BackupVM of a backup ID (running or not), or the
// running backup of a VM (by its name, CbtflowVM). Visibility is
// eventually consistent: a backup started a moment ago may need a retry.
func findBackup(ctx context.Context, c client.Client, ns, arg string) (runningBackup, error) {
	if strings.ContainsAny(arg, `'"\`) || strings.TrimSpace(arg) == "" {
		return runningBackup{}, usageError{fmt.Errorf("%q is neither a backup ID nor a VM name", arg)}
	}
	queries := []string{
		fmt.Sprintf("WorkflowType = 'BackupVM' AND CbtflowBackupID = '%s'", arg),
		fmt.Sprintf("WorkflowType = 'BackupVM' AND ExecutionStatus = 'Running' AND CbtflowVM = '%s'", arg),
	}
	for _, q := range queries {
		found, err := listBackups(ctx, c, ns, q)
		if err != nil {
			return runningBackup{}, err
		}
		if len(found) > 0 {
			return found[0], nil
		}
	}
	return runningBackup{}, fmt.Errorf("no backup %s and no running backup of a VM named %s", arg, arg)
}

// listBackups lists the BackupVM workflows matching a visibility query,
// newest first.
func listBackups(ctx context.Context, c client.Client, ns, query string) ([]runningBackup, error) {
	var out []runningBackup
	var token []byte
	for {
		resp, err := c.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{Namespace: ns, Query: query, NextPageToken: token})
		if err != nil {
			return nil, fmt.Errorf("list backups in Temporal: %w", err)
		}
		for _, w := range resp.GetExecutions() {
			b := runningBackup{WorkflowID: w.GetExecution().GetWorkflowId(), RunID: w.GetExecution().GetRunId(),
				Running: w.GetStatus() == enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING, Started: w.GetStartTime().AsTime()}
			if sa := w.GetSearchAttributes().GetIndexedFields(); sa != nil {
				b.BackupID = keyword(sa["CbtflowBackupID"].GetData())
				b.VM = keyword(sa["CbtflowVM"].GetData())
			}
			out = append(out, b)
		}
		if token = resp.GetNextPageToken(); len(token) == 0 {
			return out, nil
		}
	}
}

// keyword decodes a Keyword search attribute's payload (a JSON string).
func keyword(data []byte) string {
	return strings.Trim(string(data), `"`)
}

// queryProgress asks a workflow for its progress query's answer, P:
// workflows.Progress of a backup, RestoreProgress of a restore, and so
// on for each kind of workflow.
func queryProgress[P any](ctx context.Context, c client.Client, wid, runID string) (P, error) {
	var p P
	v, err := c.QueryWorkflow(ctx, wid, runID, workflows.QueryProgress)
	if err != nil {
		return p, err
	}
	err = v.Get(&p)
	return p, err
}

// phaseText says where a backup stands, in an operator's words.
func phaseText(p workflows.Progress) string {
	switch p.Phase {
	case workflows.PhaseSnapshot:
		return "taking the snapshot"
	case workflows.PhaseTransferring:
		querying, verifying := false, false
		for _, d := range p.Disks {
			querying = querying || d.Phase == workflows.DiskQuerying
			verifying = verifying || d.Phase == workflows.DiskVerifying
		}
		switch {
		case verifying:
			return "transferring, verifying the image"
		case querying:
			return "querying CBT"
		}
		return "transferring"
	case workflows.PhaseCommitting, workflows.PhaseCommitted:
		return "committing"
	case workflows.PhaseRemovingSnapshot:
		return "removing the snapshot"
	case workflows.PhaseStarting, workflows.PhasePreparing:
		return "preparing"
	}
	return string(p.Phase)
}

// diskFigures is a disk's bytes, percent, rate and ETA, as a person
// reads them.
func diskFigures(d workflows.DiskProgress) string {
	switch d.Phase {
	case workflows.DiskWaiting, workflows.DiskQuerying:
		if d.Total == 0 {
			return string(d.Phase)
		}
	case workflows.DiskVerifying:
		s := "verifying"
		if d.VerifyTotal > 0 {
			s += fmt.Sprintf(" %s of %s (%.0f%%)", units.Bytes(d.Verified), units.Bytes(d.VerifyTotal), float64(d.Verified)*100/float64(d.VerifyTotal))
		}
		return s + rateETA(d)
	case workflows.DiskDone, workflows.DiskFailed, workflows.DiskCanceled:
		return fmt.Sprintf("%s, %s", d.Phase, units.Bytes(d.Total))
	}
	return fmt.Sprintf("%s of %s (%.0f%%)", units.Bytes(d.Done), units.Bytes(d.Total), d.Percent) + rateETA(d)
}

func rateETA(d workflows.DiskProgress) string {
	s := ""
	if d.Rate > 0 {
		s += fmt.Sprintf(", %s/s", units.Bytes(int64(d.Rate)))
	}
	if d.ETASeconds > 0 {
		s += ", ETA " + units.Seconds(d.ETASeconds)
	}
	return s
}

// follow waits for the BackupVM wid to end and returns its result (the
// error of Get), showing its progress on w meanwhile: bars on a
// terminal; otherwise (plain), one line per phase and, while a disk is
// copied, about every 10 s.
func follow(ctx context.Context, c client.Client, w io.Writer, wid, runID string, bars bool) (workflows.BackupVMResult, error) {
	var res workflows.BackupVMResult
	done := make(chan error, 1)
	go func() { done <- c.GetWorkflow(ctx, wid, runID).Get(ctx, &res) }()
	var v progressView
	if bars {
		v = newBarView(ctx, w)
	} else {
		v = &lineView{w: w}
	}
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	var last workflows.Progress
	for {
		if p, err := queryProgress[workflows.Progress](ctx, c, wid, runID); err == nil {
			last = steady(last, p)
			v.show(last)
		}
		select {
		case err := <-done:
			if err == nil {
				v.show(resultProgress(res))
			}
			v.end(err == nil)
			return res, err
		case <-tick.C:
		}
	}
}

// steady is p, except that a disk being copied keeps the figures of prev
// when p knows fewer bytes done: an answer without the transfers' figures
// (the worker's describe failed or was slow) knows only the phase, and a
// bar must not jump back to zero.
func steady(prev, p workflows.Progress) workflows.Progress {
	old := map[int32]workflows.DiskProgress{}
	for _, d := range prev.Disks {
		old[d.Key] = d
	}
	p.Disks = append([]workflows.DiskProgress(nil), p.Disks...)
	for i, d := range p.Disks {
		o, ok := old[d.Key]
		moving := d.Phase == workflows.DiskTransferring || d.Phase == workflows.DiskVerifying
		if ok && moving && o.Phase == d.Phase || ok && moving && o.Phase == workflows.DiskVerifying {
			if o.Done > d.Done || o.Verified > d.Verified {
				p.Disks[i] = o
			}
		}
	}
	return p
}

// resultProgress is the progress of a completed backup.
func resultProgress(r workflows.BackupVMResult) workflows.Progress {
	p := workflows.Progress{BackupID: r.BackupID, VM: r.VM, Phase: workflows.PhaseCompleted}
	for _, d := range r.Disks {
		p.Disks = append(p.Disks, workflows.DiskProgress{Key: d.Key, Mode: d.Mode, Phase: workflows.DiskDone,
			Done: d.ChangedBytes, Total: d.ChangedBytes, Percent: 100})
	}
	return p
}

// progressView shows a backup's progress as it goes.
type progressView interface {
	show(workflows.Progress)
	end(completed bool)
}

// lineView prints progress as lines, for a log or a pipe.
type lineView struct {
	w        io.Writer
	phase    string
	lastDisk time.Time
	disks    map[int32]workflows.DiskPhase
}

func (v *lineView) show(p workflows.Progress) {
	if v.disks == nil {
		v.disks = map[int32]workflows.DiskPhase{}
	}
	if ph := phaseText(p); ph != v.phase {
		v.phase = ph
		fmt.Fprintf(v.w, "backup %s of VM %s: %s\n", p.BackupID, p.VM, ph)
	}
	periodic := time.Since(v.lastDisk) >= 10*time.Second
	for _, d := range p.Disks {
		changed := v.disks[d.Key] != d.Phase
		v.disks[d.Key] = d.Phase
		if changed || periodic && (d.Phase == workflows.DiskTransferring || d.Phase == workflows.DiskVerifying) {
			fmt.Fprintf(v.w, "  disk %d %s: %s\n", d.Key, d.Mode, diskFigures(d))
			v.lastDisk = time.Now()
		}
	}
}

func (v *lineView) end(bool) {}

// barView draws a headline and one bar per disk (mpb), redrawn in place.
type barView struct {
	p     *mpb.Progress
	mu    sync.Mutex
	last  workflows.Progress
	head  *mpb.Bar
	disks map[int32]*mpb.Bar
	start time.Time
}

func newBarView(ctx context.Context, w io.Writer) *barView {
	v := &barView{p: mpb.NewWithContext(ctx, mpb.WithOutput(w), mpb.WithWidth(100), mpb.WithRefreshRate(200*time.Millisecond)),
		disks: map[int32]*mpb.Bar{}, start: time.Now()}
	v.head = v.p.New(1, mpb.NopStyle(), mpb.PrependDecorators(decor.Any(func(decor.Statistics) string {
		v.mu.Lock()
		defer v.mu.Unlock()
		if v.last.BackupID == "" {
			return "starting the backup…"
		}
		return fmt.Sprintf("backup %s of VM %s: %s (%s)", v.last.BackupID, v.last.VM, phaseText(v.last), units.Duration(time.Since(v.start).Round(time.Second)))
	})))
	return v
}

func (v *barView) show(p workflows.Progress) {
	v.mu.Lock()
	v.last = p
	v.mu.Unlock()
	for _, d := range p.Disks {
		bar, ok := v.disks[d.Key]
		if !ok {
			key := d.Key
			// Total 0 at construction: mpb completes a bar on its own only
			// when current reaches its construction total; this one is
			// completed by show (done) or end.
			bar = v.p.New(0, mpb.BarStyle().Lbound("[").Rbound("]"),
				mpb.PrependDecorators(decor.Any(func(decor.Statistics) string {
					return fmt.Sprintf("  disk %d %-11s", key, v.disk(key).Mode)
				})),
				mpb.AppendDecorators(decor.Any(func(decor.Statistics) string { return " " + diskFigures(v.disk(key)) })))
			v.disks[d.Key] = bar
		}
		if bar.Completed() {
			continue
		}
		if d.Total > 0 {
			bar.SetTotal(d.Total, false)
		}
		bar.SetCurrent(d.Done)
		if d.Phase == workflows.DiskDone {
			bar.SetTotal(max(d.Total, 1), true)
		}
	}
}

// disk is the latest progress of disk key.
func (v *barView) disk(key int32) workflows.DiskProgress {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, d := range v.last.Disks {
		if d.Key == key {
			return d
		}
	}
	return workflows.DiskProgress{Key: key}
}

func (v *barView) end(completed bool) {
	for _, b := range append([]*mpb.Bar{v.head}, barsOf(v.disks)...) {
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

func barsOf(m map[int32]*mpb.Bar) []*mpb.Bar {
	out := make([]*mpb.Bar, 0, len(m))
	for _, b := range m {
		out = append(out, b)
	}
	return out
}
