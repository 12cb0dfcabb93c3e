package main

import (
	"context"
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/repository"

	"github.com/cbtflow/cbtflow/internal/units"
)

func newListCmd(e *env) *cobra.Command {
	var cfg config.Config
	var asJSON bool
	var status string
	cmd := &cobra.Command{
		Use:   "list [VM]",
		Short: "list restore points, newest first",
		Long: `List the backups of the catalog (of one VM: a VM name or instance UUID),
newest first. A restore point with a damaged disk shows the status damaged
and, below the table, why; in JSON it stays committed with "restorable":
false and the disk's "damaged" reason. Image paths are shown under the
repository (CBTFLOW_REPOSITORY).`,
		Args: maxArgs(1, "one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return listRun(cmd.Context(), e, &cfg, args, status, asJSON)
		},
	}
	addConfigFlags(cmd, &cfg, useCatalog|useRepository)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON array")
	cmd.Flags().StringVar(&status, "status", "", "only backups with this `status` (running, committed, failed)")
	return cmd
}

type listEntry struct {
	BackupID   string     `json:"backup_id"`
	VM         string     `json:"vm"`
	VMUUID     string     `json:"vm_uuid"`
	Profile    string     `json:"profile"`
	Status     string     `json:"status"`
	StartedAt  time.Time  `json:"started_at"`
	FinishedAt *time.Time `json:"finished_at"`
	Error      string     `json:"error,omitempty"`
	// Restorable is false for a backup that is not committed, or one of
	// whose disks is marked damaged.
	Restorable bool       `json:"restorable"`
	Disks      []listDisk `json:"disks"`
	// Verified is the newest verification (starter verify, the weekly
	// schedule); absent when the point was never verified.
	Verified *listVerified `json:"verified,omitempty"`
}

type listVerified struct {
	At      time.Time `json:"at"`
	OK      bool      `json:"ok"`
	Problem string    `json:"problem,omitempty"`
}

type listDisk struct {
	Key       int32  `json:"key"`
	Mode      string `json:"mode"`
	Path      string `json:"path"`
	SizeBytes int64  `json:"size_bytes"`
	ChangeID  string `json:"change_id"`
	// Damaged says why the disk's image, or one its chain builds on, was
	// found damaged; the restore point is then not restorable.
	Damaged string `json:"damaged,omitempty"`
}

func listRun(ctx context.Context, e *env, cfg *config.Config, pos []string, status string, asJSON bool) error {
	switch status {
	case "", catalog.StatusRunning, catalog.StatusCommitted, catalog.StatusFailed:
	default:
		return usageError{fmt.Errorf("list: --status %q is not a status: give running, committed or failed", status)}
	}
	var vm string
	if len(pos) == 1 {
		vm = pos[0]
	}
	repo, err := cfg.AbsRepository()
	if err != nil {
		return err
	}
	cat, err := catalog.Open(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer cat.Close()
	backups, err := cat.List(ctx, catalog.ListFilter{VM: vm, Status: status})
	if err != nil {
		return err
	}
	verified, err := cat.Verifications(ctx)
	if err != nil {
		return err
	}
	entries := make([]listEntry, 0, len(backups))
	for _, b := range backups {
		le := listEntry{BackupID: b.ID, VM: b.VMName, VMUUID: b.VMUUID, Profile: b.Profile, Status: b.Status,
			StartedAt: b.StartedAt.UTC(), Error: b.Error, Disks: []listDisk{}}
		if !b.FinishedAt.IsZero() {
			f := b.FinishedAt.UTC()
			le.FinishedAt = &f
		}
		le.Restorable = b.Status == catalog.StatusCommitted
		if v, ok := verified[b.ID]; ok {
			le.Verified = &listVerified{At: v.At.UTC(), OK: v.OK, Problem: v.Problem}
		}
		for _, d := range b.Disks {
			le.Disks = append(le.Disks, listDisk{Key: d.Key, Mode: d.Mode, Path: repository.ResolveUnder(repo, d.Path), SizeBytes: d.SizeBytes,
				ChangeID: d.ChangeID, Damaged: d.Damaged})
			if d.Damaged != "" {
				le.Restorable = false
			}
		}
		entries = append(entries, le)
	}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(entries)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKUP\tVM\tSTATUS\tSTARTED\tVERIFIED\tDISKS")
	for _, le := range entries {
		disks := ""
		status := le.Status
		for i, d := range le.Disks {
			if i > 0 {
				disks += ", "
			}
			disks += fmt.Sprintf("%d:%s %s", d.Key, d.Mode, units.Bytes(d.SizeBytes))
			if d.Damaged != "" {
				disks += " DAMAGED"
				status = "damaged"
			}
		}
		verified := "-"
		if v := le.Verified; v != nil {
			verified = v.At.Format(time.RFC3339) + " ok"
			if !v.OK {
				verified = v.At.Format(time.RFC3339) + " DAMAGED"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", le.BackupID, le.VM, status, le.StartedAt.Format(time.RFC3339), verified, disks)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// Why each damaged point is damaged: a table cell is too narrow.
	for _, le := range entries {
		for _, d := range le.Disks {
			if d.Damaged != "" {
				fmt.Fprintf(e.stdout, "%s disk %d is damaged, not restorable: %s\n", le.BackupID, d.Key, d.Damaged)
			}
		}
		if v := le.Verified; v != nil && !v.OK {
			fmt.Fprintf(e.stdout, "%s failed its verification of %s: %s\n", le.BackupID, v.At.Format(time.RFC3339), v.Problem)
		}
	}
	return nil
}
