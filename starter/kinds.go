package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/workflowservice/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/units"
	"github.com/cbtflow/cbtflow/workflows"
)

// workflowKind is a kind of cbtflow workflow, besides the backups, that
// `starter status`, `watch` and `cancel` know: how its running workflows
// are listed and shown, followed, and canceled. A new kind of workflow is
// one more entry of workflowKinds.
type workflowKind struct {
	name         string // what it is called: "restore", "verification"
	kind         string // statusEntry.Kind
	workflowType string
	// byBackupID: watch and cancel also find its running workflow by the
	// backup ID it works on (a restore's), not only by its workflow ID.
	byBackupID bool
	// progress queries a running workflow and puts its answer into en.
	progress func(ctx context.Context, c client.Client, w kindRun, en *statusEntry) error
	// header and row are its table in `starter status`.
	header string
	row    func(en statusEntry) string
	// watch follows w until it ends, then prints its outcome; the error
	// carries the exit code.
	watch func(ctx context.Context, e *env, c client.Client, w kindRun, asJSON bool) error
	// canceled is what cancel prints of w once it ended canceled.
	canceled func(w kindRun) string
}

// kindRun is one workflow of a kind, as visibility lists it.
type kindRun struct {
	runningBackup
	kind *workflowKind
}

// workflowKinds are the kinds status, watch and cancel know besides the
// backups, in the order status shows them.
var workflowKinds = []*workflowKind{
	{
		name: "restore", kind: "restore", workflowType: "Restore", byBackupID: true,
		progress: func(ctx context.Context, c client.Client, w kindRun, en *statusEntry) error {
			p, err := queryProgress[workflows.RestoreProgress](ctx, c, w.WorkflowID, w.RunID)
			en.Restore = &p
			if p.VM != "" {
				en.VM = p.VM
			}
			return err
		},
		header: "RESTORE\tWORKFLOW\tVM\tDISK\tTO\tPHASE\tRUNNING FOR\tPROGRESS",
		row: func(en statusEntry) string {
			p := en.Restore
			return fmt.Sprintf("%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s", en.BackupID, en.WorkflowID, dash(en.VM), p.DiskKey, p.To, restorePhaseText(*p),
				units.Duration(time.Since(en.StartedAt).Round(time.Second)), dash(restoreFigures(p.Done, p.Total, p.Rate, p.ETASeconds)))
		},
		watch: watchRestore,
		canceled: func(w kindRun) string {
			return fmt.Sprintf("restore %s of backup %s canceled: no file was written", w.WorkflowID, w.BackupID)
		},
	},
	{
		name: "verification", kind: "verify", workflowType: "Verify",
		progress: func(ctx context.Context, c client.Client, w kindRun, en *statusEntry) error {
			p, err := queryProgress[workflows.VerifyProgress](ctx, c, w.WorkflowID, w.RunID)
			en.Verify = &p
			return err
		},
		header: "VERIFICATION\tVM\tPHASE\tRUNNING FOR\tPROGRESS",
		row: func(en statusEntry) string {
			return fmt.Sprintf("%s\t%s\t%s\t%s\t%s", en.WorkflowID, dash(en.VM), verifyPhaseText(*en.Verify),
				units.Duration(time.Since(en.StartedAt).Round(time.Second)), verifyFigures(*en.Verify))
		},
		watch:    watchVerify,
		canceled: func(w kindRun) string { return fmt.Sprintf("verification %s canceled", w.WorkflowID) },
	},
	{
		name: "export", kind: "export", workflowType: "Export",
		progress: func(ctx context.Context, c client.Client, w kindRun, en *statusEntry) error {
			p, err := queryProgress[workflows.ExportProgress](ctx, c, w.WorkflowID, w.RunID)
			en.Export = &p
			if p.VM != "" {
				en.VM = p.VM
			}
			return err
		},
		header: "EXPORT\tWORKFLOW\tVM\tDISK\tPHASE\tRUNNING FOR\tURI",
		row: func(en statusEntry) string {
			p := en.Export
			return fmt.Sprintf("%s\t%s\t%s\t%d\t%s\t%s\t%s", en.BackupID, en.WorkflowID, dash(en.VM), p.DiskKey, p.Phase,
				units.Duration(time.Since(en.StartedAt).Round(time.Second)), dash(p.URI))
		},
		watch:    watchExport,
		canceled: func(w kindRun) string { return fmt.Sprintf("export %s of backup %s stopped", w.WorkflowID, w.BackupID) },
	},
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// kindTypes is the visibility query's condition on the kinds' types.
func kindTypes() string {
	var or []string
	for _, k := range workflowKinds {
		or = append(or, fmt.Sprintf("WorkflowType = '%s'", k.workflowType))
	}
	return "(" + strings.Join(or, " OR ") + ")"
}

// listKinds lists the workflows of the kinds that match a visibility
// query (its condition on the types added), newest first.
func listKinds(ctx context.Context, c client.Client, ns, cond string) ([]kindRun, error) {
	byType := map[string]*workflowKind{}
	for _, k := range workflowKinds {
		byType[k.workflowType] = k
	}
	var out []kindRun
	var token []byte
	for {
		resp, err := c.ListWorkflow(ctx, &workflowservice.ListWorkflowExecutionsRequest{Namespace: ns,
			Query: kindTypes() + " AND " + cond, NextPageToken: token})
		if err != nil {
			return nil, fmt.Errorf("list workflows in Temporal: %w", err)
		}
		for _, w := range resp.GetExecutions() {
			k := byType[w.GetType().GetName()]
			if k == nil {
				continue
			}
			r := kindRun{kind: k, runningBackup: runningBackup{WorkflowID: w.GetExecution().GetWorkflowId(), RunID: w.GetExecution().GetRunId(),
				Running: w.GetStatus() == enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING, Started: w.GetStartTime().AsTime()}}
			if sa := w.GetSearchAttributes().GetIndexedFields(); sa != nil {
				r.BackupID = keyword(sa["CbtflowBackupID"].GetData())
				r.VM = keyword(sa["CbtflowVM"].GetData())
			}
			out = append(out, r)
		}
		if token = resp.GetNextPageToken(); len(token) == 0 {
			return out, nil
		}
	}
}

// kindStatus lists the running workflows of the kinds (of VM, when not
// empty), each with its progress, for `starter status`.
func kindStatus(ctx context.Context, c client.Client, ns, vm string) ([]statusEntry, error) {
	cond := "ExecutionStatus = 'Running'"
	if vm != "" {
		cond += fmt.Sprintf(" AND CbtflowVM = '%s'", vm)
	}
	runs, err := listKinds(ctx, c, ns, cond)
	if err != nil {
		return nil, err
	}
	var out []statusEntry
	for _, k := range workflowKinds { // grouped by kind, in the table's order
		for _, w := range runs {
			if w.kind != k {
				continue
			}
			en := statusEntry{Kind: k.kind, WorkflowID: w.WorkflowID, BackupID: w.BackupID, VM: w.VM, StartedAt: w.Started.UTC()}
			qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			if err := k.progress(qctx, c, w, &en); err != nil {
				en.Error = err.Error()
			}
			cancel()
			out = append(out, en)
		}
	}
	return out, nil
}

// printKindStatus prints a table per kind with running workflows, each
// followed by an empty line; nothing when none runs.
func printKindStatus(w io.Writer, entries []statusEntry) error {
	for _, k := range workflowKinds {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		n := 0
		for _, en := range entries {
			if en.Kind != k.kind {
				continue
			}
			if n == 0 {
				fmt.Fprintln(tw, k.header)
			}
			n++
			if en.Error != "" {
				fmt.Fprintf(tw, "%s\t%s\tprogress unknown (%s)\n", en.WorkflowID, dash(en.VM), en.Error)
				continue
			}
			fmt.Fprintln(tw, k.row(en))
		}
		if n == 0 {
			continue
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintln(w)
	}
	return nil
}

// findKind finds the workflow of a kind that arg names for watch and
// cancel: its workflow ID, else the one running workflow of the backup ID
// of a kind found so (byBackupID: a restore of it; not a verification,
// whose backup ID names the backup to watch or cancel). ok is false when
// arg names none (it may name a backup); several running ones are an
// error naming them.
func findKind(ctx context.Context, c client.Client, ns, arg string) (w kindRun, ok bool, err error) {
	if strings.ContainsAny(arg, `'"\`) || strings.TrimSpace(arg) == "" {
		return kindRun{}, false, nil // findBackup says what is wrong
	}
	for _, cond := range []string{
		fmt.Sprintf("WorkflowId = '%s'", arg),
		fmt.Sprintf("ExecutionStatus = 'Running' AND CbtflowBackupID = '%s'", arg),
	} {
		runs, err := listKinds(ctx, c, ns, cond)
		if strings.HasPrefix(cond, "ExecutionStatus") {
			runs = slices.DeleteFunc(runs, func(r kindRun) bool { return !r.kind.byBackupID })
		}
		switch {
		case err != nil:
			return kindRun{}, false, err
		case len(runs) == 1:
			return runs[0], true, nil
		case len(runs) > 1 && strings.HasPrefix(cond, "WorkflowId"):
			return runs[0], true, nil // the newest run of the ID
		case len(runs) > 1:
			var ids []string
			for _, r := range runs {
				ids = append(ids, r.WorkflowID)
			}
			return kindRun{}, false, fmt.Errorf("%d workflows of backup %s run (%s): name one by its workflow ID", len(runs), arg, strings.Join(ids, ", "))
		}
	}
	return kindRun{}, false, nil
}

// cancelKind cancels a running workflow of a kind and waits until it
// ended: 0 canceled, 1 when it was not running or ended otherwise.
func cancelKind(ctx context.Context, e *env, c client.Client, w kindRun) error {
	if !w.Running {
		return exitError{code: 1, err: fmt.Errorf("%s %s is not running (starter watch %s shows how it ended)", w.kind.name, w.WorkflowID, w.WorkflowID)}
	}
	if err := c.CancelWorkflow(ctx, w.WorkflowID, w.RunID); err != nil {
		return fmt.Errorf("cancel %s %s: %w", w.kind.name, w.WorkflowID, err)
	}
	e.log.Info("cancel requested; waiting for it to end", w.kind.kind, w.WorkflowID, "backup", w.BackupID)
	err := c.GetWorkflow(ctx, w.WorkflowID, w.RunID).Get(ctx, nil)
	switch {
	case err != nil && ctx.Err() != nil:
		return exitError{code: exitDetached, err: fmt.Errorf("stopped waiting: the cancel of %s %s is requested; it ends in the background (starter watch %s)", w.kind.name, w.WorkflowID, w.WorkflowID)}
	case isCanceled(err):
		fmt.Fprintln(e.stdout, w.kind.canceled(w))
		return nil
	case err == nil:
		return exitError{code: 1, err: fmt.Errorf("%s %s completed before the cancel reached it", w.kind.name, w.WorkflowID)}
	}
	return exitError{code: 1, err: fmt.Errorf("%s %s ended before the cancel reached it: %s", w.kind.name, w.WorkflowID, failureMessage(err))}
}

// watchRestore follows a Restore: bars on a terminal, a line per phase
// otherwise (nothing with --json), then its outcome: the result (as JSON
// with --json). Exit 0 restored, 1 failed or canceled, 4 interrupted.
func watchRestore(ctx context.Context, e *env, c client.Client, w kindRun, asJSON bool) error {
	var res workflows.RestoreResult
	var err error
	switch {
	case asJSON || !w.Running:
		err = c.GetWorkflow(ctx, w.WorkflowID, w.RunID).Get(ctx, &res)
	case isTerminal(e.stdout):
		res, err = followRestore(ctx, c, e.stdout, w.WorkflowID, w.RunID)
	default:
		err = followLines(ctx, c, e.stdout, w, &res, func(ctx context.Context) (string, error) {
			p, err := queryProgress[workflows.RestoreProgress](ctx, c, w.WorkflowID, w.RunID)
			vm := ""
			if p.VM != "" {
				vm = " of VM " + p.VM
			}
			return fmt.Sprintf("restore of backup %s%s disk %d to %s: %s", p.BackupID, vm, p.DiskKey, p.To, restorePhaseText(p)), err
		})
	}
	switch {
	case err != nil && ctx.Err() != nil:
		return exitError{code: exitDetached, err: fmt.Errorf("stopped watching: restore %s goes on", w.WorkflowID)}
	case isCanceled(err):
		return exitError{code: 1, err: fmt.Errorf("restore %s of backup %s was canceled: no file was written", w.WorkflowID, w.BackupID)}
	case err != nil:
		return exitError{code: 1, err: fmt.Errorf("restore %s of backup %s failed: %s", w.WorkflowID, w.BackupID, failureMessage(err))}
	}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(res)
	}
	fmt.Fprintf(e.stdout, "restored backup %s of VM %s disk %d to %s (%s, %s)\n", res.BackupID, res.VM, res.DiskKey, res.To,
		res.Format, units.Bytes(res.Bytes))
	return nil
}

// watchVerify follows a Verify (a line per disk and stage, not with
// --json), then prints its result as `starter verify` does.
func watchVerify(ctx context.Context, e *env, c client.Client, w kindRun, asJSON bool) error {
	var res workflows.VerifyResult
	var err error
	if asJSON || !w.Running {
		err = c.GetWorkflow(ctx, w.WorkflowID, w.RunID).Get(ctx, &res)
	} else {
		err = followLines(ctx, c, e.stdout, w, &res, func(ctx context.Context) (string, error) {
			p, err := queryProgress[workflows.VerifyProgress](ctx, c, w.WorkflowID, w.RunID)
			return fmt.Sprintf("verification %s: %s", w.WorkflowID, verifyPhaseText(p)), err
		})
	}
	switch {
	case err != nil && ctx.Err() != nil:
		return exitError{code: exitDetached, err: fmt.Errorf("stopped watching: verification %s goes on", w.WorkflowID)}
	case err != nil:
		return exitError{code: 1, err: fmt.Errorf("verify: %s", failureMessage(err))}
	}
	return printVerify(e, res, asJSON)
}

// followLines waits for w to end (the error of Get, its result into res),
// printing line() whenever it changes.
func followLines(ctx context.Context, c client.Client, out io.Writer, w kindRun, res any, line func(context.Context) (string, error)) error {
	done := make(chan error, 1)
	go func() { done <- c.GetWorkflow(ctx, w.WorkflowID, w.RunID).Get(ctx, res) }()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	last := ""
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if l, err := line(qctx); err == nil && l != last {
			fmt.Fprintln(out, l)
			last = l
		}
		cancel()
		select {
		case err := <-done:
			return err
		case <-tick.C:
		}
	}
}

// verifyPhaseText says where a verification stands, in an operator's
// words (the stage, not its bytes: a line per change).
func verifyPhaseText(p workflows.VerifyProgress) string {
	switch p.Phase {
	case workflows.VerifyPlanning:
		return "looking up the restore points"
	case workflows.VerifyVerifying:
		s := fmt.Sprintf("disk %d of restore point %s (%d of %d disks)", p.Key, p.BackupID, p.DisksDone+1, p.Disks)
		switch p.Stage {
		case "checking":
			s += ": checking the chain's images"
		case "reading":
			s += ": re-reading the blocks"
		}
		return s
	case workflows.VerifyCompleted:
		return fmt.Sprintf("completed: %d disks, %d damaged", p.DisksDone, p.Damaged)
	}
	return string(p.Phase)
}

// verifyFigures is the running disk's bytes, percent, rate and ETA.
func verifyFigures(p workflows.VerifyProgress) string {
	if p.Stage == "reading" && p.Total > 0 {
		return restoreFigures(p.Done, p.Total, p.Rate, p.ETASeconds)
	}
	return "-"
}
