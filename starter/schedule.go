package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	commonpb "go.temporal.io/api/common/v1"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/converter"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/cbtflow/cbtflow/workflows"

	"github.com/cbtflow/cbtflow/internal/units"
)

// Backup schedules are named after the VM as given; their IDs carry this
// prefix so `schedule list` tells them from cbtflow's own (the sweeper).
const backupSchedulePrefix = "backup-"

func newScheduleCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "schedule",
		Short: "manage Temporal schedules of VM backups (add, update, pause, trigger, describe, list, delete)",
		Long: `Back up VMs on Temporal schedules. A VM's schedule has the ID
backup-<profile>/<VM> (backup-/<VM> without a profile: each run then uses
the worker's default profile). Each run starts the Backup workflow, which
resolves the VM; a run never overlaps a backup of the same VM, however
that one was started: a run due while one runs is skipped (it ends with
"skipped" and starts nothing).`,
	}
	cmd.AddCommand(newScheduleAddCmd(e), newScheduleUpdateCmd(e), newSchedulePauseCmd(e, true), newSchedulePauseCmd(e, false),
		newScheduleTriggerCmd(e), newScheduleDescribeCmd(e), newScheduleListCmd(e), newScheduleDeleteCmd(e))
	return cmd
}

// backupScheduleID is the schedule ID of a VM's backups. Temporal IDs take
// any string; the VM is named as the operator named it, resolved at each
// run by the Backup workflow. Without a profile (the worker's default at
// each run) the ID is backup-/VM: profile names never start with '/'.
func backupScheduleID(profile, vm string) string {
	return backupSchedulePrefix + profile + "/" + vm
}

// specFlags are the flags of a schedule's timing and of its backups.
type specFlags struct {
	every, offset time.Duration
	cron          string
	mode          string
	fullEvery     int
}

func (f *specFlags) register(cmd *cobra.Command, add bool) {
	fs := cmd.Flags()
	every := "interval between backups (at least 1m)"
	if add {
		every += "; 24h unless --cron is given"
	}
	fs.DurationVar(&f.every, "every", 24*time.Hour, every)
	fs.DurationVar(&f.offset, "offset", 0, "offset of the runs within the --every interval, from the Unix epoch (e.g. 2h with --every 24h: 02:00 UTC)")
	fs.StringVar(&f.cron, "cron", "", "run at the times of a cron `expression` (UTC), e.g. \"30 2 * * *\" or \"0 3 * * 1-5\" (Monday to Friday), instead of --every")
	fs.StringVar(&f.mode, "mode", workflows.ModeAuto, "auto or full")
	fullEvery := "every `N`-th backup of each disk is a full one (N >= 1; default: the retention policy's max-chain)"
	if !add {
		fullEvery = "every `N`-th backup of each disk is a full one (N >= 1; 0: back to the retention policy's max-chain)"
	}
	fs.IntVar(&f.fullEvery, "full-every", 0, fullEvery)
}

// check validates the flags that were given (all of them for add).
func (f *specFlags) check(cmd *cobra.Command, add bool) error {
	changed := cmd.Flags().Changed
	name := prefix(cmd)
	if changed("every") && changed("cron") {
		return usageError{fmt.Errorf("%sgive --every or --cron, not both", name)}
	}
	if changed("offset") && changed("cron") {
		return usageError{fmt.Errorf("%s--offset is for --every; a --cron expression says the times itself", name)}
	}
	if (add || changed("every")) && !changed("cron") && f.every < time.Minute {
		return usageError{fmt.Errorf("%s--every %s is shorter than a minute", name, units.Duration(f.every))}
	}
	if f.offset < 0 || (changed("offset") && changed("every") && f.offset >= f.every) || (add && f.offset >= f.every && !changed("cron")) {
		return usageError{fmt.Errorf("%s--offset %s: must be at least 0 and less than --every %s", name, units.Duration(f.offset), units.Duration(f.every))}
	}
	if changed("cron") {
		if err := checkCron(f.cron); err != nil {
			return usageError{fmt.Errorf("%s--cron %q: %v", name, f.cron, err)}
		}
	}
	if (add || changed("mode")) && f.mode != workflows.ModeAuto && f.mode != workflows.ModeFull {
		return usageError{fmt.Errorf("%s--mode %q: a schedule backs up in auto or full mode", name, f.mode)}
	}
	if changed("full-every") && (f.fullEvery < 1 && (add || f.fullEvery != 0)) {
		return usageError{fmt.Errorf("%s--full-every %d: give 1 or more (1: every backup is full)", name, f.fullEvery)}
	}
	return nil
}

