package main

import (
	"context"
	"fmt"
	"strconv"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/restore"
)

func init() {
	commands["restore"] = command{summary: "write a disk as it was at a restore point", run: restoreCmd}
}

func restoreCmd(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "restore")
	var cfg config.Config
	cfg.Register(fs)
	disk := fs.String("disk", "", "device `key` of the disk (e.g. 204)")
	to := fs.String("to", "", "output `file`")
	format := fs.String("format", "raw", "raw (sparse) or qcow2")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: starter restore BACKUP_ID --disk KEY --to FILE [--format raw|qcow2]\n\nEvery image of the chain is checked against the size and SHA-256 recorded\nat commit first; the output appears only when complete.\n\nflags:")
		fs.PrintDefaults()
	}
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return usageError{err}
	}
	if len(pos) != 1 {
		return usageError{fmt.Errorf("restore: give exactly one backup ID")}
	}
	key, err := strconv.ParseInt(*disk, 10, 32)
	if err != nil {
		return usageError{fmt.Errorf("restore: --disk %q is not a device key", *disk)}
	}
	if *to == "" {
		return usageError{fmt.Errorf("restore: --to is required")}
	}
	if *format != "raw" && *format != "qcow2" {
		return usageError{fmt.Errorf("restore: --format %q is not raw or qcow2", *format)}
	}
	cat, err := catalog.Open(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer cat.Close()
	res, err := restore.Disk(ctx, cat, restore.Options{BackupID: pos[0], DiskKey: int32(key), To: *to, Format: *format})
	if err != nil {
		return err
	}
	e.log.Info("restored", "backup", pos[0], "disk", key, "to", *to, "format", *format, "chain", len(res.Chain), "bytes", res.Bytes)
	return nil
}
