package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"
)

// Backup schedules are named after the VM as given; their IDs carry this
// prefix so `schedule list` tells them from cbtflow's own (the sweeper).
const backupSchedulePrefix = "backup-"

func init() {
	commands["schedule"] = command{
		summary: "manage Temporal schedules of VM backups (add, list, delete)",
		run: func(ctx context.Context, e *env, args []string) error {
			return dispatch(ctx, e, "starter schedule", map[string]command{
				"add":    {"back up a VM on a schedule: schedule add VM --every 24h [--mode auto|full]", scheduleAdd},
				"list":   {"list the backup schedules", scheduleList},
				"delete": {"delete a VM's backup schedule: schedule delete VM", scheduleDelete},
			}, args)
		},
	}
}

// profileUsage is the help of every --profile flag.
const profileUsage = "vCenter `profile` (CBTFLOW_PROFILE); empty: the worker's default (its CBTFLOW_PROFILE, or its only profile)"

// backupScheduleID is the schedule ID of a VM's backups. Temporal IDs take
// any string; the VM is named as the operator named it, resolved at each
// run by the Backup workflow. Without a profile (the worker's default at
// each run) the ID is backup-/VM: profile names never start with '/'.
func backupScheduleID(profile, vm string) string {
	return backupSchedulePrefix + profile + "/" + vm
}

func scheduleAdd(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "schedule add")
	var cfg config.Config
	cfg.Register(fs)
	profile := fs.String("profile", config.Env("CBTFLOW_PROFILE", ""), profileUsage)
	every := fs.Duration("every", 24*time.Hour, "interval between backups")
	offset := fs.Duration("offset", 0, "offset of the runs within the interval (e.g. 2h with --every 24h: 02:00 UTC)")
	mode := fs.String("mode", workflows.ModeAuto, "auto or full")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return usageError{err}
	}
	if len(pos) != 1 {
		return usageError{errors.New("schedule add: give exactly one VM")}
	}
	if *every < time.Minute {
		return usageError{fmt.Errorf("schedule add: --every %s is shorter than a minute", *every)}
	}
	if *mode != workflows.ModeAuto && *mode != workflows.ModeFull {
		return usageError{fmt.Errorf("schedule add: --mode %q: a schedule backs up in auto or full mode", *mode)}
	}
	c, err := dialTemporal(ctx, e, &cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	id := backupScheduleID(*profile, pos[0])
	_, err = c.ScheduleClient().Create(ctx, client.ScheduleOptions{
		ID:   id,
		Spec: client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: *every, Offset: *offset}}},
		Action: &client.ScheduleWorkflowAction{
			ID:        "scheduled-" + id,
			Workflow:  workflows.Backup,
			Args:      []any{workflows.BackupInput{VM: pos[0], Profile: *profile, Mode: *mode}},
			TaskQueue: workflows.TaskQueue,
		},
		// A backup still running when the next is due: skip the new one.
		// One VM never has two backups at once anyway (its workflow ID).
		Overlap: enumspb.SCHEDULE_OVERLAP_POLICY_SKIP,
		Note:    fmt.Sprintf("cbtflow: back up VM %s (profile %s) every %s", pos[0], cmp.Or(*profile, "the worker's default"), *every),
	})
	if err != nil {
		return fmt.Errorf("schedule add: %s: %w", id, err)
	}
	e.log.Info("schedule created", "schedule", id, "every", every.String())
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

func scheduleList(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "schedule list")
	var cfg config.Config
	cfg.Register(fs)
	asJSON := fs.Bool("json", false, "print one JSON array")
	if err := parse(fs, args); err != nil {
		return usageError{err}
	}
	c, err := dialTemporal(ctx, e, &cfg)
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
	if *asJSON {
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

func scheduleDelete(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "schedule delete")
	var cfg config.Config
	cfg.Register(fs)
	profile := fs.String("profile", config.Env("CBTFLOW_PROFILE", ""), profileUsage)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return usageError{err}
	}
	if len(pos) != 1 {
		return usageError{errors.New("schedule delete: give exactly one VM")}
	}
	c, err := dialTemporal(ctx, e, &cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	id := backupScheduleID(*profile, pos[0])
	if err := c.ScheduleClient().GetHandle(ctx, id).Delete(ctx); err != nil {
		return fmt.Errorf("schedule delete: %s: %w", id, err)
	}
	e.log.Info("schedule deleted", "schedule", id)
	return nil
}
