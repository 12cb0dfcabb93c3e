package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"go.temporal.io/sdk/client"
	tlog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"
)

// Exit codes of `starter backup` besides 0 and 1.
const (
	exitAlreadyRunning = 3
)

func init() {
	commands["backup"] = command{
		summary: "back up a VM (by name, inventory path or moref)",
		run:     backupCmd,
	}
}

// backupOutput is the JSON object `backup --wait --json` prints.
type backupOutput struct {
	BackupID string       `json:"backup_id"`
	VM       string       `json:"vm"`
	VMUUID   string       `json:"vm_uuid"`
	Status   string       `json:"status"`
	Error    string       `json:"error,omitempty"`
	Workflow string       `json:"workflow_id"`
	Disks    []diskOutput `json:"disks"`
	Warnings []string     `json:"warnings,omitempty"`
}

type diskOutput struct {
	Key          int32   `json:"key"`
	Mode         string  `json:"mode"`
	ChangedBytes int64   `json:"changed_bytes"`
	WrittenBytes int64   `json:"written_bytes"`
	SizeBytes    int64   `json:"size_bytes"`
	Path         string  `json:"path"`
	ChangeID     string  `json:"change_id"`
	Seconds      float64 `json:"seconds"`
	Note         string  `json:"note,omitempty"`
}

func backupCmd(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "backup")
	var cfg config.Config
	cfg.Register(fs)
	profile := fs.String("profile", config.Env("CBTFLOW_PROFILE", workflows.DefaultProfile), "vCenter `profile` (CBTFLOW_PROFILE)")
	mode := fs.String("mode", workflows.ModeAuto, "auto, full or incremental")
	full := fs.Bool("full", false, "same as --mode full")
	wait := fs.Bool("wait", false, "wait for the backup to end; exit 0 only when it completed")
	asJSON := fs.Bool("json", false, "print the result as one JSON object")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: starter backup VM [flags]\n\nVM is a name, an inventory path (/DC0/vm/NAME) or a moref (vm-62).\nExit codes: 0 started (or completed with --wait), 1 failed, 2 bad usage,\n3 a backup of this VM is already running.\n\nflags:")
		fs.PrintDefaults()
	}
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return usageError{err}
	}
	if len(pos) != 1 {
		return usageError{errors.New("backup: give exactly one VM")}
	}
	vm := pos[0]
	if *full {
		if *mode != workflows.ModeAuto && *mode != workflows.ModeFull {
			return usageError{fmt.Errorf("backup: --full contradicts --mode %s", *mode)}
		}
		*mode = workflows.ModeFull
	}
	switch *mode {
	case workflows.ModeAuto, workflows.ModeFull, workflows.ModeIncremental:
	default:
		return usageError{fmt.Errorf("backup: invalid --mode %q: use auto, full or incremental", *mode)}
	}

	c, err := dialTemporal(ctx, e, &cfg)
	if err != nil {
		return err
	}
	defer c.Close()

	run, err := c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID:        "start-backup/" + *profile + "/" + randomID(),
		TaskQueue: workflows.TaskQueue,
	}, workflows.Backup, workflows.BackupInput{VM: vm, Profile: *profile, Mode: *mode, Detach: true})
	if err != nil {
		return fmt.Errorf("backup: start: %w", err)
	}
	var started workflows.BackupResult
	if err := run.Get(ctx, &started); err != nil {
		var app *temporal.ApplicationError
		if errors.As(err, &app) && app.Type() == workflows.ErrTypeAlreadyRunning {
			return alreadyRunning(ctx, e, c, vm, app, *asJSON)
		}
		msg := failureMessage(err)
		if *asJSON {
			_ = printBackup(e, backupOutput{VM: vm, Status: "failed", Error: msg, Workflow: run.GetID(), Disks: []diskOutput{}}, true)
		}
		return exitError{code: 1, err: fmt.Errorf("backup of VM %s: %s", vm, msg)}
	}
	e.log.Info("backup started", "vm", started.VM, "backup", started.BackupID, "workflow", started.WorkflowID)
	out := backupOutput{BackupID: started.BackupID, VM: started.VM, VMUUID: started.VMUUID, Workflow: started.WorkflowID, Status: "running", Disks: []diskOutput{}}
	if !*wait {
		return printBackup(e, out, *asJSON)
	}

	var res workflows.BackupVMResult
	err = c.GetWorkflow(ctx, started.WorkflowID, started.RunID).Get(ctx, &res)
	switch {
	case err == nil:
		out.Status = "completed"
		out.Warnings = res.Warnings
		for _, d := range res.Disks {
			out.Disks = append(out.Disks, diskOutput{Key: d.Key, Mode: d.Mode, ChangedBytes: d.ChangedBytes,
				WrittenBytes: d.WrittenBytes, SizeBytes: d.SizeBytes, Path: d.Path, ChangeID: d.ChangeID, Seconds: d.Seconds, Note: d.Note})
		}
	case isCanceled(err):
		out.Status, out.Error = "canceled", failureMessage(err)
	case isTerminated(err):
		out.Status, out.Error = "terminated", failureMessage(err)
	default:
		out.Status, out.Error = "failed", failureMessage(err)
	}
	if perr := printBackup(e, out, *asJSON); perr != nil {
		return perr
	}
	if out.Status != "completed" {
		return exitError{code: 1, err: fmt.Errorf("backup %s of VM %s %s: %s", out.BackupID, out.VM, out.Status, out.Error), quiet: *asJSON}
	}
	return nil
}