// checkCron catches what is plainly not a cron expression before Temporal
// parses it (it says why in its own words, checkCronError): 5 fields
// (minute hour day-of-month month day-of-week), 6 or 7 (with seconds
// first, years last), or a macro such as @daily.
func checkCron(expr string) error {
	fields := strings.Fields(expr)
	switch {
	case len(fields) == 0:
		return errors.New("empty expression")
	case strings.HasPrefix(fields[0], "@"):
		switch fields[0] {
		case "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly":
			if len(fields) == 1 {
				return nil
			}
		case "@every":
			if len(fields) == 2 {
				return nil
			}
		}
		return errors.New("not a macro Temporal knows (@yearly, @monthly, @weekly, @daily, @hourly, @every D)")
	case len(fields) < 5 || len(fields) > 7:
		return fmt.Errorf("%d fields; a cron expression has 5: minute hour day-of-month month day-of-week (or 6-7, with seconds first and years last)", len(fields))
	}
	for _, f := range fields {
		for _, r := range f {
			if !strings.ContainsRune("0123456789*/,-?LW#abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", r) {
				return fmt.Errorf("field %q has the character %q", f, r)
			}
		}
	}
	return nil
}

// cronError turns Temporal's refusal of a cron expression into a usage
// error naming it.
func cronError(cmd *cobra.Command, expr string, err error) error {
	var invalid *serviceerror.InvalidArgument
	if expr != "" && errors.As(err, &invalid) {
		return usageError{fmt.Errorf("%s--cron %q: Temporal refuses it: %s", prefix(cmd), expr, invalid.Message)}
	}
	return err
}

// spec is the schedule spec the flags give: an interval, or a cron
// expression.
func (f *specFlags) spec(useCron bool) client.ScheduleSpec {
	if useCron {
		return client.ScheduleSpec{CronExpressions: []string{f.cron}}
	}
	return client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: f.every, Offset: f.offset}}}
}

// backupAction is what each run of a VM's schedule starts: the Backup
// workflow, which ends with "skipped" (starting nothing) when a backup of
// the VM runs already, however that one was started.
func backupAction(id string, in workflows.BackupInput) *client.ScheduleWorkflowAction {
	in.SkipIfRunning = true
	return &client.ScheduleWorkflowAction{
		ID:        "scheduled-" + id,
		Workflow:  workflows.Backup,
		Args:      []any{in},
		TaskQueue: workflows.TaskQueue,
	}
}

