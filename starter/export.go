package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"
)

// exportPoll is how often the starter asks a starting export for its URI.
const exportPoll = 300 * time.Millisecond

// exportJSON is what `starter export --json` prints, one object: the
// export's workflow and what it serves.
type exportJSON struct {
	WorkflowID string    `json:"workflow_id"`
	RunID      string    `json:"run_id"`
	BackupID   string    `json:"backup_id"`
	VM         string    `json:"vm"`
	DiskKey    int32     `json:"disk_key"`
	URI        string    `json:"uri"`
	Address    string    `json:"address"`
	Images     []string  `json:"images"`
	Since      time.Time `json:"since"`
	Capacity   int64     `json:"capacity_bytes"`
}

type exportOptions struct {
	disk, listen   string
	asJSON, detach bool
}

func newExportCmd(e *env) *cobra.Command {
	var cfg config.Config
	var o exportOptions
	cmd := &cobra.Command{
		Use:   "export BACKUP_ID --disk KEY [--listen HOST:PORT] [--json] [--detach]",
		Short: "serve a restore point's disk read-only over NBD (instant access)",
		Long: `Serve one disk of a restore point read-only over NBD, without copying it:
the worker that owns the repository runs qemu-nbd on the point's QCOW2
chain as it is. The starter prints the NBD URI (one line, or one JSON
object with --json) once it serves, and keeps the export running until
Ctrl-C (or SIGTERM), which stops it; --detach returns at once and leaves
it running until ` + "`starter export stop`" + `.

Read the disk with any NBD client, e.g.
  nbdcopy nbd://HOST:PORT disk.raw
  qemu-img convert -O qcow2 nbd://HOST:PORT disk.qcow2
  nbdfuse, or a hypervisor that boots from NBD.

--listen is HOST:PORT on the worker's machine (default 127.0.0.1 on a free
port; port 0 picks a free one). 0.0.0.0, or no host (:PORT), serves
every interface, and the URI then names the worker's host name. The export has no authentication:
listen where only trusted clients reach it.

While it runs, no prune removes or rewrites the exported point or any
point its chain builds on: a prune keeps them (rule "exported") and goes
on with the others. ` + "`starter status`" + ` lists running exports. One export of a
disk of a point at a time: a second is refused (exit 3) and names the
running one's URI.

Exit codes: 0 the export ran and was stopped (or --detach: it runs),
1 it could not start or failed, 2 bad usage, 3 already exported.`,
		Example: `  starter export 20261203T141029Z-1e3e829ce7ae --disk 204
  starter export 20261203T141029Z-1e3e829ce7ae --disk 204 --listen 0.0.0.0:10809 --detach
  starter export stop 20261203T141029Z-1e3e829ce7ae --disk 204`,
		Args: exactArgs(1, "exactly one backup ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return exportRun(cmd.Context(), e, &cfg, args[0], o)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	fs := cmd.Flags()
	fs.StringVar(&o.disk, "disk", "", "device `key` of the disk (e.g. 204)")
	fs.StringVar(&o.listen, "listen", "", "`HOST:PORT` qemu-nbd listens on, on the worker's machine (default 127.0.0.1, a free port)")
	fs.BoolVar(&o.asJSON, "json", false, "print the export as one JSON object")
	fs.BoolVar(&o.detach, "detach", false, "return once the export serves, leaving it running (starter export stop ends it)")
	// The group's default would take a bad flag for an unknown command.
	cmd.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%s%w", prefix(cmd), err)}
	})
	cmd.AddCommand(newExportStopCmd(e))
	return cmd
}

