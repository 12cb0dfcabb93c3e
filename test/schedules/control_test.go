package schedules

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"go.temporal.io/api/serviceerror"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

// describeJSON is `starter schedule describe VM --json`.
type describeJSON struct {
	ID         string    `json:"id"`
	VM         string    `json:"vm"`
	Profile    string    `json:"profile"`
	Paused     bool      `json:"paused"`
	Note       string    `json:"note"`
	Next       time.Time `json:"next_run"`
	Spec       string    `json:"spec"`
	Every      string    `json:"every"`
	Offset     string    `json:"offset"`
	Cron       string    `json:"cron"`
	Mode       string    `json:"mode"`
	FullEvery  int       `json:"full_every"`
	Overlap    string    `json:"overlap"`
	NumRuns    int       `json:"num_runs"`
	RecentRuns []runJSON `json:"recent_runs"`
	LastRun    *runJSON  `json:"last_run"`
}

type runJSON struct {
	Time       time.Time `json:"time"`
	WorkflowID string    `json:"workflow_id"`
	Outcome    string    `json:"outcome"`
	Detail     string    `json:"detail"`
}

type harness struct {
	t   *testing.T
	ctx context.Context
	s   *stack.Stack
}

func (h *harness) run(args ...string) stack.StarterResult {
	h.t.Helper()
	r, err := h.s.Starter(h.ctx, args...)
	if err != nil {
		h.t.Fatalf("starter %v: %v", args, err)
	}
	return r
}

func (h *harness) ok(args ...string) stack.StarterResult {
	h.t.Helper()
	r := h.run(args...)
	if r.ExitCode != 0 {
		h.t.Fatalf("starter %v: %s", args, r)
	}
	return r
}

func (h *harness) describe(vm string) describeJSON {
	h.t.Helper()
	r := h.ok("schedule", "describe", vm, "--json")
	var d describeJSON
	if err := stacktest.DecodeOne(r.Stdout, &d); err != nil {
		h.t.Fatalf("schedule describe %s --json: %v\n%s", vm, err, r.Stdout)
	}
	return d
}