func newScheduleAddCmd(e *env) *cobra.Command {
	var cfg config.Config
	var profile *string
	var f specFlags
	var noCheck bool
	cmd := &cobra.Command{
		Use:   "add VM [--every D [--offset D] | --cron EXPR] [--mode auto|full] [--full-every N]",
		Short: "back up a VM on a schedule",
		Long: `Back up a VM on a schedule: every --every (24h by default), at --offset
within the interval, or at the times of a --cron expression (UTC).

The VM must exist: the worker looks it up the way a backup resolves it
(name, inventory path or moref, under --profile or the worker's default
profile; the LookupVM workflow), so the starter needs no vCenter access.
An unknown VM creates nothing (exit 1). --no-check skips the check.`,
		Example: `  starter schedule add DC0_H0_VM0 --every 24h --offset 2h
  starter schedule add DC0_H0_VM0 --cron "30 1 * * 1-5" --full-every 7`,
		Args: exactArgs(1, "exactly one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := f.check(cmd, true); err != nil {
				return err
			}
			return scheduleAdd(cmd, e, &cfg, args[0], *profile, f, noCheck)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	profile = profileFlag(cmd.Flags())
	f.register(cmd, true)
	cmd.Flags().BoolVar(&noCheck, "no-check", false, "create the schedule without checking that the VM exists")
	return cmd
}

func scheduleAdd(cmd *cobra.Command, e *env, cfg *config.Config, vm, profile string, f specFlags, noCheck bool) error {
	ctx := cmd.Context()
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	if !noCheck {
		if err := checkVMExists(ctx, e, c, vm, profile); err != nil {
			return fmt.Errorf("schedule add: %w: nothing created", err)
		}
	}
	id := backupScheduleID(profile, vm)
	in := workflows.BackupInput{VM: vm, Profile: profile, Mode: f.mode, FullEvery: f.fullEvery}
	useCron := cmd.Flags().Changed("cron")
	spec := f.spec(useCron)
	_, err = c.ScheduleClient().Create(ctx, client.ScheduleOptions{
		ID:     id,
		Spec:   spec,
		Action: backupAction(id, in),
		// A run due while the schedule's previous run goes on is skipped;
		// one due while a backup started otherwise runs ends skipped
		// (BackupInput.SkipIfRunning).
		Overlap: enumspb.SCHEDULE_OVERLAP_POLICY_SKIP,
		Note:    fmt.Sprintf("cbtflow: back up VM %s (profile %s)", vm, cmp.Or(profile, "the worker's default")),
	})
	if err != nil {
		var usage usageError
		if uerr := cronError(cmd, f.cron, err); errors.As(uerr, &usage) {
			return uerr
		}
		var exists *serviceerror.WorkflowExecutionAlreadyStarted
		if errors.As(err, &exists) {
			return fmt.Errorf("schedule add: %s exists already: change it with starter schedule update", id)
		}
		return fmt.Errorf("schedule add: %s: %w", id, err)
	}
	e.log.Info("schedule created", "schedule", id, "spec", specText(&spec), "mode", f.mode, "full_every", f.fullEvery)
	fmt.Fprintln(e.stdout, id)
	return nil
}

func newScheduleUpdateCmd(e *env) *cobra.Command {
	var cfg config.Config
	var profile *string
	var f specFlags
	cmd := &cobra.Command{
		Use:   "update VM [--every D | --cron EXPR] [--offset D] [--mode auto|full] [--full-every N]",
		Short: "change a VM's backup schedule",
		Long: `Change a VM's backup schedule: only what the flags give changes. --every
or --cron replaces the timing (--offset alone moves the runs of an --every
schedule); --mode and --full-every change the backups the runs start.`,
		Example: `  starter schedule update DC0_H0_VM0 --every 12h --offset 1h
  starter schedule update DC0_H0_VM0 --cron "0 3 * * *" --mode full`,
		Args: exactArgs(1, "exactly one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := f.check(cmd, false); err != nil {
				return err
			}
			changed := false
			for _, n := range []string{"every", "offset", "cron", "mode", "full-every"} {
				changed = changed || cmd.Flags().Changed(n)
			}
			if !changed {
				return usageError{errors.New("schedule update: give what to change: --every, --offset, --cron, --mode or --full-every")}
			}
			return scheduleUpdate(cmd, e, &cfg, args[0], *profile, f)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	profile = profileFlag(cmd.Flags())
	f.register(cmd, false)
	return cmd
}

func scheduleUpdate(cmd *cobra.Command, e *env, cfg *config.Config, vm, profile string, f specFlags) error {
	ctx := cmd.Context()
	changed := cmd.Flags().Changed
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	id := backupScheduleID(profile, vm)
	h := c.ScheduleClient().GetHandle(ctx, id)
	var newSpec *client.ScheduleSpec
	err = h.Update(ctx, client.ScheduleUpdateOptions{DoUpdate: func(u client.ScheduleUpdateInput) (*client.ScheduleUpdate, error) {
		s := u.Description.Schedule
		switch {
		case changed("cron"):
			sp := f.spec(true)
			s.Spec = &sp
		case changed("every"):
			if !changed("offset") && s.Spec != nil && len(s.Spec.Intervals) == 1 && s.Spec.Intervals[0].Offset < f.every {
				f.offset = s.Spec.Intervals[0].Offset // keep the runs' offset
			}
			if f.offset >= f.every {
				return nil, usageError{fmt.Errorf("schedule update: --offset %s: must be less than --every %s", units.Duration(f.offset), units.Duration(f.every))}
			}
			sp := f.spec(false)
			s.Spec = &sp
		case changed("offset"):
			if s.Spec == nil || len(s.Spec.Intervals) != 1 || len(s.Spec.Calendars) > 0 || len(s.Spec.CronExpressions) > 0 {
				return nil, usageError{fmt.Errorf("schedule update: --offset moves the runs of an --every schedule; %s runs %s: give --every too", id, specText(s.Spec))}
			}
			if f.offset >= s.Spec.Intervals[0].Every {
				return nil, usageError{fmt.Errorf("schedule update: --offset %s: must be less than the interval, %s", units.Duration(f.offset), units.Duration(s.Spec.Intervals[0].Every))}
			}
			s.Spec.Intervals[0].Offset = f.offset
		}
		newSpec = s.Spec
		if changed("mode") || changed("full-every") {
			in, err := actionInput(s.Action)
			if err != nil {
				return nil, fmt.Errorf("schedule update: %s: %w", id, err)
			}
			if changed("mode") {
				in.Mode = f.mode
			}
			if changed("full-every") {
				in.FullEvery = f.fullEvery
			}
			s.Action = backupAction(id, in)
		} else if in, err := actionInput(s.Action); err == nil && !in.SkipIfRunning {
			// A schedule made before runs skipped a running backup.
			s.Action = backupAction(id, in)
		}
		if s.Policy == nil {
			s.Policy = &client.SchedulePolicies{}
		}
		s.Policy.Overlap = enumspb.SCHEDULE_OVERLAP_POLICY_SKIP
		return &client.ScheduleUpdate{Schedule: &s}, nil
	}})
	if err != nil {
		var usage usageError
		if errors.As(err, &usage) {
			return usage
		}
		if uerr := cronError(cmd, f.cron, err); errors.As(uerr, &usage) {
			return uerr
		}
		return scheduleErr("schedule update", id, err)
	}
	e.log.Info("schedule updated", "schedule", id, "spec", specText(newSpec))
	fmt.Fprintln(e.stdout, id)
	return nil
}

// scheduleErr names the schedule in err, and says so plainly when it
// does not exist.
func scheduleErr(verb, id string, err error) error {
	var nf *serviceerror.NotFound
	if errors.As(err, &nf) {
		return fmt.Errorf("%s: no schedule %s (starter schedule list shows them)", verb, id)
	}
	return fmt.Errorf("%s: %s: %w", verb, id, err)
}

// actionInput is the BackupInput a schedule's runs start with.
func actionInput(a client.ScheduleAction) (workflows.BackupInput, error) {
	var in workflows.BackupInput
	wa, ok := a.(*client.ScheduleWorkflowAction)
	if !ok || len(wa.Args) != 1 {
		return in, errors.New("its action is not a cbtflow backup")
	}
	switch arg := wa.Args[0].(type) {
	case *commonpb.Payload:
		if err := converter.GetDefaultDataConverter().FromPayload(arg, &in); err != nil {
			return in, fmt.Errorf("its backup input: %w", err)
		}
	case workflows.BackupInput:
		in = arg
	default:
		return in, fmt.Errorf("its action's argument is a %T", arg)
	}
	return in, nil
}

func newSchedulePauseCmd(e *env, pause bool) *cobra.Command {
	var cfg config.Config
	var profile *string
	var note string
	name, short := "pause", "pause a VM's backup schedule (no runs until unpaused)"
	if !pause {
		name, short = "unpause", "resume a paused backup schedule"
	}
	cmd := &cobra.Command{
		Use:   name + " VM [--note TEXT]",
		Short: short,
		Args:  exactArgs(1, "exactly one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			c, err := dialTemporal(ctx, e, &cfg)
			if err != nil {
				return err
			}
			defer c.Close()
			id := backupScheduleID(*profile, args[0])
			h := c.ScheduleClient().GetHandle(ctx, id)
			if pause {
				err = h.Pause(ctx, client.SchedulePauseOptions{Note: cmp.Or(note, "paused by starter schedule pause")})
			} else {
				err = h.Unpause(ctx, client.ScheduleUnpauseOptions{Note: cmp.Or(note, "unpaused by starter schedule unpause")})
			}
			if err != nil {
				return scheduleErr("schedule "+name, id, err)
			}
			e.log.Info("schedule "+name+"d", "schedule", id, "note", note)
			fmt.Fprintln(e.stdout, id)
			return nil
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	profile = profileFlag(cmd.Flags())
	cmd.Flags().StringVar(&note, "note", "", "why (shown by schedule describe and the Web UI)")
	return cmd
}

func newScheduleTriggerCmd(e *env) *cobra.Command {
	var cfg config.Config
	var profile *string
	cmd := &cobra.Command{
		Use:   "trigger VM",
		Short: "run a VM's scheduled backup now",
		Long: `Run a VM's scheduled backup now, paused or not. Like any run of the
schedule it never overlaps a backup of the VM: while one runs (started by
the schedule or otherwise) the run starts nothing and ends "skipped".`,
		Args: exactArgs(1, "exactly one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			c, err := dialTemporal(ctx, e, &cfg)
			if err != nil {
				return err
			}
			defer c.Close()
			id := backupScheduleID(*profile, args[0])
			if err := c.ScheduleClient().GetHandle(ctx, id).Trigger(ctx, client.ScheduleTriggerOptions{Overlap: enumspb.SCHEDULE_OVERLAP_POLICY_SKIP}); err != nil {
				return scheduleErr("schedule trigger", id, err)
			}
			e.log.Info("schedule triggered", "schedule", id)
			fmt.Fprintln(e.stdout, id)
			return nil
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	profile = profileFlag(cmd.Flags())
	return cmd
}

// scheduleEntry is a backup schedule as list and describe show it (the
// JSON of `schedule list --json`, and of describe with runs).
type scheduleEntry struct {
	ID      string    `json:"id"`
	VM      string    `json:"vm"`
	Profile string    `json:"profile"`
	Paused  bool      `json:"paused"`
	Next    time.Time `json:"next_run,omitempty"`
	Note    string    `json:"note,omitempty"`
	// Spec says when it runs: "every 24h at +2h", or "cron 30 2 * * *".
	Spec string `json:"spec"`
	// Every and Offset (Go durations, e.g. "24h0m0s") are set for an
	// interval, Cron for calendar times.
	Every     string `json:"every,omitempty"`
	Offset    string `json:"offset,omitempty"`
	Cron      string `json:"cron,omitempty"`
	Mode      string `json:"mode,omitempty"`
	FullEvery int    `json:"full_every,omitempty"`
	// LastRun is the newest run (absent before the first).
	LastRun *scheduleRun `json:"last_run,omitempty"`
}

// scheduleRun is one run of a schedule and how it went: running,
// completed, skipped (a backup of the VM was running: nothing started),
// failed, canceled, terminated, timed_out, or unknown.
type scheduleRun struct {
	Time       time.Time `json:"time"`
	WorkflowID string    `json:"workflow_id"`
	RunID      string    `json:"run_id"`
	Outcome    string    `json:"outcome"`
	// Detail is why it failed or was skipped, or the backup ID it made.
	Detail string `json:"detail,omitempty"`
}

type scheduleDescribeOutput struct {
	scheduleEntry
	Overlap    string        `json:"overlap"`
	CreatedAt  time.Time     `json:"created_at"`
	UpdatedAt  *time.Time    `json:"updated_at,omitempty"`
	NumRuns    int           `json:"num_runs"`
	NextRuns   []time.Time   `json:"next_runs"`
	RecentRuns []scheduleRun `json:"recent_runs"`
}

func newScheduleListCmd(e *env) *cobra.Command {
	var cfg config.Config
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "list the backup schedules",
		Long: `List the backup schedules: when each runs ("every 24h at +2h", or the
cron expression), its next run, its last run's time and outcome
(running, completed, skipped, failed, canceled, terminated, timed_out),
and whether it is paused.

--json prints one array of {"id", "vm", "profile", "paused", "next_run",
"note", "spec", "every", "offset", "cron", "mode", "full_every",
"last_run": {"time", "workflow_id", "run_id", "outcome", "detail"}}.`,
		Args: exactArgs(0, "no arguments"),
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
		if !strings.HasPrefix(s.ID, backupSchedulePrefix) {
			continue
		}
		d, err := c.ScheduleClient().GetHandle(ctx, s.ID).Describe(ctx)
		var nf *serviceerror.NotFound
		if errors.As(err, &nf) {
			continue // deleted meanwhile
		}
		if err != nil {
			return fmt.Errorf("schedule list: %s: %w", s.ID, err)
		}
		en := describeEntry(s.ID, d)
		if n := len(d.Info.RecentActions); n > 0 {
			r := runOf(ctx, c, d.Info.RecentActions[n-1])
			en.LastRun = &r
		}
		entries = append(entries, en)
	}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(entries)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SCHEDULE\tVM\tPROFILE\tSPEC\tNEXT RUN\tLAST RUN\tOUTCOME\tPAUSED")
	for _, en := range entries {
		last, outcome := "-", "-"
		if en.LastRun != nil {
			last, outcome = en.LastRun.Time.Format(time.RFC3339), en.LastRun.Outcome
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", en.ID, en.VM, cmp.Or(en.Profile, "(default)"), en.Spec,
			timeOrDash(en.Next, en.Paused), last, outcome, yesNo(en.Paused))
	}
	return tw.Flush()
}

func timeOrDash(t time.Time, paused bool) string {
	if t.IsZero() || paused {
		return "-"
	}
	return t.Format(time.RFC3339)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// describeEntry is what list and describe show of a schedule.
func describeEntry(id string, d *client.ScheduleDescription) scheduleEntry {
	rest := strings.TrimPrefix(id, backupSchedulePrefix)
	profile, vm, _ := strings.Cut(rest, "/")
	en := scheduleEntry{ID: id, VM: vm, Profile: profile, Paused: d.Schedule.State.Paused, Note: d.Schedule.State.Note,
		Spec: specText(d.Schedule.Spec)}
	if sp := d.Schedule.Spec; sp != nil {
		switch {
		case len(sp.Intervals) == 1 && len(sp.Calendars) == 0 && len(sp.CronExpressions) == 0:
			en.Every, en.Offset = sp.Intervals[0].Every.String(), sp.Intervals[0].Offset.String()
		case len(sp.Calendars) > 0 || len(sp.CronExpressions) > 0:
			en.Cron = strings.TrimPrefix(en.Spec, "cron ")
		}
	}
	if len(d.Info.NextActionTimes) > 0 {
		en.Next = d.Info.NextActionTimes[0].UTC()
	}
	if in, err := actionInput(d.Schedule.Action); err == nil {
		en.Mode, en.FullEvery = in.Mode, in.FullEvery
		if en.VM == "" {
			en.VM = in.VM
		}
	}
	return en
}

// runOf says how a run of a schedule went: its workflow's status, and for
// a completed Backup whether it was skipped.
func runOf(ctx context.Context, c client.Client, a client.ScheduleActionResult) scheduleRun {
	r := scheduleRun{Time: a.ActualTime.UTC(), Outcome: "unknown"}
	if a.StartWorkflowResult == nil {
		return r
	}
	r.WorkflowID, r.RunID = a.StartWorkflowResult.WorkflowID, a.StartWorkflowResult.FirstExecutionRunID
	d, err := c.DescribeWorkflow(ctx, r.WorkflowID, r.RunID)
	if err != nil {
		r.Detail = err.Error()
		return r
	}
	switch st := d.RawResponse.GetWorkflowExecutionInfo().GetStatus(); st {
	case enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING:
		r.Outcome = "running"
	case enumspb.WORKFLOW_EXECUTION_STATUS_COMPLETED:
		r.Outcome = "completed"
		var res workflows.BackupResult
		if err := c.GetWorkflow(ctx, r.WorkflowID, r.RunID).Get(ctx, &res); err == nil {
			if res.Skipped != "" {
				r.Outcome, r.Detail = "skipped", res.Skipped
			} else if res.BackupID != "" {
				r.Detail = "backup " + res.BackupID
			}
		}
	case enumspb.WORKFLOW_EXECUTION_STATUS_FAILED:
		r.Outcome = "failed"
		if err := c.GetWorkflow(ctx, r.WorkflowID, r.RunID).Get(ctx, nil); err != nil {
			r.Detail = failureMessage(err)
		}
	case enumspb.WORKFLOW_EXECUTION_STATUS_CANCELED:
		r.Outcome = "canceled"
	case enumspb.WORKFLOW_EXECUTION_STATUS_TERMINATED:
		r.Outcome = "terminated"
	case enumspb.WORKFLOW_EXECUTION_STATUS_TIMED_OUT:
		r.Outcome = "timed_out"
	default:
		r.Outcome = strings.ToLower(strings.TrimPrefix(st.String(), "WORKFLOW_EXECUTION_STATUS_"))
	}
	return r
}

func newScheduleDescribeCmd(e *env) *cobra.Command {
	var cfg config.Config
	var profile *string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "describe VM [--json]",
		Short: "show a VM's backup schedule: when it runs, what it starts, its recent runs",
		Long: `Show a VM's backup schedule: when it runs, the backups it starts (mode,
--full-every), whether it is paused (and the note), its next runs and its
recent runs with their outcome (running, completed, skipped, failed, ...).

--json prints one object: the fields of schedule list --json, and
"overlap", "created_at", "updated_at", "num_runs", "next_runs" and
"recent_runs" (oldest first, each as "last_run").`,
		Args: exactArgs(1, "exactly one VM"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return scheduleDescribe(cmd.Context(), e, &cfg, args[0], *profile, asJSON)
		},
	}
	addConfigFlags(cmd, &cfg, useTemporal)
	profile = profileFlag(cmd.Flags())
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}

func scheduleDescribe(ctx context.Context, e *env, cfg *config.Config, vm, profile string, asJSON bool) error {
	c, err := dialTemporal(ctx, e, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	id := backupScheduleID(profile, vm)
	d, err := c.ScheduleClient().GetHandle(ctx, id).Describe(ctx)
	if err != nil {
		return scheduleErr("schedule describe", id, err)
	}
	out := scheduleDescribeOutput{scheduleEntry: describeEntry(id, d), CreatedAt: d.Info.CreatedAt.UTC(),
		NumRuns: d.Info.NumActions, NextRuns: []time.Time{}, RecentRuns: []scheduleRun{}}
	if !d.Info.LastUpdateAt.IsZero() {
		u := d.Info.LastUpdateAt.UTC()
		out.UpdatedAt = &u
	}
	out.Overlap = "skip"
	if p := d.Schedule.Policy; p != nil && p.Overlap != enumspb.SCHEDULE_OVERLAP_POLICY_SKIP && p.Overlap != enumspb.SCHEDULE_OVERLAP_POLICY_UNSPECIFIED {
		out.Overlap = strings.ToLower(strings.TrimPrefix(p.Overlap.String(), "SCHEDULE_OVERLAP_POLICY_"))
	}
	for _, t := range d.Info.NextActionTimes {
		out.NextRuns = append(out.NextRuns, t.UTC())
	}
	for _, a := range d.Info.RecentActions {
		out.RecentRuns = append(out.RecentRuns, runOf(ctx, c, a))
	}
	if n := len(out.RecentRuns); n > 0 {
		out.LastRun = &out.RecentRuns[n-1]
	}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(out)
	}
	w := e.stdout
	fmt.Fprintf(w, "schedule %s\n", out.ID)
	fmt.Fprintf(w, "  VM:         %s (profile %s)\n", out.VM, cmp.Or(out.Profile, "the worker's default"))
	fmt.Fprintf(w, "  runs:       %s\n", out.Spec)
	mode := out.Mode
	if out.FullEvery > 0 {
		mode += fmt.Sprintf(", every %s backup of each disk full", ordinal(out.FullEvery))
	}
	fmt.Fprintf(w, "  backups:    %s; a run due while a backup of the VM runs is skipped\n", mode)
	if out.Paused {
		fmt.Fprintf(w, "  paused:     yes (%s)\n", out.Note)
	} else {
		fmt.Fprintf(w, "  paused:     no\n")
	}
	next := "-"
	if len(out.NextRuns) > 0 && !out.Paused {
		var ts []string
		for _, t := range out.NextRuns {
			ts = append(ts, t.Format(time.RFC3339))
		}
		next = strings.Join(ts, ", ")
	}
	fmt.Fprintf(w, "  next runs:  %s\n", next)
	fmt.Fprintf(w, "  created:    %s; %d runs so far\n", out.CreatedAt.Format(time.RFC3339), out.NumRuns)
	if len(out.RecentRuns) == 0 {
		fmt.Fprintf(w, "  recent runs: none\n")
		return nil
	}
	fmt.Fprintf(w, "  recent runs:\n")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, r := range out.RecentRuns {
		fmt.Fprintf(tw, "    %s\t%s\t%s\t%s\n", r.Time.Format(time.RFC3339), r.Outcome, r.WorkflowID, r.Detail)
	}
	return tw.Flush()
}

func ordinal(n int) string {
	switch {
	case n == 1:
		return "1st (every)"
	case n%10 == 1 && n%100 != 11:
		return strconv.Itoa(n) + "st"
	case n%10 == 2 && n%100 != 12:
		return strconv.Itoa(n) + "nd"
	case n%10 == 3 && n%100 != 13:
		return strconv.Itoa(n) + "rd"
	}
	return strconv.Itoa(n) + "th"
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
		return scheduleErr("schedule delete", id, err)
	}
	e.log.Info("schedule deleted", "schedule", id)
	return nil
}