func exportRun(ctx context.Context, e *env, cfg *config.Config, backupID string, o exportOptions) error {
	key, err := strconv.ParseInt(o.disk, 10, 32)
	if err != nil {
		return usageError{fmt.Errorf("export: --disk %q is not a device key", o.disk)}
	}
	if o.listen != "" {
		_, port, err := net.SplitHostPort(o.listen)
		if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 0 || n > 65535 {
			return usageError{fmt.Errorf("export: --listen %q is not HOST:PORT", o.listen)}
		}
	}
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	in := workflows.ExportInput{BackupID: backupID, DiskKey: int32(key), Listen: o.listen}
	wid := workflows.ExportWorkflowID(backupID, int32(key))
	run, err := c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: wid, TaskQueue: workflows.TaskQueue,
		WorkflowIDConflictPolicy: enumspb.WORKFLOW_ID_CONFLICT_POLICY_FAIL,
		WorkflowIDReusePolicy:    enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
		// One export of a disk of a point at a time: a second start is
		// an error, not the running export's handle (whose starter's
		// Ctrl-C would stop it under the first's feet).
		WorkflowExecutionErrorWhenAlreadyStarted: true,
	}, workflows.Export, in)
	var started *serviceerror.WorkflowExecutionAlreadyStarted
	if errors.As(err, &started) {
		msg := fmt.Sprintf("export: restore point %s disk %d is already exported (workflow %s)", backupID, key, wid)
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if p, qerr := queryProgress[workflows.ExportProgress](qctx, c, wid, ""); qerr == nil && p.URI != "" {
			msg = fmt.Sprintf("export: restore point %s disk %d is already exported at %s (workflow %s)", backupID, key, p.URI, wid)
		}
		cancel()
		return exitError{code: exitAlreadyRunning, err: fmt.Errorf("%s; starter export stop %s --disk %d ends it", msg, backupID, key)}
	}
	if err != nil {
		return fmt.Errorf("export: start: %w", err)
	}
	e.log.Info("export started", "backup", backupID, "disk", key, "workflow", wid)
	p, err := waitServing(ctx, e, c, wid, run.GetRunID())
	if err != nil {
		if ctx.Err() != nil {
			return stopExport(e, c, wid, run.GetRunID(), in, "interrupted before it served: ")
		}
		return err
	}
	if o.asJSON {
		out := exportJSON{WorkflowID: wid, RunID: run.GetRunID(), BackupID: backupID, VM: p.VM, DiskKey: int32(key),
			URI: p.URI, Address: p.Address, Images: p.Images, Since: p.Since, Capacity: p.Capacity}
		if err := json.NewEncoder(e.stdout).Encode(out); err != nil {
			return err
		}
	} else {
		fmt.Fprintln(e.stdout, p.URI)
	}
	if o.detach {
		e.log.Info("export serving; it goes on until stopped", "uri", p.URI, "workflow", wid,
			"stop", fmt.Sprintf("starter export stop %s --disk %d", backupID, key))
		return nil
	}
	e.log.Info("export serving until Ctrl-C", "uri", p.URI, "vm", p.VM, "images", len(p.Images), "workflow", wid)
	err = c.GetWorkflow(ctx, wid, run.GetRunID()).Get(ctx, nil)
	switch {
	case err != nil && ctx.Err() != nil:
		return stopExport(e, c, wid, run.GetRunID(), in, "")
	case isCanceled(err):
		e.log.Info("export stopped (starter export stop, or a cancel in Temporal)", "backup", backupID, "disk", key, "workflow", wid)
		return nil
	case err != nil:
		return fmt.Errorf("export: %s", failureMessage(err))
	}
	return nil
}

// waitServing polls the export's progress until it serves (its URI), or
// its workflow ended (the error says why). A wait for a prune's merge is
// logged once, and so is each failure of an attempt that is retried
// (e.g. qemu-nbd cannot listen on the address: the port is taken), which
// would otherwise show only when the retries are spent, minutes later.
func waitServing(ctx context.Context, e *env, c client.Client, wid, runID string) (workflows.ExportProgress, error) {
	noted, failed := "", ""
	for {
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		p, err := queryProgress[workflows.ExportProgress](qctx, c, wid, runID)
		cancel()
		if err == nil && p.Phase == workflows.ExportServing && p.URI != "" {
			return p, nil
		}
		if err == nil && p.Phase == workflows.ExportWaiting && p.Note != noted {
			noted = p.Note
			e.log.Info("export waiting", "why", p.Note)
		}
		desc, derr := c.DescribeWorkflow(ctx, wid, runID)
		if derr == nil {
			for _, pa := range desc.RawResponse.GetPendingActivities() {
				if msg := pa.GetLastFailure().GetMessage(); msg != "" && msg != failed {
					failed = msg
					e.log.Warn("export: an attempt failed; it is retried", "activity", pa.GetActivityType().GetName(),
						"attempt", pa.GetAttempt(), "error", msg)
				}
			}
		}
		if derr == nil && desc.RawResponse.GetWorkflowExecutionInfo().GetStatus() != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
			werr := c.GetWorkflow(ctx, wid, runID).Get(ctx, nil)
			if werr == nil {
				werr = errors.New("ended before it served")
			}
			return p, fmt.Errorf("export: %s", failureMessage(werr))
		}
		select {
		case <-ctx.Done():
			return p, ctx.Err()
		case <-time.After(exportPoll):
		}
	}
}

