package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/internal/repository"

	"github.com/cbtflow/cbtflow/internal/units"
)

// The JSON of `starter repo`, a contract the README documents.
type repoOutput struct {
	Repository repoSpaceOutput  `json:"repository"`
	VMs        []repoVMOutput   `json:"vms"`
	Total      repoTotalOutput  `json:"total"`
	Prunes     repoPrunesOutput `json:"prunes"`
}

// repoSpaceOutput is the repository folder as the starter sees it: the
// worker's, when the same path reaches it from here.
type repoSpaceOutput struct {
	Path      string `json:"path"`
	Reachable bool   `json:"reachable"`
	// FreeBytes (what the worker may still write) and SizeBytes (the
	// filesystem's) are null when the folder is not reachable from here.
	FreeBytes *int64 `json:"free_bytes"`
	SizeBytes *int64 `json:"size_bytes"`
	// Reason says why the folder is not reachable; absent when it is.
	Reason string `json:"reason,omitempty"`
}

type repoVMOutput struct {
	VM            string `json:"vm"`
	VMUUID        string `json:"vm_uuid"`
	Profile       string `json:"profile"`
	RestorePoints int64  `json:"restore_points"`
	// DamagedPoints are restore points with a disk marked damaged: not
	// restorable, still counted in RestorePoints and UsedBytes.
	DamagedPoints int64      `json:"damaged_points"`
	Oldest        *time.Time `json:"oldest"` // null without restore points
	Newest        *time.Time `json:"newest"`
	UsedBytes     int64      `json:"used_bytes"`
	// RetentionSource is where the VM's retention policy comes from: "vm",
	// "default" or "none" (it keeps everything).
	RetentionSource string `json:"retention_source"`
}

type repoTotalOutput struct {
	VMs           int        `json:"vms"`
	RestorePoints int64      `json:"restore_points"`
	DamagedPoints int64      `json:"damaged_points"`
	Oldest        *time.Time `json:"oldest"`
	Newest        *time.Time `json:"newest"`
	UsedBytes     int64      `json:"used_bytes"`
}

type repoPrunesOutput struct {
	Count      int64 `json:"count"`
	BytesFreed int64 `json:"bytes_freed"`
}

const repoUsage = `Per VM of the catalog and in total: the restore points (and how many are
damaged), the oldest and newest, the bytes their images take (the sizes
the catalog records: at commit, or as a prune's merge rewrote them), and
where the VM's retention policy comes from (vm, default or none); then the
repository folder's free space, and what prunes have freed so far.

The free space is the filesystem's of the repository folder
(CBTFLOW_REPOSITORY, as the worker has it) when that folder is reachable
from here: it exists, and it holds the catalog's images (when the catalog
has any). Elsewhere (another host, not mounted) it is unknown, and says why.

--json prints one object: {"repository": {"path", "reachable",
"free_bytes", "size_bytes" (null when not reachable), "reason" (only when
not reachable)}, "vms": [{"vm", "vm_uuid", "profile", "restore_points",
"damaged_points", "oldest", "newest" (null without restore points),
"used_bytes", "retention_source"}], "total": {"vms", "restore_points",
"damaged_points", "oldest", "newest", "used_bytes"}, "prunes": {"count",
"bytes_freed"}}.`

func newRepoCmd(e *env) *cobra.Command {
	var cfg config.Config
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "repo",
		Short: "restore points, bytes used and free space of the repository",
		Long:  repoUsage,
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return repoRun(cmd.Context(), e, &cfg, asJSON)
		},
	}
	addConfigFlags(cmd, &cfg, useCatalog|useRepository)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}

