package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"

	"github.com/cbtflow/cbtflow/internal/units"
)

func newPruneCmd(e *env) *cobra.Command {
	var cfg config.Config
	var o pruneOptions
	cmd := &cobra.Command{
		Use:   "prune [VM]",
		Short: "remove the restore points the retention policies no longer keep (merging what kept points need)",
		Long: `Apply the retention policies (see starter retention): the restore points a
VM's policy does not keep are removed; data that kept points build on is
merged into them first, so every kept point restores as it was backed up.
Without VM, every VM with restore points. A VM without a policy keeps
everything. A prune of a VM never runs beside a backup of it.`,
		Args: maxArgs(1, "one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return pruneRun(cmd.Context(), e, &cfg, args, o)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	fs := cmd.Flags()
	fs.StringVar(&o.profile, "profile", "", "the vCenter `profile` of the VM, to tell apart VMs of the same name")
	fs.BoolVar(&o.dry, "dry-run", false, "list what would be removed and why; remove nothing (waits for the plan)")
	fs.BoolVar(&o.wait, "wait", false, "wait for the prune to end and print what it did")
	fs.BoolVar(&o.json, "json", false, "print the result as one JSON object")
	return cmd
}

type pruneOptions struct {
	profile         string
	dry, wait, json bool
}

func pruneRun(ctx context.Context, e *env, cfg *config.Config, pos []string, o pruneOptions) error {
	profile, dry, wait, asJSON := &o.profile, &o.dry, &o.wait, &o.json
	in := workflows.PruneInput{Profile: *profile, DryRun: *dry}
	if len(pos) == 1 {
		in.VM = pos[0]
	}
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	id := "cbtflow-prune-" + randomID()
	run, err := c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: id, TaskQueue: workflows.TaskQueue}, workflows.Prune, in)
	if err != nil {
		return fmt.Errorf("prune: start: %w", err)
	}
	if !*wait && !*dry {
		if *asJSON {
			return json.NewEncoder(e.stdout).Encode(map[string]string{"workflow_id": id, "run_id": run.GetRunID(), "status": "running"})
		}
		fmt.Fprintf(e.stdout, "prune started: workflow %s\n", id)
		return nil
	}
	var res workflows.PruneResult
	if err := run.Get(ctx, &res); err != nil {
		return fmt.Errorf("prune: %s", failureMessage(err))
	}
	if *asJSON {
		if err := json.NewEncoder(e.stdout).Encode(res); err != nil {
			return err
		}
	} else {
		printPrune(e, res)
	}
	if len(res.Errors) > 0 {
		return exitError{code: 1, err: errors.New("prune: " + strings.Join(res.Errors, "; ")), quiet: *asJSON}
	}
	return nil
}

func printPrune(e *env, res workflows.PruneResult) {
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	for _, vm := range res.VMs {
		fmt.Fprintf(tw, "%s (%s): policy %s\n", vm.VMName, vm.VMUUID, vm.Policy)
		for _, k := range vm.Kept {
			fmt.Fprintf(tw, "  keep\t%s\t%s\t%s\n", k.BackupID, k.Time.Local().Format("2006-01-02 15:04"), strings.Join(k.Rules, ", "))
		}
		// Removed lists only points removed (or, dry, to be removed); a
		// skipped or failed VM's plan is in PlannedRemoved.
		verb := "removed"
		if res.DryRun {
			verb = "remove"
		}
		for _, r := range vm.Removed {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", verb, r.BackupID, r.Time.Local().Format("2006-01-02 15:04"), r.Reason)
		}
		for _, r := range vm.PlannedRemoved {
			fmt.Fprintf(tw, "  planned\t%s\t%s\t%s\n", r.BackupID, r.Time.Local().Format("2006-01-02 15:04"), r.Reason)
		}
		for _, m := range vm.Merged {
			into := "a full image"
			if m.Base != "" {
				into = "an image on " + m.Base
			}
			fmt.Fprintf(tw, "  merged\t%s\tdisk %d\tinto %s (%s, %s)\n", m.BackupID, m.Key, into, m.Method, units.Bytes(m.SizeBytes))
		}
		switch {
		case vm.Status == workflows.PruneStatusSkipped:
			fmt.Fprintf(tw, "  skipped: %s\n", vm.Error)
		case vm.Status == workflows.PruneStatusFailed:
			fmt.Fprintf(tw, "  failed: %s\n", vm.Error)
		case len(vm.Removed) == 0:
			fmt.Fprintf(tw, "  nothing to remove\n")
		case res.DryRun:
			fmt.Fprintf(tw, "  would free about %s\n", units.Bytes(vm.BytesToFree))
		default:
			fmt.Fprintf(tw, "  freed %s\n", units.Bytes(vm.BytesFreed))
		}
	}
	tw.Flush()
	if !res.DryRun {
		fmt.Fprintf(e.stdout, "prune: %s freed\n", units.Bytes(res.BytesFreed))
	}
	for _, msg := range res.Errors {
		fmt.Fprintf(e.stderr, "prune: %s\n", msg)
	}
}
