package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"

	"github.com/cbtflow/cbtflow/internal/units"
)

func newSetupCmd(e *env) *cobra.Command {
	var cfg config.Config
	var every, minAge, pruneEvery, verifyEvery time.Duration
	cmd := &cobra.Command{
		Use:   "setup",
		Short: "create or update the schedules cbtflow needs (the snapshot sweeper, the daily prune, the weekly verification)",
		Long: `Create or update the schedules cbtflow needs: the snapshot sweeper
(cbtflow-sweeper), the daily prune (cbtflow-prune) and the weekly
verification of every VM's newest restore point (cbtflow-verify).
Idempotent.`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return setupRun(cmd.Context(), e, &cfg, every, minAge, pruneEvery, verifyEvery)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	fs := cmd.Flags()
	fs.DurationVar(&every, "sweep-every", 15*time.Minute, "how often the sweeper runs")
	fs.DurationVar(&minAge, "sweep-min-age", workflows.DefaultSweepMinAge, "how old an abandoned snapshot must be before the sweeper removes it")
	fs.DurationVar(&pruneEvery, "prune-every", 24*time.Hour, "how often the retention policies are applied (starter prune)")
	fs.DurationVar(&verifyEvery, "verify-every", 7*24*time.Hour, "how often the newest restore point of every VM is verified (starter verify --all)")
	return cmd
}

func newSweepCmd(e *env) *cobra.Command {
	var cfg config.Config
	var minAge time.Duration
	cmd := &cobra.Command{
		Use:   "sweep",
		Short: "remove abandoned cbtflow snapshots and partial backups now",
		Long: `Sweep now: remove abandoned cbtflow-* snapshots and partial backups that
no running backup owns. Prints the Sweep workflow's result as one JSON
object; exits 1 when a vCenter could not be swept.`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return sweepRun(cmd.Context(), e, &cfg, minAge)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	cmd.Flags().DurationVar(&minAge, "min-age", workflows.DefaultSweepMinAge, "leave snapshots and backups younger than this alone (0: none)")
	return cmd
}

func setupRun(ctx context.Context, e *env, cfg *config.Config, every, minAge, pruneEvery, verifyEvery time.Duration) error {
	if every <= 0 || minAge <= 0 || pruneEvery <= 0 || verifyEvery <= 0 {
		return usageError{errors.New("setup: --sweep-every, --sweep-min-age, --prune-every and --verify-every must be positive")}
	}
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	sc := c.ScheduleClient()
	err = ensureSchedule(ctx, e, sc, workflows.SweeperScheduleID,
		client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: every}}},
		&client.ScheduleWorkflowAction{
			ID:        "cbtflow-sweep",
			Workflow:  workflows.Sweep,
			Args:      []any{workflows.SweepInput{MinAgeSeconds: int64(minAge.Seconds())}},
			TaskQueue: workflows.TaskQueue,
		},
		"removes cbtflow snapshots and partial backups that no running backup owns",
		"every", units.Duration(every), "min_age", units.Duration(minAge))
	if err != nil {
		return err
	}
	err = ensureSchedule(ctx, e, sc, workflows.PruneScheduleID,
		client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: pruneEvery}}},
		&client.ScheduleWorkflowAction{
			ID:        "cbtflow-prune",
			Workflow:  workflows.Prune,
			Args:      []any{workflows.PruneInput{}},
			TaskQueue: workflows.TaskQueue,
		},
		"applies the retention policies (starter retention) to every VM's restore points",
		"every", units.Duration(pruneEvery))
	if err != nil {
		return err
	}
	return ensureSchedule(ctx, e, sc, workflows.VerifyScheduleID,
		client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: verifyEvery}}},
		&client.ScheduleWorkflowAction{
			ID:        "cbtflow-verify",
			Workflow:  workflows.Verify,
			Args:      []any{workflows.VerifyInput{All: true}},
			TaskQueue: workflows.TaskQueue,
		},
		"verifies the newest restore point of every VM against the block digests recorded at backup time (starter verify --all)",
		"every", units.Duration(verifyEvery))
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

func sweepRun(ctx context.Context, e *env, cfg *config.Config, minAge time.Duration) error {
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	in := workflows.SweepInput{MinAgeSeconds: int64(minAge.Seconds())}
	if minAge <= 0 {
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