func repoRun(ctx context.Context, e *env, cfg *config.Config, asJSON bool) error {
	root, err := cfg.AbsRepository()
	if err != nil {
		return err
	}
	cat, err := catalog.Open(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer cat.Close()
	usage, err := cat.Usage(ctx)
	if err != nil {
		return err
	}
	count, freed, err := cat.PruneTotals(ctx)
	if err != nil {
		return err
	}
	out := repoOutput{VMs: []repoVMOutput{}, Total: repoTotalOutput{VMs: len(usage)},
		Prunes: repoPrunesOutput{Count: count, BytesFreed: freed}}
	for _, u := range usage {
		_, src, err := cat.EffectivePolicy(ctx, u.Profile, u.UUID)
		if err != nil {
			return err
		}
		vo := repoVMOutput{VM: u.Name, VMUUID: u.UUID, Profile: u.Profile, RestorePoints: u.RestorePoints,
			DamagedPoints: u.Damaged, UsedBytes: u.Bytes, RetentionSource: string(src)}
		if u.RestorePoints > 0 {
			vo.Oldest, vo.Newest = utcPtr(u.Oldest), utcPtr(u.Newest)
			if out.Total.Oldest == nil || vo.Oldest.Before(*out.Total.Oldest) {
				out.Total.Oldest = vo.Oldest
			}
			if out.Total.Newest == nil || vo.Newest.After(*out.Total.Newest) {
				out.Total.Newest = vo.Newest
			}
		}
		out.VMs = append(out.VMs, vo)
		out.Total.RestorePoints += u.RestorePoints
		out.Total.DamagedPoints += u.Damaged
		out.Total.UsedBytes += u.Bytes
	}
	out.Repository = repoSpace(root, usage)

	if asJSON {
		return json.NewEncoder(e.stdout).Encode(out)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tPROFILE\tUUID\tPOINTS\tDAMAGED\tOLDEST\tNEWEST\tUSED\tRETENTION")
	for _, v := range out.VMs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\n", v.VM, v.Profile, v.VMUUID, v.RestorePoints, v.DamagedPoints,
			timeCell(v.Oldest), timeCell(v.Newest), units.Bytes(v.UsedBytes), v.RetentionSource)
	}
	t := out.Total
	fmt.Fprintf(tw, "TOTAL\t\t%s\t%d\t%d\t%s\t%s\t%s\n", vmCount(t.VMs), t.RestorePoints, t.DamagedPoints,
		timeCell(t.Oldest), timeCell(t.Newest), units.Bytes(t.UsedBytes))
	if err := tw.Flush(); err != nil {
		return err
	}
	r := out.Repository
	if r.Reachable {
		fmt.Fprintf(e.stdout, "repository %s: %s free of %s\n", r.Path, units.Bytes(*r.FreeBytes), units.Bytes(*r.SizeBytes))
	} else {
		fmt.Fprintf(e.stdout, "repository %s: free space unknown: not reachable from here: %s\n", r.Path, r.Reason)
	}
	fmt.Fprintf(e.stdout, "prunes: %d so far, %s freed\n", out.Prunes.Count, units.Bytes(out.Prunes.BytesFreed))
	return nil
}

// repoSpace tells whether root, as seen from here, is the repository the
// catalog describes, and its space when it is. A folder that exists but
// holds none of the newest images of the catalog's VMs is another folder
// of the same path (another host, a repository not mounted here).
func repoSpace(root string, usage []catalog.VMUsage) repoSpaceOutput {
	out := repoSpaceOutput{Path: root}
	sp, err := repository.SpaceOf(root)
	if err != nil {
		out.Reason = err.Error()
		return out
	}
	var sample string
	found := false
	for _, u := range usage {
		if u.NewestImage == "" {
			continue
		}
		p := repository.ResolveUnder(root, u.NewestImage)
		if sample == "" {
			sample = p
		}
		if _, err := os.Stat(p); err == nil {
			found = true
			break
		}
	}
	if sample != "" && !found {
		out.Reason = fmt.Sprintf("%s holds none of the catalog's newest images (e.g. %s): it is not the worker's repository here", root, sample)
		return out
	}
	out.Reachable = true
	out.FreeBytes, out.SizeBytes = &sp.Free, &sp.Size
	return out
}

func utcPtr(t time.Time) *time.Time {
	u := t.UTC()
	return &u
}

func timeCell(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.Format(time.RFC3339)
}

func vmCount(n int) string {
	if n == 1 {
		return "1 VM"
	}
	return fmt.Sprintf("%d VMs", n)
}
