package main

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/workflows"
)

func TestSpecText(t *testing.T) {
	r := func(start, end, step int) client.ScheduleRange {
		return client.ScheduleRange{Start: start, End: end, Step: step}
	}
	for _, c := range []struct {
		spec *client.ScheduleSpec
		want string
	}{
		{nil, "-"},
		{&client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: 24 * time.Hour, Offset: 2 * time.Hour}}}, "every 24h at +2h"},
		{&client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: 90 * time.Minute}}}, "every 1h30m"},
		{&client.ScheduleSpec{CronExpressions: []string{"30 2 * * *"}}, "cron 30 2 * * *"},
		// Temporal's form of "30 2 * * 1-5".
		{&client.ScheduleSpec{Calendars: []client.ScheduleCalendarSpec{{Second: []client.ScheduleRange{r(0, 0, 0)},
			Minute: []client.ScheduleRange{r(30, 0, 0)}, Hour: []client.ScheduleRange{r(2, 0, 0)},
			DayOfMonth: []client.ScheduleRange{r(1, 31, 0)}, Month: []client.ScheduleRange{r(1, 12, 0)},
			DayOfWeek: []client.ScheduleRange{r(1, 5, 0)}}}}, "cron 30 2 * * 1-5"},
		{&client.ScheduleSpec{Calendars: []client.ScheduleCalendarSpec{{Minute: []client.ScheduleRange{r(0, 59, 15)},
			Hour: []client.ScheduleRange{r(1, 0, 0), r(13, 0, 0)}}}}, "cron */15 1,13 * * *"},
		{&client.ScheduleSpec{Calendars: []client.ScheduleCalendarSpec{{Second: []client.ScheduleRange{r(10, 0, 0)}}}}, "cron 10 0 0 * * *"},
	} {
		if got := specText(c.spec); got != c.want {
			t.Errorf("specText(%+v) = %q, want %q", c.spec, got, c.want)
		}
	}
}

// Schedule command lines refused before anything is asked: exit 2, the
// flag named.
func TestScheduleUsageErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"schedule", "add", "VM", "--every", "30s"}, "schedule add: --every 30s is shorter than a minute"},
		{[]string{"schedule", "add", "VM", "--every", "1h", "--cron", "0 2 * * *"}, "give --every or --cron, not both"},
		{[]string{"schedule", "add", "VM", "--cron", "0 2 * *"}, `--cron "0 2 * *": 4 fields`},
		{[]string{"schedule", "add", "VM", "--cron", "@often"}, `--cron "@often": not a macro`},
		{[]string{"schedule", "add", "VM", "--cron", "0 2 * * *", "--offset", "1h"}, "--offset is for --every"},
		{[]string{"schedule", "add", "VM", "--every", "1h", "--offset", "2h"}, "--offset 2h: must be at least 0 and less than --every 1h"},
		{[]string{"schedule", "add", "VM", "--mode", "incremental"}, `--mode "incremental": a schedule backs up in auto or full mode`},
		{[]string{"schedule", "add", "VM", "--full-every", "0"}, "--full-every 0: give 1 or more"},
		{[]string{"schedule", "update", "VM"}, "schedule update: give what to change"},
		{[]string{"schedule", "update", "VM", "--full-every", "-2"}, "--full-every -2: give 1 or more"},
		{[]string{"schedule", "pause"}, "schedule pause: give exactly one VM, got none"},
		{[]string{"schedule", "trigger", "a", "b"}, "schedule trigger: give exactly one VM"},
		{[]string{"schedule", "describe", "VM", "--bogus"}, "unknown flag: --bogus"},
	} {
		r := runIn(t, append(c.args, "--temporal-address", "127.0.0.1:1")...)
		if r.code != 2 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("starter %s: exit %d, stderr %s; want 2 and %q", strings.Join(c.args, " "), r.code, r.stderr, c.want)
		}
	}
}

// Every run of a schedule skips a running backup of its VM, however it
// was started.
func TestBackupActionSkipsIfRunning(t *testing.T) {
	a := backupAction("backup-lab/vm", workflows.BackupInput{VM: "vm", Profile: "lab", Mode: "auto", FullEvery: 3})
	in, err := actionInput(a)
	if err != nil {
		t.Fatal(err)
	}
	if !in.SkipIfRunning || in.FullEvery != 3 || in.VM != "vm" || a.ID != "scheduled-backup-lab/vm" || a.TaskQueue != workflows.TaskQueue {
		t.Errorf("action %+v, input %+v", a, in)
	}
}

// The README's rows of `starter schedule list` and `describe` name every
// key of their JSON.
func TestScheduleJSONInREADME(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]string{}
	for line := range strings.Lines(string(readme)) {
		for _, cmd := range []string{"list", "describe"} {
			if strings.HasPrefix(line, "| `starter schedule "+cmd) {
				rows[cmd] = line
			}
		}
	}
	keys := func(v any) []string {
		var out []string
		var walk func(rt reflect.Type)
		walk = func(rt reflect.Type) {
			for i := range rt.NumField() {
				f := rt.Field(i)
				if f.Anonymous {
					walk(f.Type)
					continue
				}
				name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
				out = append(out, name)
			}
		}
		walk(reflect.TypeOf(v))
		return out
	}
	for _, c := range []struct {
		row  string
		keys []string
	}{
		{"list", append(keys(scheduleEntry{}), keys(scheduleRun{})...)},
		{"describe", keys(scheduleDescribeOutput{})},
	} {
		row, ok := rows[c.row]
		if !ok {
			t.Fatalf("README.md has no row for starter schedule %s", c.row)
		}
		for _, k := range c.keys {
			if !strings.Contains(row, "`"+k+"`") && !(c.row == "describe" && slices.Contains(keys(scheduleEntry{}), k)) {
				t.Errorf("README.md's row of starter schedule %s does not name `%s`", c.row, k)
			}
		}
	}
}
