package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	tlog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"

	"github.com/cbtflow/cbtflow/internal/units"
)

// Exit codes of `starter backup` besides 0 and 1.
const (
	exitAlreadyRunning = 3
	// exitDetached: the starter was interrupted (SIGINT, SIGTERM) while
	// the backup goes on in Temporal. The starter never cancels a backup
	// on its way out: Ctrl-C of a waiting terminal must not throw away a
	// transfer of hours, so cancelling is a deliberate, separate step.
	exitDetached = 4
)

// startGrace bounds how long an interrupted starter still waits for the
// start workflow to name the backup it started, so that it can print the
// backup's ID (a start takes well under a second).
const startGrace = 10 * time.Second

func newBackupCmd(e *env) *cobra.Command {
	var cfg config.Config
	var o backupOptions
	cmd := &cobra.Command{
		Use:   "backup VM [VM...]",
		Short: "back up VMs (each by name, inventory path or moref)",
		Long: `Back up a VM named by name, inventory path (/DC0/vm/NAME) or moref (vm-62).

Without --wait it returns once the backup started; with --wait it exits 0
only when the backup completed.

Exit codes: 0 started (or completed with --wait), 1 failed, 2 bad usage,
3 a backup of this VM is already running, 4 interrupted (Ctrl-C, SIGTERM)
while the backup goes on in the background: the starter never cancels it;
it prints the backup ID and how to follow or cancel it (with --json, the
backup as status "running").

Several VMs: each gets its own backup, all started at once (at most
` + strconv.Itoa(startsAtOnce) + ` start requests in flight), each reported as it starts (or, with
--wait, as it ends): its summary, or with --json its object on a line of
its own (JSON Lines, in the order they end; a VM whose backup could not
be started gets its line too, status "failed"). One VM's failure does
not stop the others. The exit code is the worst of theirs: 1 when any
failed (an interrupt that kept a VM's backup from starting counts so),
else 3 when any was already running, else 4 when interrupted, else 0;
stderr ends with a count of each outcome.`,
		Args: minArgs(1, "at least one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return backupCmdRun(cmd.Context(), e, &cfg, o, args)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	fs := cmd.Flags()
	o.profile = profileFlag(fs)
	fs.StringVar(&o.mode, "mode", workflows.ModeAuto, "auto, full or incremental")
	fs.BoolVar(&o.full, "full", false, "same as --mode full")
	fs.BoolVar(&o.wait, "wait", false, "wait for the backup to end; exit 0 only when it completed (Ctrl-C stops the waiting, not the backup: exit 4)")
	fs.BoolVar(&o.json, "json", false, "print the result as one JSON object")
	return cmd
}

type backupOptions struct {
	profile          *string
	mode             string
	full, wait, json bool
}

// startsAtOnce bounds the start requests of a backup of several VMs that
// are in flight at once (each a Backup workflow resolving its VM); the
// waits for their ends are not bounded.
const startsAtOnce = 16

// backupCmdRun is `starter backup VM [VM...]`.
func backupCmdRun(ctx context.Context, e *env, cfg *config.Config, o backupOptions, vms []string) error {
	if o.full {
		if o.mode != workflows.ModeAuto && o.mode != workflows.ModeFull {
			return usageError{fmt.Errorf("backup: --full contradicts --mode %s", o.mode)}
		}
		o.mode = workflows.ModeFull
	}
	switch o.mode {
	case workflows.ModeAuto, workflows.ModeFull, workflows.ModeIncremental:
	default:
		return usageError{fmt.Errorf("backup: invalid --mode %q: use auto, full or incremental", o.mode)}
	}
	for i, vm := range vms {
		if strings.TrimSpace(vm) == "" {
			return usageError{fmt.Errorf("backup: VM %d of %d is empty", i+1, len(vms))}
		}
		if j := slices.Index(vms[:i], vm); j >= 0 {
			return usageError{fmt.Errorf("backup: VM %q is given twice", vm)}
		}
	}

	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	if len(vms) == 1 {
		return backupRun(ctx, e, cfg, c, o, vms[0], nil)
	}
	return backupMany(ctx, e, cfg, c, o, vms)
}

// backupMany backs up several VMs at once, each as backupRun backs up
// one, and prints each one's report and error whole, as it comes.
func backupMany(ctx context.Context, e *env, cfg *config.Config, c client.Client, o backupOptions, vms []string) error {
	var (
		mu    sync.Mutex
		wg    sync.WaitGroup
		count = map[int]int{} // exit code → VMs
		worst = 0
		slots = make(chan struct{}, startsAtOnce)
	)
	// The order of the codes' severity: failed, already running,
	// interrupted, done.
	rank := map[int]int{0: 0, exitDetached: 1, exitAlreadyRunning: 2, 1: 3}
	for _, vm := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out, errOut bytes.Buffer
			one := *e
			one.stdout, one.stderr = &out, &errOut
			err := backupRun(ctx, &one, cfg, c, o, vm, slots)
			code := 0
			if err != nil {
				code = 1
				var exit exitError
				if errors.As(err, &exit) {
					code = exit.code
				}
				if !errors.As(err, &exit) || !exit.quiet {
					fmt.Fprintln(&errOut, "starter:", err)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			_, _ = e.stdout.Write(out.Bytes())
			_, _ = e.stderr.Write(errOut.Bytes())
			count[code]++
			if rank[code] > rank[worst] {
				worst = code
			}
		}()
	}
	wg.Wait()
	done := "started"
	if o.wait {
		done = "completed"
	}
	var parts []string
	for _, c := range []struct {
		code int
		what string
	}{{0, done}, {1, "failed"}, {exitAlreadyRunning, "already running"}, {exitDetached, "going on after the interrupt"}} {
		if n := count[c.code]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, c.what))
		}
	}
	summary := fmt.Errorf("backup of %d VMs: %s", len(vms), strings.Join(parts, ", "))
	if worst == 0 {
		fmt.Fprintln(e.stderr, "starter:", summary)
		return nil
	}
	return exitError{code: worst, err: summary}
}

