package prune

import (
	"context"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/cbtflow/cbtflow/internal/retention"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

// gfsTimes are the times forged onto the nine backups of TestGFS, oldest
// first. They sit at noon (two at 10:00 and 14:00 of one day), so the
// calendar periods are the same in every time zone from UTC-9 to UTC+9;
// the worker runs with TZ=UTC all the same.
var gfsTimes = []string{
	"2024-06-10 12:00", // p0 Mon, 2024-W24
	"2025-11-20 12:00", // p1 Thu, 2025-W47
	"2025-12-31 12:00", // p2 Wed, 2026-W01: the last of 2025 and of 2025-12
	"2026-01-02 12:00", // p3 Fri, 2026-W01: same ISO week as p2, across the year boundary
	"2026-01-30 12:00", // p4 Fri, 2026-W05: the last of 2026-01
	"2026-02-01 12:00", // p5 Sun, 2026-W05: the last of its week, across the month boundary
	"2026-02-02 12:00", // p6 Mon, 2026-W06: across the week boundary
	"2026-02-04 10:00", // p7 Wed, 2026-W06
	"2026-02-04 14:00", // p8 Wed, 2026-W06: the same day as p7
}

// gfsKept is what restic's rules keep of gfsTimes under --keep-daily 2
// --keep-weekly 3 --keep-monthly 3 --keep-yearly 2, worked out by hand
// (newest first; the rules in restic's order). Newest first: daily takes
// the newest of 02-04 (p8, not p7) and of 02-02 (p6); weekly the newest
// of W06 (p8), W05 (p5) and W01 (p3, not p2 of the same ISO week);
// monthly the newest of 2026-02 (p8), 2026-01 (p4) and 2025-12 (p2);
// yearly the newest of 2026 (p8) and 2025 (p2). Every rule has used all
// its count by p2, so restic 0.17's "keep the oldest snapshot as well
// when a rule has count left" does not apply: p1 and p0 go under every
// restic version, and p7 goes too.
var gfsKept = []struct {
	index int
	rules []string
}{
	{8, []string{"daily 2026-02-04", "weekly 2026-W06", "monthly 2026-02", "yearly 2026"}},
	{6, []string{"daily 2026-02-02"}},
	{5, []string{"weekly 2026-W05"}},
	{4, []string{"monthly 2026-01"}},
	{3, []string{"weekly 2026-W01"}},
	{2, []string{"monthly 2025-12", "yearly 2025"}},
}

var gfsRemoved = []int{7, 1, 0} // newest first

// TestGFS is issue 9's acceptance for the calendar rules: nine small
// backups whose times are then forged in the catalog to span days, weeks,
// months and years; a GFS policy; the prune keeps exactly the points
// restic's rules keep (stated above, and checked against retention.Select),
// each for the rules it names; the catalog lists exactly them; each
// restores byte for byte as it was backed up; the next backup is an
// incremental that restores.
func TestGFS(t *testing.T) {
	// The calendar rules run in the worker's local time zone
	// (activities.Pruner.Location is nil): the worker inherits TZ.
	t.Setenv("TZ", "UTC")
	s := stacktest.New(t, stack.Options{})
	l := s.Lab()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	dir := t.TempDir()

	var points []point
	for i := range gfsTimes {
		// A little data of its own per backup: 512 KiB at 0 (over the
		// previous one's) and 1 MiB at an offset of its own.
		for _, k := range keys {
			stacktest.WriteDisk(t, l, vm, k, 0, stacktest.Pattern(uint64(1000*i)+uint64(k), 512*1024))
			stacktest.WriteDisk(t, l, vm, k, int64(i+1)*16*MiB, stacktest.Pattern(uint64(2000*i)+uint64(k), MiB))
		}
		mode := workflows.ModeIncremental
		if i == 0 {
			mode = workflows.ModeFull
		}
		points = append(points, backup(ctx, t, s, dir, fmt.Sprintf("g%d", i), mode))
	}

	// Forge the times: started_at is what the rules look at, finished_at
	// what a backup takes as the latest restore point; both keep the
	// order the backups ran in, and all are in the past.
	times := make([]time.Time, len(gfsTimes))
	for i, ts := range gfsTimes {
		var err error
		if times[i], err = time.ParseInLocation("2006-01-02 15:04", ts, time.UTC); err != nil {
			t.Fatal(err)
		}
	}
	forgeTimes(ctx, t, s, points, times)

	// The expected set, twice: by hand (gfsKept) and by the rules' code.
	policy := retention.Policy{KeepDaily: 2, KeepWeekly: 3, KeepMonthly: 3, KeepYearly: 2}
	var rpoints []retention.Point
	for i, p := range points {
		rpoints = append(rpoints, retention.Point{ID: p.id, Time: times[i]})
	}
	var wantKept []keptPoint
	for _, k := range gfsKept {
		wantKept = append(wantKept, keptPoint{points[k.index].id, times[k.index], k.rules})
	}
	var selected []keptPoint
	for _, d := range retention.Select(rpoints, policy, time.UTC) {
		if d.Keep {
			selected = append(selected, keptPoint{d.ID, d.Time, d.Reasons})
		}
	}
	if !reflect.DeepEqual(selected, wantKept) {
		t.Fatalf("retention.Select keeps\n%v\nthe hand-worked set is\n%v", selected, wantKept)
	}
	var wantRemoved []string
	for _, i := range gfsRemoved {
		wantRemoved = append(wantRemoved, points[i].id)
	}

	res, err := s.Starter(ctx, "retention", "set", vm, "--keep-daily", "2", "--keep-weekly", "3", "--keep-monthly", "3", "--keep-yearly", "2")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("retention set: %v %s", err, res)
	}

	checkPlan := func(what string, r workflows.PruneResult) {
		t.Helper()
		if len(r.VMs) != 1 {
			t.Fatalf("%s: %d VMs in %+v, want 1", what, len(r.VMs), r)
		}
		var got []keptPoint
		for _, k := range r.VMs[0].Kept {
			got = append(got, keptPoint{k.BackupID, k.Time.UTC(), k.Rules})
		}
		if !reflect.DeepEqual(got, wantKept) {
			t.Errorf("%s keeps\n%v\nwant\n%v", what, got, wantKept)
		}
		if ids := removedIDs(r.VMs[0]); !slices.Equal(ids, wantRemoved) {
			t.Errorf("%s removes %v, want %v (p7 p1 p0)", what, ids, wantRemoved)
		}
		for _, rm := range r.VMs[0].Removed {
			if !strings.Contains(rm.Reason, "not kept by the policy") {
				t.Errorf("%s: %s removed because %q", what, rm.BackupID, rm.Reason)
			}
		}
	}

	res, err = s.Starter(ctx, "prune", vm, "--dry-run", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("prune --dry-run: %v %s", err, res)
	}
	var dry workflows.PruneResult
	if err := stacktest.DecodeOne(res.Stdout, &dry); err != nil {
		t.Fatal(err)
	}
	if !dry.DryRun {
		t.Errorf("dry run result says dry_run false")
	}
	checkPlan("the dry run", dry)
	if t.Failed() {
		t.FailNow()
	}

	res, err = s.Starter(ctx, "prune", vm, "--wait", "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("prune: %v %s", err, res)
	}
	var pr workflows.PruneResult
	if err := stacktest.DecodeOne(res.Stdout, &pr); err != nil {
		t.Fatal(err)
	}
	checkPlan("the prune", pr)
	if pr.BytesFreed <= 0 {
		t.Errorf("the prune freed %d bytes", pr.BytesFreed)
	}
	// What kept points built on goes into them: p8 takes p7's data and
	// builds on p6; p2 takes p1's and p0's and becomes a full image.
	var merged []string
	for _, m := range pr.VMs[0].Merged {
		merged = append(merged, fmt.Sprintf("%s/%d on %q", m.BackupID, m.Key, m.Base))
	}
	var wantMerged []string
	for _, k := range keys {
		wantMerged = append(wantMerged, fmt.Sprintf("%s/%d on %q", points[8].id, k, points[6].id), fmt.Sprintf("%s/%d on %q", points[2].id, k, ""))
	}
	slices.Sort(merged)
	slices.Sort(wantMerged)
	if !slices.Equal(merged, wantMerged) {
		t.Errorf("merged %v, want %v", merged, wantMerged)
	}
	backing := backingOf(ctx, t, s)
	for _, k := range keys {
		for _, c := range []struct{ of, on string }{
			{points[8].id, points[6].id}, {points[6].id, points[5].id}, {points[5].id, points[4].id},
			{points[4].id, points[3].id}, {points[3].id, points[2].id}, {points[2].id, ""},
		} {
			if got, ok := backing[fmt.Sprintf("%s/%d", c.of, k)]; !ok || got != c.on {
				t.Errorf("catalog: %s disk %d builds on %q (present %v), want %q", c.of, k, got, ok, c.on)
			}
		}
	}

	// The catalog lists exactly the kept points, at their forged times.
	var wantListed []string
	for _, k := range wantKept {
		wantListed = append(wantListed, k.id+" "+k.time.Format(time.RFC3339))
	}
	if got := listed(ctx, t, s); !slices.Equal(got, wantListed) {
		t.Errorf("list after the prune:\n%v\nwant\n%v", got, wantListed)
	}
	for _, k := range gfsKept {
		restoresAsBackedUp(ctx, t, s, dir, points[k.index])
	}
	files, _ := vmFiles(t, s.Repository())
	for _, f := range files {
		for _, i := range gfsRemoved {
			if strings.Contains(filepath.Base(f), points[i].id) {
				t.Errorf("file of removed point %s left: %s", points[i].id, f)
			}
		}
	}
	if len(files) != len(gfsKept)*len(keys) {
		t.Errorf("%d files in the repository, want %d: %v", len(files), len(gfsKept)*len(keys), files)
	}

	// The next backup continues the chain on p8.
	for _, k := range keys {
		stacktest.WriteDisk(t, l, vm, k, 12*16*MiB, stacktest.Pattern(uint64(9000)+uint64(k), MiB))
	}
	next := backup(ctx, t, s, dir, "g9", workflows.ModeIncremental)
	backing = backingOf(ctx, t, s)
	for _, k := range keys {
		if got := backing[fmt.Sprintf("%s/%d", next.id, k)]; got != points[8].id {
			t.Errorf("next backup's disk %d builds on %q, want %s", k, got, points[8].id)
		}
	}
	restoresAsBackedUp(ctx, t, s, dir, next)
}

