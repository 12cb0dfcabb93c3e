package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/restore"
	"github.com/cbtflow/cbtflow/workflows"
)

// cancelGrace bounds how long an interrupted restore waits for its
// workflow to stop and remove its temporary file.
const cancelGrace = 30 * time.Second

func newRestoreCmd(e *env) *cobra.Command {
	var cfg config.Config
	var o restoreOptions
	cmd := &cobra.Command{
		Use:   "restore BACKUP_ID (--disk KEY (--to FILE [--force] [--format raw|qcow2] [--local] | --to-device DEVICE) | --to-vm VM [--disk KEY] [--profile P] [--json] [--wait])",
		Short: "write a disk as it was at a restore point",
		Long: `Write a disk as it was at a restore point into a file or a block device.

Every image of the chain is checked against the size and SHA-256 recorded
at commit first.

--to writes a regular file: it appears only when complete (a temporary
file in the same folder, synced, then renamed). An existing file is
refused unless --force. The restore is a Temporal workflow (Restore) run
by the worker that owns the repository, and the file is written on the
worker's machine: the starter needs only Temporal. A relative FILE is
taken from the starter's working folder; give an absolute path when the
worker runs elsewhere. On a terminal, progress bars show the chain's
verification and the writing; Ctrl-C cancels the restore (no file is
left). --local restores in the starter's own process instead, reading
the catalog (--database-url) and the repository folder (--repository)
itself, for a repository on the operator's machine.

--to-device writes a block device in place: every byte up to the disk's
size, zeros included, then flushes it. The device must be at least as
large as the disk and not in use (mounted, LVM, md); a failed restore
leaves it partly written. It always runs in the starter's process
(--local), on the machine that holds the repository.

A directory, a FIFO, a socket, a character device (e.g. /dev/null) or a
missing folder is refused before anything is read.

--to-vm writes the restore point's disks (or the one --disk names) back
into a VM over NBD, through the same disk source backups read from (the
vddk plugin in write mode; in the lab, the VM's disk images). The VM must
be powered off and have disks of the point's keys and sizes. A snapshot
(cbtflow-restore-<id>) is taken first and removed when the restore
completes; a failed restore keeps it and names it, so that the VM can be
reverted to it. Only the areas that differ from the point are written
when the VM's change tracking can say which; otherwise the whole disk.
The next backup of the VM is full. It is the RestoreVM workflow; --json
prints its result, --wait=false returns once it started. With --new-vm
NAME it creates a powered-off VM of that name beside VM (its folder,
resource pool, host and datastore) with disks of the point's sizes, and
writes the whole of every disk into it.`,
		Example: `  starter restore 20261203T141029Z-1e3e829ce7ae --disk 204 --to /srv/restores/disk204.raw
  starter restore 20261203T141029Z-1e3e829ce7ae --disk 204 --to /srv/restores/disk204.qcow2 --format qcow2
  starter restore 20261203T141029Z-1e3e829ce7ae --disk 204 --to disk204.raw --local
  starter restore 20261203T141029Z-1e3e829ce7ae --disk 204 --to-device /dev/sdx
  starter restore 20261203T141029Z-1e3e829ce7ae --to-vm DC0_H0_VM0 --json
  starter restore 20261203T141029Z-1e3e829ce7ae --to-vm DC0_H0_VM0 --new-vm DC0_H0_VM0-restored`,
		Args: exactArgs(1, "exactly one backup ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return restoreRun(cmd.Context(), e, &cfg, args[0], o)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal|useCatalog|useRepository)
	fs := cmd.Flags()
	fs.StringVar(&o.disk, "disk", "", "device `key` of the disk (e.g. 204)")
	fs.StringVar(&o.to, "to", "", "output `file`: a regular file, refused if it exists unless --force")
	fs.StringVar(&o.toDevice, "to-device", "", "output block `device`, written in place (raw)")
	fs.BoolVar(&o.force, "force", false, "replace an existing --to file (atomically, when the restore is complete)")
	fs.StringVar(&o.format, "format", "raw", "raw (sparse) or qcow2; --to-device takes raw only")
	fs.BoolVar(&o.local, "local", false, "restore in this process from the catalog and the repository folder (--database-url, --repository), not through the worker")
	fs.StringVar(&o.toVM, "to-vm", "", "write the disks back into this powered-off `VM` (name, inventory path or moref)")
	fs.StringVar(&o.newVM, "new-vm", "", "create a powered-off VM of this `name` beside the --to-vm VM and restore every disk into it")
	fs.StringVar(&o.profile, "profile", "", "--to-vm: the vCenter `profile` to reach the VM through (default: the restore point's)")
	fs.BoolVar(&o.asJSON, "json", false, "--to-vm: print the result as JSON")
	fs.BoolVar(&o.wait, "wait", true, "--to-vm: wait for the restore to end")
	return cmd
}

type restoreOptions struct {
	disk, to, toDevice, format string
	force, local               bool
	// --to-vm (restorevm.go)
	toVM, newVM, profile string
	asJSON, wait         bool
}

func restoreRun(ctx context.Context, e *env, cfg *config.Config, backupID string, o restoreOptions) error {
	if o.toVM != "" || o.newVM != "" {
		return restoreVMRun(ctx, e, cfg, backupID, o)
	}
	disk, to, toDevice, force, format := &o.disk, &o.to, &o.toDevice, &o.force, &o.format
	pos := []string{backupID}
	key, err := strconv.ParseInt(*disk, 10, 32)
	if err != nil {
		return usageError{fmt.Errorf("restore: --disk %q is not a device key", *disk)}
	}
	if (*to == "") == (*toDevice == "") {
		return usageError{fmt.Errorf("restore: give exactly one of --to FILE and --to-device DEVICE")}
	}
	if *format != "raw" && *format != "qcow2" {
		return usageError{fmt.Errorf("restore: --format %q is not raw or qcow2", *format)}
	}
	opts := restore.Options{BackupID: pos[0], DiskKey: int32(key), To: *to, Format: *format, Force: *force}
	if *toDevice != "" {
		if *format != "raw" {
			return usageError{fmt.Errorf("restore: --to-device writes raw, not --format %s", *format)}
		}
		if *force {
			return usageError{fmt.Errorf("restore: --force is for --to: a device is always written in place")}
		}
		opts.To, opts.Device = *toDevice, true
	}
	if !o.local && !opts.Device {
		return restoreWorkflow(ctx, e, cfg, opts)
	}
	// Refuse a wrong target before the chain is read and hashed, which
	// takes minutes on big disks; restore.Disk checks it again.
	if _, err := restore.CheckTarget(opts); err != nil {
		return err
	}
	// The catalog records image paths relative to the repository.
	if opts.Repository, err = cfg.AbsRepository(); err != nil {
		return err
	}
	cat, err := catalog.Open(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer cat.Close()
	res, err := restore.Disk(ctx, cat, opts)
	if err != nil {
		return err
	}
	e.log.Info("restored", "backup", pos[0], "disk", key, "to", opts.To, "device", opts.Device, "format", *format, "chain", len(res.Chain), "bytes", res.Bytes)
	return nil
}

// restoreWorkflow runs the restore as the Restore workflow, on the
// worker's machine, and waits for it: bars on a terminal, nothing on
// stdout otherwise (as the in-process restore). Interrupted, it cancels
// the restore and waits (cancelGrace) for it to remove its temporary
// file.
func restoreWorkflow(ctx context.Context, e *env, cfg *config.Config, opts restore.Options) error {
	to, err := filepath.Abs(opts.To)
	if err != nil {
		return fmt.Errorf("restore: %s: %w", opts.To, err)
	}
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	in := workflows.RestoreInput{BackupID: opts.BackupID, DiskKey: opts.DiskKey, To: to, Format: opts.Format, Force: opts.Force}
	wid := fmt.Sprintf("restore/%s/%d/%s", opts.BackupID, opts.DiskKey, randomID())
	run, err := c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: wid, TaskQueue: workflows.TaskQueue}, workflows.Restore, in)
	if err != nil {
		if ctx.Err() != nil {
			// The start may have reached Temporal all the same.
			return interruptedRestore(e, c, wid, "", in)
		}
		return fmt.Errorf("restore: start: %w", err)
	}
	e.log.Info("restore started", "backup", in.BackupID, "disk", in.DiskKey, "to", in.To, "workflow", wid)
	var res workflows.RestoreResult
	if isTerminal(e.stdout) {
		res, err = followRestore(ctx, c, e.stdout, wid, run.GetRunID())
	} else {
		err = run.Get(ctx, &res)
	}
	if err != nil && ctx.Err() != nil {
		return interruptedRestore(e, c, wid, run.GetRunID(), in)
	}
	if err != nil {
		if isCanceled(err) {
			return fmt.Errorf("restore: backup %s disk %d was canceled: no file was written (workflow %s)", in.BackupID, in.DiskKey, wid)
		}
		return errors.New(failureMessage(err))
	}
	e.log.Info("restored", "backup", in.BackupID, "disk", in.DiskKey, "to", res.To, "device", false, "format", res.Format,
		"chain", len(res.Chain), "bytes", res.Bytes, "workflow", wid)
	return nil
}

// interruptedRestore cancels the restore of an interrupted starter and
// waits a little for it to end, so that no temporary file stays behind
// the operator's back.
func interruptedRestore(e *env, c client.Client, wid, runID string, in workflows.RestoreInput) error {
	ctx, cancel := context.WithTimeout(context.Background(), cancelGrace)
	defer cancel()
	if err := c.CancelWorkflow(ctx, wid, runID); err != nil {
		e.log.Warn("restore: the cancel of the interrupted restore failed", "workflow", wid, "error", err)
	}
	err := c.GetWorkflow(ctx, wid, runID).Get(ctx, nil)
	switch {
	case err == nil:
		return fmt.Errorf("restore: interrupted, but backup %s disk %d was restored to %s before the cancel reached it", in.BackupID, in.DiskKey, in.To)
	case isCanceled(err):
		return fmt.Errorf("restore: interrupted: the restore of backup %s disk %d was canceled, no file was written", in.BackupID, in.DiskKey)
	case ctx.Err() != nil:
		return fmt.Errorf("restore: interrupted: the cancel of the restore of backup %s disk %d is requested (workflow %s); it removes its temporary file in the background", in.BackupID, in.DiskKey, wid)
	}
	return errors.New(failureMessage(err))
}
