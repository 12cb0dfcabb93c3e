package retention

import (
	"errors"
	"math/rand"
	"reflect"
	"strings"
	"testing"
	"time"
)

func at(s string) time.Time {
	t, err := time.Parse("2006-01-02 15:04", s)
	if err != nil {
		panic(err)
	}
	return t
}

// kept runs Select and returns "ID:reason,reason" for kept points, newest
// first.
func kept(points []Point, p Policy, loc *time.Location) []string {
	var out []string
	for _, d := range Select(points, p, loc) {
		if d.Keep {
			out = append(out, d.ID+":"+strings.Join(d.Reasons, ","))
		}
	}
	return out
}

func TestSelect(t *testing.T) {
	// A year of irregular backups: several a day, gaps of days, weeks and
	// months, a year boundary inside an ISO week (2026-12-31 and
	// 2027-01-01 are both in 2026-W53).
	history := []Point{
		{"a", at("2025-03-10 01:00")},
		{"b", at("2025-11-02 01:00")},
		{"c", at("2026-06-15 01:00")},
		{"d", at("2026-06-30 23:00")},
		{"e", at("2026-12-28 01:00")}, // Monday of 2026-W53
		{"f", at("2026-12-31 01:00")},
		{"g", at("2026-12-31 13:00")},
		{"h", at("2027-01-01 09:00")},
		{"i", at("2027-01-04 08:00")}, // Monday of 2027-W01
		{"j", at("2027-01-04 20:00")},
		{"k", at("2027-01-06 10:00")},
	}
	for _, c := range []struct {
		name   string
		policy Policy
		want   []string
	}{
		{"keep-last 2", Policy{KeepLast: 2}, []string{"k:last 1", "j:last 2"}},
		{"keep-last more than there are", Policy{KeepLast: 50}, []string{
			"k:last 1", "j:last 2", "i:last 3", "h:last 4", "g:last 5", "f:last 6",
			"e:last 7", "d:last 8", "c:last 9", "b:last 10", "a:last 11"}},
		// The newest point of each of the 4 most recent days that have
		// points: days without backups do not count.
		{"keep-daily 4", Policy{KeepDaily: 4}, []string{
			"k:daily 2027-01-06", "j:daily 2027-01-04", "h:daily 2027-01-01", "g:daily 2026-12-31"}},
		{"keep-weekly 3 across the year boundary", Policy{KeepWeekly: 3}, []string{
			"k:weekly 2027-W01", "h:weekly 2026-W53", "d:weekly 2026-W27"}},
		{"keep-monthly 3", Policy{KeepMonthly: 3}, []string{
			"k:monthly 2027-01", "g:monthly 2026-12", "d:monthly 2026-06"}},
		// Three years for five yearly slots: the oldest point is kept too
		// (restic since 0.17).
		{"keep-yearly 5", Policy{KeepYearly: 5}, []string{
			"k:yearly 2027", "g:yearly 2026", "b:yearly 2025", "a:oldest yearly"}},
		// Rules are independent: the newest point is kept by all of them,
		// and counts for each.
		{"GFS", Policy{KeepLast: 1, KeepDaily: 2, KeepWeekly: 2, KeepMonthly: 2, KeepYearly: 2}, []string{
			"k:last 1,daily 2027-01-06,weekly 2027-W01,monthly 2027-01,yearly 2027",
			"j:daily 2027-01-04",
			"h:weekly 2026-W53",
			"g:monthly 2026-12,yearly 2026"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.policy.Validate(); err != nil {
				t.Fatal(err)
			}
			got := kept(history, c.policy, time.UTC)
			if !reflect.DeepEqual(got, c.want) {
				t.Errorf("kept\n%q\nwant\n%q", got, c.want)
			}
			// The answer never depends on the input's order.
			shuffled := append([]Point(nil), history...)
			rand.New(rand.NewSource(1)).Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
			if again := kept(shuffled, c.policy, time.UTC); !reflect.DeepEqual(again, got) {
				t.Errorf("shuffled input keeps %q, sorted %q", again, got)
			}
			// Every point has a decision, newest first.
			ds := Select(history, c.policy, time.UTC)
			if len(ds) != len(history) || ds[0].ID != "k" || ds[len(ds)-1].ID != "a" {
				t.Errorf("decisions %+v", ds)
			}
		})
	}
}