// backupRun backs up one VM: it starts the backup and, with --wait,
// waits for its end. slots, when set, bounds the starts in flight.
func backupRun(ctx context.Context, e *env, cfg *config.Config, c client.Client, o backupOptions, vm string, slots chan struct{}) error {
	profile, mode, wait, asJSON := o.profile, &o.mode, &o.wait, &o.json
	// notStarted reports a backup that was not started, on stdout too
	// with --json (one report per VM, whatever happened).
	notStarted := func(err error) error {
		if *asJSON {
			_ = printBackup(e, workflows.BackupReport{VM: vm, Status: workflows.ReportFailed, Error: err.Error(), Disks: []workflows.DiskResult{}}, true)
		}
		return exitError{code: 1, err: err}
	}
	if slots != nil {
		got := false
		select {
		case slots <- struct{}{}:
			got = true
		case <-ctx.Done():
		}
		if got && ctx.Err() != nil {
			<-slots // both were ready: the interrupt wins
			got = false
		}
		if !got {
			// Interrupted before this one's start was asked for.
			return notStarted(fmt.Errorf("backup of VM %s: interrupted before it was started: nothing was started", vm))
		}
	}
	freeSlot := func() {
		if slots != nil {
			<-slots
			slots = nil
		}
	}
	defer freeSlot()

	startID := "start-backup/" + randomID()
	if *profile != "" {
		startID = "start-backup/" + *profile + "/" + randomID()
	}
	run, err := c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID:        startID,
		TaskQueue: workflows.TaskQueue,
	}, workflows.Backup, workflows.BackupInput{VM: vm, Profile: *profile, Mode: *mode, Detach: true})
	if err != nil && ctx.Err() == nil {
		return notStarted(fmt.Errorf("backup of VM %s: start: %w", vm, err))
	}
	if err != nil {
		// Interrupted during the start request, which may have reached
		// Temporal all the same: the start workflow's ID is ours, so ask.
		run = c.GetWorkflow(context.WithoutCancel(ctx), startID, "")
	}
	// octx is for what the starter still asks Temporal after an interrupt:
	// the start goes on in Temporal regardless, and a short wait learns
	// which backup it started, so the operator gets its ID.
	octx := ctx
	var started workflows.BackupResult
	err = run.Get(ctx, &started)
	if err != nil && ctx.Err() != nil {
		var cancel context.CancelFunc
		octx, cancel = context.WithTimeout(context.WithoutCancel(ctx), startGrace)
		defer cancel()
		err = run.Get(octx, &started)
		var nf *serviceerror.NotFound
		switch {
		case errors.As(err, &nf):
			return notStarted(fmt.Errorf("backup of VM %s: interrupted before it was started: nothing was started", vm))
		case err != nil && octx.Err() != nil:
			return detached(e, cfg, workflows.BackupReport{VM: vm, WorkflowID: startID, Disks: []workflows.DiskResult{}}, *asJSON)
		}
	}
	if err != nil {
		var app *temporal.ApplicationError
		if errors.As(err, &app) && app.Type() == workflows.ErrTypeAlreadyRunning {
			return alreadyRunning(octx, e, c, vm, app, *asJSON)
		}
		msg := failureMessage(err)
		if *asJSON {
			_ = printBackup(e, workflows.BackupReport{VM: vm, Status: workflows.ReportFailed, Error: msg, WorkflowID: run.GetID(), Disks: []workflows.DiskResult{}}, true)
		}
		return exitError{code: 1, err: fmt.Errorf("backup of VM %s: %s", vm, msg)}
	}
	freeSlot()
	e.log.Info("backup started", "vm", started.VM, "backup", started.BackupID, "workflow", started.WorkflowID)
	out := workflows.BackupReport{BackupID: started.BackupID, VM: started.VM, VMUUID: started.VMUUID, WorkflowID: started.WorkflowID, Status: workflows.ReportRunning, Disks: []workflows.DiskResult{}}
	if ctx.Err() != nil {
		return detached(e, cfg, out, *asJSON)
	}
	if !*wait {
		return printBackup(e, out, *asJSON)
	}

	// On a terminal, progress bars while it runs (follow); the summary
	// follows either way.
	var res workflows.BackupVMResult
	if !*asJSON && isTerminal(e.stdout) {
		res, err = follow(ctx, c, e.stdout, started.WorkflowID, started.RunID, true)
	} else {
		err = c.GetWorkflow(ctx, started.WorkflowID, started.RunID).Get(ctx, &res)
	}
	if err != nil && ctx.Err() != nil {
		// Waiting only watches the workflow: the backup goes on.
		return detached(e, cfg, out, *asJSON)
	}
	return finish(e, out, res, err, *asJSON)
}

