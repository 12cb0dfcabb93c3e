package schedules

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
)

func TestMain(m *testing.M) { stacktest.Main(m) }

const vm = "DC0_C0_RP0_VM0"

// A VM backed up on a schedule: the schedule starts the Backup workflow
// (which resolves the VM and runs its BackupVM), and a run commits a
// restore point; list shows the schedule, delete removes it.
func TestScheduledBackup(t *testing.T) {
	s := stacktest.New(t, stack.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	run := func(args ...string) stack.StarterResult {
		t.Helper()
		r, err := s.Starter(ctx, args...)
		if err != nil {
			t.Fatalf("starter %v: %v", args, err)
		}
		return r
	}

	r := run("schedule", "add", vm, "--every", "1h")
	id := strings.TrimSpace(r.Stdout)
	if r.ExitCode != 0 || id != "backup-lab/"+vm {
		t.Fatalf("schedule add: %s", r)
	}
	if r := run("schedule", "add", vm, "--every", "1h"); r.ExitCode == 0 || !strings.Contains(r.Stderr, id) {
		t.Errorf("a second schedule for the same VM: want an error naming %s, got %s", id, r)
	}
	if r := run("schedule", "add", vm, "--every", "10s"); r.ExitCode != 2 || !strings.Contains(r.Stderr, "shorter than a minute") {
		t.Errorf("a 10 s interval: want a usage error, got %s", r)
	}
	if r := run("schedule", "add", vm, "--mode", "incremental"); r.ExitCode != 2 || !strings.Contains(r.Stderr, "incremental") {
		t.Errorf("an incremental-only schedule: want a usage error, got %s", r)
	}

	var list []struct {
		ID      string    `json:"id"`
		VM      string    `json:"vm"`
		Profile string    `json:"profile"`
		Paused  bool      `json:"paused"`
		Next    time.Time `json:"next_run"`
	}
	// Visibility of schedules is eventually consistent: poll briefly.
	deadline := time.Now().Add(30 * time.Second)
	for {
		r = run("schedule", "list", "--json")
		list = nil
		if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &list) != nil {
			t.Fatalf("schedule list: %s", r)
		}
		if len(list) == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if len(list) != 1 || list[0].ID != id || list[0].VM != vm || list[0].Profile != "lab" || list[0].Paused || list[0].Next.IsZero() {
		t.Fatalf("schedule list = %+v, want only %s with a next run (the sweeper's schedule is not a backup schedule)", list, id)
	}

	// Run it now rather than in an hour: a restore point appears.
	if err := s.Client().ScheduleClient().GetHandle(ctx, id).Trigger(ctx, client.ScheduleTriggerOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(3 * time.Minute)
	for {
		r = run("list", vm, "--json")
		var points []struct {
			Status string `json:"status"`
			Disks  []any  `json:"disks"`
		}
		if r.ExitCode != 0 || json.Unmarshal([]byte(r.Stdout), &points) != nil {
			t.Fatalf("list: %s", r)
		}
		if len(points) == 1 && points[0].Status == "committed" && len(points[0].Disks) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no committed restore point of %s from the scheduled run: %s", vm, r.Stdout)
		}
		time.Sleep(500 * time.Millisecond)
	}

	if r := run("schedule", "delete", vm); r.ExitCode != 0 {
		t.Fatalf("schedule delete: %s", r)
	}
	if _, err := s.Client().ScheduleClient().GetHandle(ctx, id).Describe(ctx); err == nil {
		t.Errorf("schedule %s still exists after delete", id)
	}
	if r := run("schedule", "delete", vm); r.ExitCode == 0 {
		t.Errorf("deleting a missing schedule succeeded: %s", r)
	}
}