// keptPoint is a kept point as compared here: ID, time, rules.
type keptPoint struct {
	id    string
	time  time.Time
	rules []string
}

func (k keptPoint) String() string {
	return fmt.Sprintf("%s %s %v", k.id, k.time.Format(time.RFC3339), k.rules)
}

// forgeTimes sets the started and finished times of the backups in the
// catalog: started at times[i], finished two minutes later.
func forgeTimes(ctx context.Context, t *testing.T, s *stack.Stack, points []point, times []time.Time) {
	t.Helper()
	conn, err := pgx.Connect(ctx, s.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for i, p := range points {
		tag, err := conn.Exec(ctx, `UPDATE backups SET started_at = $2, finished_at = $3 WHERE id = $1 AND status = 'committed'`,
			p.id, times[i], times[i].Add(2*time.Minute))
		if err != nil || tag.RowsAffected() != 1 {
			t.Fatalf("forge the time of %s: %v (%d rows)", p.id, err, tag.RowsAffected())
		}
	}
}

// backingOf reads every disk's backing restore point from the catalog:
// "backup/key" → backing backup ID ("" for a full image).
func backingOf(ctx context.Context, t *testing.T, s *stack.Stack) map[string]string {
	t.Helper()
	conn, err := pgx.Connect(ctx, s.DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT backup_id, disk_key, coalesce(backing_backup_id, '') FROM backup_disks`)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for rows.Next() {
		var id, on string
		var key int32
		if err := rows.Scan(&id, &key, &on); err != nil {
			t.Fatal(err)
		}
		out[fmt.Sprintf("%s/%d", id, key)] = on
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// listed returns `starter list VM --json` as "ID started-at" lines.
func listed(ctx context.Context, t *testing.T, s *stack.Stack) []string {
	t.Helper()
	res, err := s.Starter(ctx, "list", vm, "--json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("list: %v %s", err, res)
	}
	var list []struct {
		BackupID  string    `json:"backup_id"`
		StartedAt time.Time `json:"started_at"`
	}
	if err := stacktest.DecodeOne(res.Stdout, &list); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, b := range list {
		out = append(out, b.BackupID+" "+b.StartedAt.UTC().Format(time.RFC3339))
	}
	return out
}