// finish completes the report of a backup that ended (err: its
// workflow's), prints it and returns the command's outcome: nil when
// completed, else exit 1 (quiet with --json, whose stdout says it).
func finish(e *env, out workflows.BackupReport, res workflows.BackupVMResult, err error, asJSON bool) error {
	switch {
	case err == nil:
		out.Status = workflows.ReportCompleted
		out.Warnings = res.Warnings
		out.Disks = append(out.Disks, res.Disks...)
	case isCanceled(err):
		out.Status, out.Error = workflows.ReportCanceled, failureMessage(err)
	case isTerminated(err):
		out.Status, out.Error = workflows.ReportTerminated, failureMessage(err)
	default:
		out.Status, out.Error = workflows.ReportFailed, failureMessage(err)
	}
	if perr := printBackup(e, out, asJSON); perr != nil {
		return perr
	}
	if out.Status != workflows.ReportCompleted {
		return exitError{code: 1, err: fmt.Errorf("backup %s of VM %s %s: %s", out.BackupID, out.VM, out.Status, out.Error), quiet: asJSON}
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
	out := workflows.BackupReport{VM: d.VM, VMUUID: d.VMUUID, WorkflowID: d.WorkflowID, Status: workflows.ReportAlreadyRunning, Disks: []workflows.DiskResult{}}
	msg := fmt.Sprintf("a backup of VM %s is already running (workflow %s)", name, d.WorkflowID)
	if d.WorkflowID != "" {
		if desc, err := c.DescribeWorkflow(ctx, d.WorkflowID, ""); err == nil {
			if desc.WorkflowType.Name == "PruneVM" {
				// The VM's lock is held by a prune of its restore points.
				msg = fmt.Sprintf("a prune of VM %s's restore points is running (workflow %s): no backup of the VM starts until it ends; try again then", name, d.WorkflowID)
			} else if id, ok := desc.TypedSearchAttributes.GetKeyword(workflows.SearchBackupID); ok && id != "" {
				out.BackupID = id
				// The running backup may have been started under another
				// profile of the same vCenter: say which.
				under := ""
				if p, ok := desc.TypedSearchAttributes.GetKeyword(workflows.SearchVCenter); ok && p != "" {
					under = " under profile " + p
				}
				msg = fmt.Sprintf("a backup of VM %s is already running: backup %s%s (workflow %s)", name, id, under, d.WorkflowID)
			}
		}
	}
	out.Error = msg
	if asJSON {
		_ = printBackup(e, out, true)
	}
	return exitError{code: exitAlreadyRunning, err: errors.New(msg)}
}

// detached reports a backup that goes on after the starter was
// interrupted: stdout carries it as status "running" (as `backup` without
// --wait prints it), stderr says how to follow and how to cancel it. Exit
// code 4. Without a backup ID (interrupted before the start workflow named
// it), out.WorkflowID is the start workflow's ID.
func detached(e *env, cfg *config.Config, out workflows.BackupReport, asJSON bool) error {
	out.Status = workflows.ReportRunning
	if err := printBackup(e, out, asJSON); err != nil {
		return err
	}
	tctl := func(verb string) string {
		return "temporal workflow " + verb + " --address " + shellQuote(cfg.TemporalAddress) +
			" --namespace " + shellQuote(cfg.Namespace) + " --workflow-id " + shellQuote(out.WorkflowID)
	}
	var b strings.Builder
	if out.BackupID == "" {
		fmt.Fprintf(&b, "interrupted while backup of VM %s was being started: it may go on in the background (start workflow %s); the starter did not cancel it.\n", out.VM, out.WorkflowID)
	} else {
		fmt.Fprintf(&b, "interrupted: backup %s of VM %s goes on in the background (workflow %s); the starter did not cancel it.\n", out.BackupID, out.VM, out.WorkflowID)
	}
	name := out.BackupID
	if name == "" {
		name = out.VM
	}
	fmt.Fprintf(&b, "  follow it: starter watch %s\n", shellQuote(name))
	fmt.Fprintf(&b, "             starter status %s\n", shellQuote(out.VM))
	fmt.Fprintf(&b, "             the Temporal Web UI (make dev: http://127.0.0.1:8233), /namespaces/%s/workflows/%s\n",
		url.PathEscape(cfg.Namespace), url.PathEscape(out.WorkflowID))
	fmt.Fprintf(&b, "             %s\n", tctl("describe"))
	fmt.Fprintf(&b, "  cancel it: starter cancel %s", shellQuote(name))
	return exitError{code: exitDetached, err: errors.New(b.String())}
}

// shellQuote quotes s for a POSIX shell unless it is plain, so the
// printed commands can be pasted.
func shellQuote(s string) string {
	plain := s != ""
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./:=@%+,", r)) {
			plain = false
			break
		}
	}
	if plain {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// printBackup prints the report: with --json as one JSON object (the
// contract is workflows.BackupReport), else as lines for a person.
func printBackup(e *env, out workflows.BackupReport, asJSON bool) error {
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
		// The QCOW2's space: what its file takes (it is sparse), or its
		// size from workers that do not say.
		qcow2 := units.Bytes(d.SizeBytes)
		if d.AllocatedBytes > 0 {
			qcow2 = units.Bytes(d.AllocatedBytes)
		}
		fmt.Fprintf(e.stdout, "  disk %d %-11s changed %s, written %s, QCOW2 %s, %s  %s  change ID %s\n", d.Key, d.Mode,
			units.Bytes(d.ChangedBytes), units.Bytes(d.WrittenBytes), qcow2, units.Seconds(d.Seconds), d.Path, d.ChangeID)
		if d.Note != "" {
			fmt.Fprintf(e.stdout, "    note: %s\n", d.Note)
		}
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