func TestSelectSameTime(t *testing.T) {
	// Two points at the same instant: the higher ID is the newer, so the
	// answer is stable.
	ts := at("2026-12-03 10:00")
	got := kept([]Point{{"x1", ts}, {"x2", ts}}, Policy{KeepDaily: 1}, time.UTC)
	if !reflect.DeepEqual(got, []string{"x2:daily 2026-12-03"}) {
		t.Errorf("kept %q", got)
	}
}

func TestSelectTimeZone(t *testing.T) {
	// 23:30 UTC on the 2nd is the 3rd in UTC+2: with two daily slots, UTC
	// keeps the 3rd's and the 2nd's points, UTC+2 the 3rd's (p2, which
	// shadows p1 there) and the 30th's.
	pts := []Point{{"p0", at("2026-11-30 12:00")}, {"p1", at("2026-12-02 23:30")}, {"p2", at("2026-12-03 08:00")}}
	if got := kept(pts, Policy{KeepDaily: 2}, time.UTC); !reflect.DeepEqual(got, []string{"p2:daily 2026-12-03", "p1:daily 2026-12-02"}) {
		t.Errorf("UTC: kept %q", got)
	}
	east := time.FixedZone("UTC+2", 2*3600)
	if got := kept(pts, Policy{KeepDaily: 2}, east); !reflect.DeepEqual(got, []string{"p2:daily 2026-12-03", "p0:daily 2026-11-30"}) {
		t.Errorf("UTC+2: kept %q", got)
	}
}

func TestSelectKeepsOldestWhenRulesHaveRoom(t *testing.T) {
	// keep-daily 5 over two days, keep-last alone never: restic keeps the
	// oldest point when a calendar rule has slots left.
	pts := []Point{{"a", at("2026-12-01 10:00")}, {"b", at("2026-12-01 12:00")}, {"c", at("2026-12-02 12:00")}}
	if got := kept(pts, Policy{KeepDaily: 5}, time.UTC); !reflect.DeepEqual(got, []string{"c:daily 2026-12-02", "b:daily 2026-12-01", "a:oldest daily"}) {
		t.Errorf("keep-daily 5: kept %q", got)
	}
	if got := kept(pts, Policy{KeepLast: 5}, time.UTC); !reflect.DeepEqual(got, []string{"c:last 1", "b:last 2", "a:last 3"}) {
		t.Errorf("keep-last 5: kept %q", got)
	}
	if got := kept(pts, Policy{KeepLast: 1, KeepDaily: 1}, time.UTC); !reflect.DeepEqual(got, []string{"c:last 1,daily 2026-12-02"}) {
		t.Errorf("keep-last 1, keep-daily 1: kept %q", got)
	}
}

func TestValidate(t *testing.T) {
	if err := (Policy{}).Validate(); !errors.Is(err, ErrNoRule) {
		t.Errorf("empty policy: %v, want ErrNoRule", err)
	}
	if err := (Policy{MaxChain: 5}).Validate(); !errors.Is(err, ErrNoRule) {
		t.Errorf("max-chain only: %v, want ErrNoRule", err)
	}
	if err := (Policy{KeepLast: 1, KeepDaily: -1}).Validate(); err == nil || !strings.Contains(err.Error(), "--keep-daily -1") {
		t.Errorf("negative keep-daily: %v, want an error naming it", err)
	}
	if err := (Policy{KeepYearly: 3}).Validate(); err != nil {
		t.Errorf("keep-yearly 3: %v", err)
	}
	if got := (Policy{KeepLast: 2, KeepMonthly: 6}).String(); got != "keep-last 2, keep-monthly 6, max-chain 30" {
		t.Errorf("String() = %q", got)
	}
	if got := (Policy{KeepLast: 2, MaxChain: 7}).Chain(); got != 7 {
		t.Errorf("Chain() = %d", got)
	}
}

