package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"

	"github.com/cbtflow/cbtflow/internal/units"
)

// findGrace is how long watch and cancel look for a backup: one started
// a moment ago is in Temporal's visibility within a second or two.
const findGrace = 10 * time.Second

// findWithGrace is findBackup, retried for findGrace while nothing is
// found.
func findWithGrace(ctx context.Context, c client.Client, ns, arg string) (runningBackup, error) {
	deadline := time.Now().Add(findGrace)
	for {
		b, err := findBackup(ctx, c, ns, arg)
		var usage usageError
		if err == nil || errors.As(err, &usage) || time.Now().After(deadline) || ctx.Err() != nil {
			return b, err
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func newWatchCmd(e *env) *cobra.Command {
	var cfg config.Config
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "watch (BACKUP_ID | VM | WORKFLOW_ID)",
		Short: "follow a backup (or a restore, a verification) until it ends: progress bars, then its summary",
		Long: `Follow a backup, named by its backup ID or by its VM's name (the VM's
running backup), until it ends: on a terminal a progress bar per disk
(bytes done of bytes to copy, rate, ETA) under the backup's phase,
otherwise one line per phase; then the backup's summary, as
` + "`starter backup --wait`" + ` prints it (with --json, only the summary, as one JSON
object). A backup that ended already is summarized at once.

A restore or a verification is followed the same way, named by its
workflow ID (as ` + "`starter status`" + ` lists it), or a restore by its
backup ID while it runs: the restore's bars (verifying, writing), then
where the file was written (--json: the Restore's result); a
verification's disks, then its result as ` + "`starter verify`" + ` prints it.

Exit codes: 0 completed, 1 failed or canceled (or not found), 2 bad usage,
4 interrupted (Ctrl-C): the backup goes on.`,
		Args: exactArgs(1, "a backup ID or a VM name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return watchRun(cmd.Context(), e, &cfg, args[0], asJSON)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print only the summary, as one JSON object (as backup --json)")
	return cmd
}

func watchRun(ctx context.Context, e *env, cfg *config.Config, arg string, asJSON bool) error {
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	if w, ok, err := findKind(ctx, c, cfg.Namespace, arg); err != nil {
		return err
	} else if ok {
		return w.kind.watch(ctx, e, c, w, asJSON)
	}
	b, err := findWithGrace(ctx, c, cfg.Namespace, arg)
	if err != nil {
		return err
	}
	out := workflows.BackupReport{BackupID: b.BackupID, VM: b.VM, WorkflowID: b.WorkflowID, Status: workflows.ReportRunning, Disks: []workflows.DiskResult{}}
	var res workflows.BackupVMResult
	if asJSON {
		err = c.GetWorkflow(ctx, b.WorkflowID, b.RunID).Get(ctx, &res)
	} else {
		res, err = follow(ctx, c, e.stdout, b.WorkflowID, b.RunID, isTerminal(e.stdout))
	}
	if err != nil && ctx.Err() != nil {
		return exitError{code: exitDetached, err: fmt.Errorf("stopped watching: backup %s of VM %s goes on (workflow %s)", b.BackupID, b.VM, b.WorkflowID)}
	}
	if err == nil {
		out.VMUUID = res.VMUUID
	}
	return finish(e, out, res, err, asJSON)
}

func newCancelCmd(e *env) *cobra.Command {
	var cfg config.Config
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "cancel (BACKUP_ID | VM | WORKFLOW_ID)",
		Short: "cancel a running backup: its snapshot is removed, nothing is committed",
		Long: `Cancel a running backup, named by its backup ID or by its VM's name, and
wait until it has cleaned up: the transfers stop, the partial images are
removed, the snapshot is removed from the VM, and no restore point is
committed (the VM's previous restore points and change IDs stay as they
were, so its next backup is correct). A backup that committed before the
cancel reached it stays committed: the exit code says so.

A running restore (by its workflow ID, or its backup ID) or verification
(by its workflow ID) is canceled the same way: a restore's temporary file
is removed before it ends, and no file is written.

Exit codes: 0 canceled, 1 not running or it ended otherwise, 2 bad usage,
4 interrupted while waiting (the cancel was requested all the same).`,
		Args: exactArgs(1, "a backup ID or a VM name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return cancelRun(cmd.Context(), e, &cfg, args[0], asJSON)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the backup's outcome as one JSON object (as backup --json)")
	return cmd
}

func cancelRun(ctx context.Context, e *env, cfg *config.Config, arg string, asJSON bool) error {
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	if w, ok, err := findKind(ctx, c, cfg.Namespace, arg); err != nil {
		return err
	} else if ok {
		return cancelKind(ctx, e, c, w)
	}
	b, err := findWithGrace(ctx, c, cfg.Namespace, arg)
	if err != nil {
		return err
	}
	if !b.Running {
		return exitError{code: 1, err: fmt.Errorf("backup %s of VM %s is not running (starter watch %s shows how it ended)", b.BackupID, b.VM, b.BackupID)}
	}
	if err := c.CancelWorkflow(ctx, b.WorkflowID, b.RunID); err != nil {
		return fmt.Errorf("cancel backup %s: %w", b.BackupID, err)
	}
	e.log.Info("cancel requested; waiting for the backup to clean up", "backup", b.BackupID, "vm", b.VM, "workflow", b.WorkflowID)
	var res workflows.BackupVMResult
	err = c.GetWorkflow(ctx, b.WorkflowID, b.RunID).Get(ctx, &res)
	if err != nil && ctx.Err() != nil {
		return exitError{code: exitDetached, err: fmt.Errorf("stopped waiting: the cancel of backup %s is requested; it cleans up in the background (starter watch %s)", b.BackupID, b.BackupID)}
	}
	out := workflows.BackupReport{BackupID: b.BackupID, VM: b.VM, WorkflowID: b.WorkflowID, Disks: []workflows.DiskResult{}}
	if isCanceled(err) {
		out.Status, out.Error = workflows.ReportCanceled, "canceled: nothing was committed, and the backup's snapshot was removed"
		if asJSON {
			return printBackup(e, out, true)
		}
		fmt.Fprintf(e.stdout, "backup %s of VM %s canceled: nothing was committed; its snapshot and partial images were removed\n", b.BackupID, b.VM)
		return nil
	}
	// It ended otherwise: committed before the cancel reached it, or
	// failed.
	if ferr := finish(e, out, res, err, asJSON); ferr != nil {
		return ferr
	}
	return exitError{code: 1, err: fmt.Errorf("backup %s of VM %s completed before the cancel reached it: its restore point is committed", b.BackupID, b.VM)}
}

// statusEntry is one running workflow of `starter status --json`: a
// backup (Kind "backup", Progress), or one of workflowKinds (kinds.go).
type statusEntry struct {
	Kind       string             `json:"kind"`
	WorkflowID string             `json:"workflow_id"`
	BackupID   string             `json:"backup_id"`
	VM         string             `json:"vm"`
	StartedAt  time.Time          `json:"started_at"`
	Progress   workflows.Progress `json:"progress"`
	// Restore is a running restore's progress (Kind "restore").
	Restore *workflows.RestoreProgress `json:"restore,omitempty"`
	// RestoreVM is a running restore into a VM's progress (Kind
	// "restore-vm").
	RestoreVM *workflows.RestoreVMProgress `json:"restore_vm,omitempty"`
	// Verify is a running verification's progress (Kind "verify").
	Verify *workflows.VerifyProgress `json:"verify,omitempty"`
	// Export is a running export's progress, its URI (Kind "export").
	Export *workflows.ExportProgress `json:"export,omitempty"`
	// Error says why the progress is unknown (the query failed).
	Error string `json:"error,omitempty"`
}

func newStatusCmd(e *env) *cobra.Command {
	var cfg config.Config
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status [VM]",
		Short: "list the running backups, restores, verifications and exports (of one VM) with their phase and progress",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm := ""
			if len(args) == 1 {
				vm = args[0]
			}
			return statusRun(cmd.Context(), e, &cfg, vm, asJSON)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON array")
	return cmd
}

func statusRun(ctx context.Context, e *env, cfg *config.Config, vm string, asJSON bool) error {
	if strings.ContainsAny(vm, `'"\`) {
		return usageError{fmt.Errorf("status: %q is not a VM name", vm)}
	}
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	q := "WorkflowType = 'BackupVM' AND ExecutionStatus = 'Running'"
	if vm != "" {
		q += fmt.Sprintf(" AND CbtflowVM = '%s'", vm)
	}
	found, err := listBackups(ctx, c, cfg.Namespace, q)
	if err != nil {
		return err
	}
	entries := []statusEntry{}
	for _, b := range found {
		en := statusEntry{Kind: "backup", WorkflowID: b.WorkflowID, BackupID: b.BackupID, VM: b.VM, StartedAt: b.Started.UTC()}
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		en.Progress, err = queryProgress[workflows.Progress](qctx, c, b.WorkflowID, b.RunID)
		cancel()
		if err != nil {
			en.Error = err.Error()
		}
		entries = append(entries, en)
	}
	// Restores and verifications (workflowKinds), listed and shown apart.
	running, err := kindStatus(ctx, c, cfg.Namespace, vm)
	if err != nil {
		return err
	}
	if asJSON {
		entries = append(entries, running...)
		return json.NewEncoder(e.stdout).Encode(entries)
	}
	if err := printKindStatus(e.stdout, running); err != nil {
		return err
	}
	if len(entries) == 0 {
		if vm != "" {
			fmt.Fprintf(e.stdout, "no backup of VM %s is running\n", vm)
		} else {
			fmt.Fprintln(e.stdout, "no backup is running")
		}
		return nil
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKUP\tVM\tPHASE\tRUNNING FOR\tPROGRESS")
	for _, en := range entries {
		phase := phaseText(en.Progress)
		if en.Error != "" {
			phase = "unknown (" + en.Error + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", en.BackupID, en.VM, phase,
			units.Duration(time.Since(en.StartedAt).Round(time.Second)), overall(en.Progress))
		for _, d := range en.Progress.Disks {
			fmt.Fprintf(tw, "  disk %d\t%s\t%s\t\t%s\n", d.Key, d.Mode, d.Phase, diskFigures(d))
		}
	}
	return tw.Flush()
}

// overall is a backup's bytes done of bytes to copy, over its disks.
func overall(p workflows.Progress) string {
	var done, total int64
	for _, d := range p.Disks {
		done, total = done+d.Done, total+d.Total
	}
	if total == 0 {
		return "-"
	}
	return fmt.Sprintf("%s of %s (%.0f%%)", units.Bytes(done), units.Bytes(total), float64(done)*100/float64(total))
}
