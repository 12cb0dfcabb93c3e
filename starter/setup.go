package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"
)

func init() {
	commands["setup"] = command{summary: "create or update the schedules cbtflow needs (the snapshot sweeper, the daily prune)", run: setupCmd}
	commands["sweep"] = command{summary: "remove abandoned cbtflow snapshots and partial backups now", run: sweepCmd}
}

func setupCmd(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "setup")
	var cfg config.Config
	cfg.Register(fs)
	every := fs.Duration("sweep-every", 15*time.Minute, "how often the sweeper runs")
	minAge := fs.Duration("sweep-min-age", workflows.DefaultSweepMinAge, "how old an abandoned snapshot must be before the sweeper removes it")
	pruneEvery := fs.Duration("prune-every", 24*time.Hour, "how often the retention policies are applied (starter prune)")
	if err := parse(fs, args); err != nil {
		return usageError{err}
	}
	if *every <= 0 || *minAge <= 0 || *pruneEvery <= 0 {
		return usageError{errors.New("setup: --sweep-every, --sweep-min-age and --prune-every must be positive")}
	}
	c, err := dialTemporal(ctx, e, &cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	sc := c.ScheduleClient()
	err = ensureSchedule(ctx, e, sc, workflows.SweeperScheduleID,
		client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: *every}}},
		&client.ScheduleWorkflowAction{
			ID:        "cbtflow-sweep",
			Workflow:  workflows.Sweep,
			Args:      []any{workflows.SweepInput{MinAgeSeconds: int64(minAge.Seconds())}},
			TaskQueue: workflows.TaskQueue,
		},
		"removes cbtflow snapshots and partial backups that no running backup owns",
		"every", every.String(), "min_age", minAge.String())
	if err != nil {
		return err
	}
	return ensureSchedule(ctx, e, sc, workflows.PruneScheduleID,
		client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: *pruneEvery}}},
		&client.ScheduleWorkflowAction{
			ID:        "cbtflow-prune",
			Workflow:  workflows.Prune,
			Args:      []any{workflows.PruneInput{}},
			TaskQueue: workflows.TaskQueue,
		},
		"applies the retention policies (starter retention) to every VM's restore points",
		"every", pruneEvery.String())
}

// ensureSchedule creates the schedule id, or brings an existing one up to
// date: set-up is idempotent. A run still going when the next is due is
// not doubled (overlap: skip).
func ensureSchedule(ctx context.Context, e *env, sc client.ScheduleClient, id string, spec client.ScheduleSpec,
	action *client.ScheduleWorkflowAction, note string, logArgs ...any) error {
	_, err := sc.Create(ctx, client.ScheduleOptions{
		ID:      id,
		Spec:    spec,
		Action:  action,
		Overlap: enumspb.SCHEDULE_OVERLAP_POLICY_SKIP,
		Note:    note,
	})
	if err == nil {
		e.log.Info("schedule created", append([]any{"schedule", id}, logArgs...)...)
		return nil
	}
	h := sc.GetHandle(ctx, id)
	if _, derr := h.Describe(ctx); derr != nil {
		return fmt.Errorf("setup: create schedule %s: %w", id, err)
	}
	err = h.Update(ctx, client.ScheduleUpdateOptions{DoUpdate: func(in client.ScheduleUpdateInput) (*client.ScheduleUpdate, error) {
		s := in.Description.Schedule
		s.Spec = &spec
		s.Action = action
		if s.Policy == nil {
			s.Policy = &client.SchedulePolicies{}
		}
		s.Policy.Overlap = enumspb.SCHEDULE_OVERLAP_POLICY_SKIP
		return &client.ScheduleUpdate{Schedule: &s}, nil
	}})
	if err != nil {
		return fmt.Errorf("setup: update schedule %s: %w", id, err)
	}
	e.log.Info("schedule updated", append([]any{"schedule", id}, logArgs...)...)
	return nil
}

func sweepCmd(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "sweep")
	var cfg config.Config
	cfg.Register(fs)
	minAge := fs.Duration("min-age", workflows.DefaultSweepMinAge, "leave snapshots and backups younger than this alone (0: none)")
	if err := parse(fs, args); err != nil {
		return usageError{err}
	}
	c, err := dialTemporal(ctx, e, &cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	in := workflows.SweepInput{MinAgeSeconds: int64(minAge.Seconds())}
	if *minAge <= 0 {
		in.MinAgeSeconds = -1
	}
	run, err := c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: "cbtflow-sweep-" + randomID(), TaskQueue: workflows.TaskQueue}, workflows.Sweep, in)
	if err != nil {
		return fmt.Errorf("sweep: start: %w", err)
	}
	var res workflows.SweepResult
	if err := run.Get(ctx, &res); err != nil {
		return fmt.Errorf("sweep: %s", failureMessage(err))
	}
	if err := json.NewEncoder(e.stdout).Encode(res); err != nil {
		return err
	}
	if len(res.Errors) > 0 {
		return exitError{code: 1, err: fmt.Errorf("sweep: %d errors", len(res.Errors)), quiet: true}
	}
	return nil
}