// waitRuns waits until the schedule of vm has n runs, the last one ended,
// and returns its description.
func (h *harness) waitRuns(vm string, n int) describeJSON {
	h.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		d := h.describe(vm)
		if len(d.RecentRuns) >= n && d.LastRun != nil && d.LastRun.Outcome != "running" {
			return d
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("schedule of %s: %d runs, last %+v; want %d ended", vm, len(d.RecentRuns), d.LastRun, n)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func (h *harness) list(vm string) []stacktest.ListJSON {
	h.t.Helper()
	r := h.ok("list", vm, "--json")
	var out []stacktest.ListJSON
	if err := stacktest.DecodeOne(r.Stdout, &out); err != nil {
		h.t.Fatal(err)
	}
	return out
}

// Full control of a VM's schedule: an unknown VM gets none; update
// changes the spec (interval, offset, cron) and the backups' mode;
// pause and unpause; a trigger while a backup of the VM runs (started by
// `starter backup`) starts no second backup; --full-every 2 alternates
// full and incremental backups.
func TestScheduleControl(t *testing.T) {
	s := stacktest.New(t, stack.Options{FaultPoints: true})
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	h := &harness{t: t, ctx: ctx, s: s}
	sc := s.Client().ScheduleClient()

	t.Log("an unknown VM: no schedule")
	r := h.run("schedule", "add", "NOPE_VM", "--every", "1h")
	t.Logf("schedule add NOPE_VM: %s", r.Stderr)
	if r.ExitCode != 1 || !strings.Contains(r.Stderr, `"NOPE_VM"`) || !strings.Contains(r.Stderr, "not found") || !strings.Contains(r.Stderr, "nothing created") {
		t.Errorf("schedule add NOPE_VM: want exit 1 naming the VM, got %s", r)
	}
	var nf *serviceerror.NotFound
	if _, err := sc.GetHandle(ctx, "backup-lab/NOPE_VM").Describe(ctx); !errors.As(err, &nf) {
		t.Errorf("schedule backup-lab/NOPE_VM after a refused add: %v, want NotFound", err)
	}

	t.Log("add, then update the spec")
	const vm = "DC0_H0_VM1"
	h.ok("schedule", "add", vm, "--every", "1h", "--offset", "5m")
	d := h.describe(vm)
	if d.Spec != "every 1h at +5m" || d.Every != "1h0m0s" || d.Offset != "5m0s" || d.Cron != "" || d.Mode != "auto" || d.Overlap != "skip" || d.Paused || d.Next.IsZero() {
		t.Errorf("after add: %+v", d)
	}
	h.ok("schedule", "update", vm, "--cron", "30 2 * * 1-5")
	d = h.describe(vm)
	if d.Spec != "cron 30 2 * * 1-5" || d.Cron != "30 2 * * 1-5" || d.Every != "" {
		t.Errorf("after update --cron: spec %q cron %q every %q", d.Spec, d.Cron, d.Every)
	}
	if n := d.Next.UTC(); n.Hour() != 2 || n.Minute() != 30 || n.Weekday() == time.Saturday || n.Weekday() == time.Sunday {
		t.Errorf("after update --cron \"30 2 * * 1-5\": next run %s", n)
	}
	for _, bad := range []string{"61 * * * *", "every day", "* * *"} {
		if r := h.run("schedule", "update", vm, "--cron", bad); r.ExitCode != 2 || !strings.Contains(r.Stderr, `--cron "`+bad+`"`) {
			t.Errorf("update --cron %q: want exit 2 naming it, got %s", bad, r)
		} else {
			t.Logf("update --cron %q: %s", bad, r.Stderr)
		}
	}
	if d := h.describe(vm); d.Cron != "30 2 * * 1-5" {
		t.Errorf("a refused --cron changed the schedule: %+v", d)
	}
	if r := h.run("schedule", "update", vm, "--offset", "1m"); r.ExitCode != 2 || !strings.Contains(r.Stderr, "--offset moves the runs of an --every schedule") {
		t.Errorf("update --offset of a cron schedule: want exit 2, got %s", r)
	}
	h.ok("schedule", "update", vm, "--every", "2h", "--mode", "full")
	d = h.describe(vm)
	if d.Spec != "every 2h" || d.Every != "2h0m0s" || d.Mode != "full" {
		t.Errorf("after update --every 2h --mode full: %+v", d)
	}
	h.ok("schedule", "update", vm, "--offset", "30m", "--mode", "auto")
	if d = h.describe(vm); d.Spec != "every 2h at +30m" || d.Mode != "auto" {
		t.Errorf("after update --offset 30m --mode auto: %+v", d)
	}
	for _, c := range [][]string{{"--every", "1h", "--cron", "0 * * * *"}, {"--full-every", "-1"}, {"--mode", "incremental"}, {}} {
		if r := h.run(append([]string{"schedule", "update", vm}, c...)...); r.ExitCode != 2 {
			t.Errorf("update %v: want a usage error, got %s", c, r)
		}
	}
	if r := h.run("schedule", "update", "NOT_SCHEDULED", "--every", "1h"); r.ExitCode != 1 || !strings.Contains(r.Stderr, "no schedule backup-lab/NOT_SCHEDULED") {
		t.Errorf("update of a VM without a schedule: %s", r)
	}

	t.Log("pause, unpause")
	h.ok("schedule", "pause", vm, "--note", "maintenance window")
	if d = h.describe(vm); !d.Paused || d.Note != "maintenance window" {
		t.Errorf("after pause: paused %v, note %q", d.Paused, d.Note)
	}
	r = h.ok("schedule", "list", "--json")
	var list []describeJSON
	if err := json.Unmarshal([]byte(r.Stdout), &list); err != nil || len(list) != 1 || !list[0].Paused || list[0].Spec != "every 2h at +30m" {
		t.Errorf("schedule list --json while paused: %v %s", err, r.Stdout)
	}
	h.ok("schedule", "unpause", vm)
	if d = h.describe(vm); d.Paused {
		t.Errorf("after unpause: still paused")
	}

	t.Log("a trigger while a backup of the VM runs starts nothing")
	gates := s.FaultPoints()
	if err := gates.Arm(faultpoint.AfterSnapshot); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = gates.Release(faultpoint.AfterSnapshot) })
	held, err := s.StartStarter("backup", vm, "--wait", "--json")
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err = gates.Wait(wctx, faultpoint.AfterSnapshot)
	wcancel()
	if err != nil {
		t.Fatal(err)
	}
	h.ok("schedule", "trigger", vm)
	d = h.waitRuns(vm, 1)
	if d.LastRun.Outcome != "skipped" || !strings.Contains(d.LastRun.Detail, "is running as workflow") || !strings.Contains(d.LastRun.Detail, "nothing started") {
		t.Errorf("the run triggered during a backup: %+v, want skipped", d.LastRun)
	}
	if err := gates.Release(faultpoint.AfterSnapshot); err != nil {
		t.Fatal(err)
	}
	hr, err := held.Wait(ctx)
	if err != nil || hr.ExitCode != 0 {
		t.Fatalf("the held backup: %v %s", err, hr)
	}
	if points := h.list(vm); len(points) != 1 || points[0].Status != "committed" {
		t.Errorf("after the skipped run, the catalog holds %+v, want only the one backup", points)
	}
	r = h.ok("schedule", "list")
	t.Logf("schedule list:\n%s", r.Stdout)
	if !strings.Contains(r.Stdout, "skipped") || !strings.Contains(r.Stdout, "every 2h at +30m") {
		t.Errorf("schedule list:\n%s", r.Stdout)
	}
	h.ok("schedule", "delete", vm)

	t.Log("--full-every 2: full and incremental in turn")
	const vm2 = "DC0_C0_RP0_VM1"
	h.ok("schedule", "add", vm2, "--every", "24h", "--full-every", "2")
	h.ok("schedule", "pause", vm2) // only the triggers run
	if d := h.describe(vm2); d.FullEvery != 2 {
		t.Errorf("full_every %d, want 2", d.FullEvery)
	}
	for i := 1; i <= 4; i++ {
		h.ok("schedule", "trigger", vm2)
		if d := h.waitRuns(vm2, i); d.LastRun.Outcome != "completed" {
			t.Fatalf("triggered run %d: %+v", i, d.LastRun)
		}
	}
	points := h.list(vm2)
	if len(points) != 4 {
		t.Fatalf("%d restore points of %s, want 4: %+v", len(points), vm2, points)
	}
	var modes []string
	for i := len(points) - 1; i >= 0; i-- { // oldest first
		p := points[i]
		if len(p.Disks) == 0 {
			t.Fatalf("restore point %s has no disks", p.BackupID)
		}
		for _, dk := range p.Disks {
			if dk.Mode != p.Disks[0].Mode {
				t.Errorf("restore point %s: disks of modes %s and %s", p.BackupID, p.Disks[0].Mode, dk.Mode)
			}
		}
		modes = append(modes, p.Disks[0].Mode)
	}
	if want := "full incremental full incremental"; strings.Join(modes, " ") != want {
		t.Errorf("modes of the 4 scheduled backups, oldest first: %v, want %s", modes, want)
	}
	r = h.ok("schedule", "describe", vm2)
	t.Logf("schedule describe %s:\n%s", vm2, r.Stdout)
	for _, want := range []string{"every 24h", "every 2nd backup of each disk full", "paused:     yes", "completed"} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("schedule describe lacks %q:\n%s", want, r.Stdout)
		}
	}
}