// TestSelectResticDocExamples runs the examples of restic's documentation
// of `restic forget` ("Removing snapshots according to a policy",
// doc/060_forget.rst in github.com/restic/restic) through Select.
func TestSelectResticDocExamples(t *testing.T) {
	t.Run("one backup every Sunday for 12 weeks, keep-daily 4", func(t *testing.T) {
		// The documentation's snapshot list, IDs and times as printed;
		// `restic forget --keep-daily 4 --dry-run` keeps the last four
		// Sundays and removes the other eight.
		sundays := []Point{
			{"0a1f9759", at("2019-09-01 11:00")},
			{"46cfe4d5", at("2019-09-08 11:00")},
			{"f6b1f037", at("2019-09-15 11:00")},
			{"eb430a5d", at("2019-09-22 11:00")},
			{"8cf1cb9a", at("2019-09-29 11:00")},
			{"5d33b116", at("2019-10-06 11:00")},
			{"b9553125", at("2019-10-13 11:00")},
			{"e1a7b58b", at("2019-10-20 11:00")},
			{"8f8018c0", at("2019-10-27 11:00")},
			{"59403279", at("2019-11-03 11:00")},
			{"dfee9fb4", at("2019-11-10 11:00")},
			{"e1ae2f40", at("2019-11-17 11:00")},
		}
		got := kept(sundays, Policy{KeepDaily: 4}, time.UTC)
		want := []string{
			"e1ae2f40:daily 2019-11-17", "dfee9fb4:daily 2019-11-10",
			"59403279:daily 2019-11-03", "8f8018c0:daily 2019-10-27"}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("kept\n%q\nwant\n%q", got, want)
		}
	})
	t.Run("one backup every day for 100 years, keep-daily 7 weekly 5 monthly 12 yearly 75", func(t *testing.T) {
		// "suppose you make one backup every day for 100 years. Then
		// forget --keep-daily 7 --keep-weekly 5 --keep-monthly 12
		// --keep-yearly 75 would keep the most recent 7 daily snapshots
		// and 4 last-day-of-the-week ones (since the 7 dailies already
		// include 1 weekly). Additionally, 12 or 11 last-day-of-the-month
		// snapshots will be kept (depending on whether one of them ends
		// up being the same as a daily or weekly). And finally 75 or 74
		// last-day-of-the-year snapshots are kept". The last backup here
		// is Sunday 2023-12-31, the last day of its week, month and year:
		// 7 + 4 + 11 + 74 points.
		var days []Point
		for d := time.Date(1924, 1, 1, 12, 0, 0, 0, time.UTC); d.Year() < 2024; d = d.AddDate(0, 0, 1) {
			days = append(days, Point{d.Format("2006-01-02"), d})
		}
		p := Policy{KeepDaily: 7, KeepWeekly: 5, KeepMonthly: 12, KeepYearly: 75}
		perRule := map[string][]string{}
		var keptIDs []string
		for _, d := range Select(days, p, time.UTC) {
			if !d.Keep {
				continue
			}
			keptIDs = append(keptIDs, d.ID)
			for _, r := range d.Reasons {
				rule, _, _ := strings.Cut(r, " ")
				perRule[rule] = append(perRule[rule], d.ID)
			}
		}
		if len(keptIDs) != 7+4+11+74 {
			t.Errorf("kept %d points, want %d", len(keptIDs), 7+4+11+74)
		}
		for rule, n := range map[string]int{"daily": 7, "weekly": 5, "monthly": 12, "yearly": 75} {
			if len(perRule[rule]) != n {
				t.Errorf("%s keeps %d points, want %d", rule, len(perRule[rule]), n)
			}
		}
		check := func(rule string, want []string) {
			t.Helper()
			if got := perRule[rule]; !reflect.DeepEqual(got, want) {
				t.Errorf("%s keeps %q, want %q", rule, got, want)
			}
		}
		check("daily", []string{"2023-12-31", "2023-12-30", "2023-12-29", "2023-12-28", "2023-12-27", "2023-12-26", "2023-12-25"})
		check("weekly", []string{"2023-12-31", "2023-12-24", "2023-12-17", "2023-12-10", "2023-12-03"})
		check("monthly", []string{"2023-12-31", "2023-11-30", "2023-10-31", "2023-09-30", "2023-08-31", "2023-07-31",
			"2023-06-30", "2023-05-31", "2023-04-30", "2023-03-31", "2023-02-28", "2023-01-31"})
		if y := perRule["yearly"]; len(y) == 75 && (y[0] != "2023-12-31" || y[74] != "1949-12-31") {
			t.Errorf("yearly keeps %s … %s, want 2023-12-31 … 1949-12-31", y[0], y[74])
		}
	})
}
