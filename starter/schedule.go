package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"
)

// Backup schedules are named after the VM as given; their IDs carry this
// prefix so `schedule list` tells them from cbtflow's own (the sweeper).
const backupSchedulePrefix = "backup-"

func newScheduleCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "schedule",
		Short: "manage Temporal schedules of VM backups (add, list, delete)",
	}
	cmd.AddCommand(newScheduleAddCmd(e), newScheduleListCmd(e), newScheduleDeleteCmd(e))
	return cmd
}

// backupScheduleID is the schedule ID of a VM's backups. Temporal IDs take
// any string; the VM is named as the operator named it, resolved at each
// run by the Backup workflow. Without a profile (the worker's default at
// each run) the ID is backup-/VM: profile names never start with '/'.
func backupScheduleID(profile, vm string) string {
	return backupSchedulePrefix + profile + "/" + vm
}

func newScheduleAddCmd(e *env) *cobra.Command {
	var cfg config.Config
	var profile *string
	var every, offset time.Duration
	var mode string
	cmd := &cobra.Command{
		Use:   "add VM",
		Short: "back up a VM on a schedule",
		Args:  exactArgs(1, "exactly one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return scheduleAdd(cmd.Context(), e, &cfg, args[0], *profile, every, offset, mode)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	fs := cmd.Flags()
	profile = profileFlag(fs)
	fs.DurationVar(&every, "every", 24*time.Hour, "interval between backups")
	fs.DurationVar(&offset, "offset", 0, "offset of the runs within the interval (e.g. 2h with --every 24h: 02:00 UTC)")
	fs.StringVar(&mode, "mode", workflows.ModeAuto, "auto or full")
	return cmd
}

func scheduleAdd(ctx context.Context, e *env, cfg *config.Config, vm, profile string, every, offset time.Duration, mode string) error {
	pos := []string{vm}
	if every < time.Minute {
		return usageError{fmt.Errorf("schedule add: --every %s is shorter than a minute", every)}
	}
	if mode != workflows.ModeAuto && mode != workflows.ModeFull {
		return usageError{fmt.Errorf("schedule add: --mode %q: a schedule backs up in auto or full mode", mode)}
	}
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	id := backupScheduleID(profile, pos[0])
	_, err = c.ScheduleClient().Create(ctx, client.ScheduleOptions{
		ID:   id,
		Spec: client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: every, Offset: offset}}},
		Action: &client.ScheduleWorkflowAction{
			ID:        "scheduled-" + id,
			Workflow:  workflows.Backup,
			Args:      []any{workflows.BackupInput{VM: pos[0], Profile: profile, Mode: mode}},
			TaskQueue: workflows.TaskQueue,
		},
		// A backup still running when the next is due: skip the new one.
		// One VM never has two backups at once anyway (its workflow ID).
		Overlap: enumspb.SCHEDULE_OVERLAP_POLICY_SKIP,
		Note:    fmt.Sprintf("cbtflow: back up VM %s (profile %s) every %s", pos[0], cmp.Or(profile, "the worker's default"), humanDuration(every)),
	})
	if err != nil {
		return fmt.Errorf("schedule add: %s: %w", id, err)
	}
	e.log.Info("schedule created", "schedule", id, "every", humanDuration(every))
	fmt.Fprintln(e.stdout, id)
	return nil
}

type scheduleEntry struct {
	ID      string    `json:"id"`
	VM      string    `json:"vm"`
	Profile string    `json:"profile"`
	Paused  bool      `json:"paused"`
	Next    time.Time `json:"next_run,omitempty"`
	Note    string    `json:"note,omitempty"`
}

func newScheduleListCmd(e *env) *cobra.Command {
	var cfg config.Config
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "list the backup schedules",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return scheduleList(cmd.Context(), e, &cfg, asJSON)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON array")
	return cmd
}

func scheduleList(ctx context.Context, e *env, cfg *config.Config, asJSON bool) error {
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	it, err := c.ScheduleClient().List(ctx, client.ScheduleListOptions{})
	if err != nil {
		return fmt.Errorf("schedule list: %w", err)
	}
	entries := []scheduleEntry{}
	for it.HasNext() {
		s, err := it.Next()
		if err != nil {
			return fmt.Errorf("schedule list: %w", err)
		}
		rest, ok := strings.CutPrefix(s.ID, backupSchedulePrefix)
		if !ok {
			continue
		}
		profile, vm, _ := strings.Cut(rest, "/")
		en := scheduleEntry{ID: s.ID, VM: vm, Profile: profile, Paused: s.Paused, Note: s.Note}
		if len(s.NextActionTimes) > 0 {
			en.Next = s.NextActionTimes[0].UTC()
		}
		entries = append(entries, en)
	}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(entries)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SCHEDULE\tVM\tPROFILE\tPAUSED\tNEXT RUN")
	for _, en := range entries {
		next := "-"
		if !en.Next.IsZero() {
			next = en.Next.Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\n", en.ID, en.VM, cmp.Or(en.Profile, "(default)"), en.Paused, next)
	}
	return tw.Flush()
}

func newScheduleDeleteCmd(e *env) *cobra.Command {
	var cfg config.Config
	var profile *string
	cmd := &cobra.Command{
		Use:   "delete VM",
		Short: "delete a VM's backup schedule",
		Args:  exactArgs(1, "exactly one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return scheduleDelete(cmd.Context(), e, &cfg, args[0], *profile)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	profile = profileFlag(cmd.Flags())
	return cmd
}

func scheduleDelete(ctx context.Context, e *env, cfg *config.Config, vm, profile string) error {
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	id := backupScheduleID(profile, vm)
	if err := c.ScheduleClient().GetHandle(ctx, id).Delete(ctx); err != nil {
		return fmt.Errorf("schedule delete: %s: %w", id, err)
	}
	e.log.Info("schedule deleted", "schedule", id)
	return nil
}
