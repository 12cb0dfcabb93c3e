package main

import (
	"context"
	"fmt"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/restore"
)

func newRestoreCmd(e *env) *cobra.Command {
	var cfg config.Config
	var o restoreOptions
	cmd := &cobra.Command{
		Use:   "restore BACKUP_ID --disk KEY (--to FILE [--force] [--format raw|qcow2] | --to-device DEVICE)",
		Short: "write a disk as it was at a restore point",
		Long: `Write a disk as it was at a restore point into a file or a block device.

Every image of the chain is checked against the size and SHA-256 recorded
at commit first.

--to writes a regular file: it appears only when complete (a temporary
file in the same folder, synced, then renamed). An existing file is
refused unless --force.

--to-device writes a block device in place: every byte up to the disk's
size, zeros included, then flushes it. The device must be at least as
large as the disk and not in use (mounted, LVM, md); a failed restore
leaves it partly written.

A directory, a FIFO, a socket, a character device (e.g. /dev/null) or a
missing folder is refused before anything is read.`,
		Example: `  starter restore 20261203T141029Z-1e3e829ce7ae --disk 204 --to disk204.raw
  starter restore 20261203T141029Z-1e3e829ce7ae --disk 204 --to disk204.qcow2 --format qcow2
  starter restore 20261203T141029Z-1e3e829ce7ae --disk 204 --to-device /dev/sdx`,
		Args: exactArgs(1, "exactly one backup ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return restoreRun(cmd.Context(), e, &cfg, args[0], o)
		},
	}
	addConfigFlags(cmd, &cfg, useCatalog|useRepository)
	fs := cmd.Flags()
	fs.StringVar(&o.disk, "disk", "", "device `key` of the disk (e.g. 204)")
	fs.StringVar(&o.to, "to", "", "output `file`: a regular file, refused if it exists unless --force")
	fs.StringVar(&o.toDevice, "to-device", "", "output block `device`, written in place (raw)")
	fs.BoolVar(&o.force, "force", false, "replace an existing --to file (atomically, when the restore is complete)")
	fs.StringVar(&o.format, "format", "raw", "raw (sparse) or qcow2; --to-device takes raw only")
	return cmd
}

type restoreOptions struct {
	disk, to, toDevice, format string
	force                      bool
}

func restoreRun(ctx context.Context, e *env, cfg *config.Config, backupID string, o restoreOptions) error {
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