// stopExport cancels an export whose starter was interrupted and waits
// (cancelGrace) for qemu-nbd to stop and the lease to go.
func stopExport(e *env, c client.Client, wid, runID string, in workflows.ExportInput, how string) error {
	ctx, cancel := context.WithTimeout(context.Background(), cancelGrace)
	defer cancel()
	if err := c.CancelWorkflow(ctx, wid, runID); err != nil {
		return fmt.Errorf("export: %sthe cancel of export %s failed: %w; starter export stop %s --disk %d ends it", how, wid, err, in.BackupID, in.DiskKey)
	}
	err := c.GetWorkflow(ctx, wid, runID).Get(ctx, nil)
	switch {
	case isCanceled(err):
		e.log.Info("export stopped", "backup", in.BackupID, "disk", in.DiskKey, "workflow", wid)
		if how != "" {
			return fmt.Errorf("export: %sthe export of %s disk %d was stopped", how, in.BackupID, in.DiskKey)
		}
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("export: %sthe stop of export %s is requested; it ends in the background", how, wid)
	case err != nil:
		return fmt.Errorf("export: %s%s", how, failureMessage(err))
	}
	return nil
}

func newExportStopCmd(e *env) *cobra.Command {
	var cfg config.Config
	var disk string
	cmd := &cobra.Command{
		Use:   "stop (BACKUP_ID --disk KEY | WORKFLOW_ID)",
		Short: "stop a running export",
		Long: `Stop a running export, named by its restore point and disk or by its
workflow ID (export/BACKUP_ID/KEY), and wait until it has stopped:
qemu-nbd ends (its clients are disconnected) and its lease goes, so a
prune may remove the point again.

Exit codes: 0 stopped, 1 no such export is running, 2 bad usage.`,
		Args: exactArgs(1, "a backup ID (with --disk) or an export's workflow ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return exportStopRun(cmd.Context(), e, &cfg, args[0], disk)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	cmd.Flags().StringVar(&disk, "disk", "", "device `key` of the exported disk")
	return cmd
}

func exportStopRun(ctx context.Context, e *env, cfg *config.Config, arg, disk string) error {
	wid := arg
	switch {
	case disk != "":
		key, err := strconv.ParseInt(disk, 10, 32)
		if err != nil {
			return usageError{fmt.Errorf("export stop: --disk %q is not a device key", disk)}
		}
		wid = workflows.ExportWorkflowID(arg, int32(key))
	case !strings.HasPrefix(arg, "export/"):
		return usageError{fmt.Errorf("export stop: give --disk KEY with backup ID %s, or the export's workflow ID (export/BACKUP_ID/KEY)", arg)}
	}
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	desc, err := c.DescribeWorkflow(ctx, wid, "")
	var nf *serviceerror.NotFound
	if errors.As(err, &nf) || err == nil && desc.RawResponse.GetWorkflowExecutionInfo().GetStatus() != enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING {
		return fmt.Errorf("export stop: no export %s is running", wid)
	}
	if err != nil {
		return fmt.Errorf("export stop: %w", err)
	}
	runID := desc.RawResponse.GetWorkflowExecutionInfo().GetExecution().GetRunId()
	if err := c.CancelWorkflow(ctx, wid, runID); err != nil {
		return fmt.Errorf("export stop %s: %w", wid, err)
	}
	err = c.GetWorkflow(ctx, wid, runID).Get(ctx, nil)
	switch {
	case err != nil && ctx.Err() != nil:
		return exitError{code: exitDetached, err: fmt.Errorf("export stop: stopped waiting: the stop of %s is requested; it ends in the background", wid)}
	case err == nil || isCanceled(err):
		fmt.Fprintf(e.stdout, "export %s stopped\n", wid)
		return nil
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		return fmt.Errorf("export stop: %s ended failed: %s", wid, app.Message())
	}
	return fmt.Errorf("export stop: %s ended: %v", wid, err)
}

// watchExport follows an export until it ends (a line whenever its phase
// or URI changes; nothing with --json): exit 0 when it was stopped, 1
// when it failed, 4 when interrupted (the export goes on).
func watchExport(ctx context.Context, e *env, c client.Client, w kindRun, asJSON bool) error {
	var err error
	if asJSON || !w.Running {
		err = c.GetWorkflow(ctx, w.WorkflowID, w.RunID).Get(ctx, nil)
	} else {
		err = followLines(ctx, c, e.stdout, w, nil, func(ctx context.Context) (string, error) {
			p, err := queryProgress[workflows.ExportProgress](ctx, c, w.WorkflowID, w.RunID)
			return fmt.Sprintf("export of backup %s disk %d: %s %s", p.BackupID, p.DiskKey, p.Phase, p.URI), err
		})
	}
	switch {
	case err != nil && ctx.Err() != nil:
		return exitError{code: exitDetached, err: fmt.Errorf("stopped watching: export %s goes on", w.WorkflowID)}
	case err == nil || isCanceled(err):
		fmt.Fprintf(e.stdout, "export %s of backup %s stopped\n", w.WorkflowID, w.BackupID)
		return nil
	}
	return exitError{code: 1, err: fmt.Errorf("export %s of backup %s failed: %s", w.WorkflowID, w.BackupID, failureMessage(err))}
}