// alreadyRunning names the running backup and exits with code 3. With
// --json, stdout carries the running backup as status "already_running".
func alreadyRunning(ctx context.Context, e *env, c client.Client, vm string, app *temporal.ApplicationError, asJSON bool) error {
	var d workflows.AlreadyRunningDetails
	_ = app.Details(&d)
	name := vm
	if d.VM != "" && d.VM != vm {
		name = fmt.Sprintf("%s (%s)", d.VM, vm)
	}
	out := backupOutput{VM: d.VM, VMUUID: d.VMUUID, Workflow: d.WorkflowID, Status: "already_running", Disks: []diskOutput{}}
	msg := fmt.Sprintf("a backup of VM %s is already running (workflow %s)", name, d.WorkflowID)
	if d.WorkflowID != "" {
		if desc, err := c.DescribeWorkflow(ctx, d.WorkflowID, ""); err == nil {
			if id, ok := desc.TypedSearchAttributes.GetKeyword(workflows.SearchBackupID); ok && id != "" {
				out.BackupID = id
				msg = fmt.Sprintf("a backup of VM %s is already running: backup %s (workflow %s)", name, id, d.WorkflowID)
			}
		}
	}
	out.Error = msg
	if asJSON {
		_ = printBackup(e, out, true)
	}
	return exitError{code: exitAlreadyRunning, err: errors.New(msg)}
}

func printBackup(e *env, out backupOutput, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(e.stdout)
		return enc.Encode(out)
	}
	fmt.Fprintf(e.stdout, "backup %s of VM %s (%s): %s\n", out.BackupID, out.VM, out.VMUUID, out.Status)
	if out.Error != "" {
		fmt.Fprintf(e.stdout, "error: %s\n", out.Error)
	}
	for _, w := range out.Warnings {
		fmt.Fprintf(e.stdout, "warning: %s\n", w)
	}
	for _, d := range out.Disks {
		fmt.Fprintf(e.stdout, "  disk %d %-11s changed %d written %d  %s  change ID %s\n", d.Key, d.Mode, d.ChangedBytes, d.WrittenBytes, d.Path, d.ChangeID)
	}
	return nil
}

func dialTemporal(ctx context.Context, e *env, cfg *config.Config) (client.Client, error) {
	c, err := client.DialContext(ctx, client.Options{
		HostPort:  cfg.TemporalAddress,
		Namespace: cfg.Namespace,
		Logger:    tlog.NewStructuredLogger(e.log.With("component", "temporal-client")),
	})
	if err != nil {
		return nil, fmt.Errorf("connect to Temporal at %s: %w (is the stack running? make dev)", cfg.TemporalAddress, err)
	}
	return c, nil
}

// failureMessage is the most useful message of a workflow error: the
// outermost application error's (an activity's own message), without the
// SDK's wrapping.
func failureMessage(err error) string {
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		return app.Message()
	}
	return strings.TrimSpace(err.Error())
}

func isCanceled(err error) bool {
	var c *temporal.CanceledError
	return errors.As(err, &c)
}

func isTerminated(err error) bool {
	var t *temporal.TerminatedError
	return errors.As(err, &t)
}

func randomID() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
