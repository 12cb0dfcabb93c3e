// Package retention decides which restore points a policy keeps.
//
// The rules are restic's (`restic forget --keep-*`), which Proxmox Backup
// Server's operators also know:
//
//   - keep-last N keeps the N newest restore points;
//   - keep-daily D keeps, for each of the D most recent days that have a
//     restore point, the newest point of that day; keep-weekly W, -monthly
//     M and -yearly Y do the same for ISO weeks, calendar months and years.
//
// Every rule looks at all the points on its own: a point kept by any rule
// is kept, and a point kept by one rule still counts for the others (a
// single backup can be the last one, its day's, its week's, its month's
// and its year's). As in restic since 0.17, a calendar rule that finds
// fewer periods than its count also keeps the oldest point ("oldest
// daily", ...). Days, weeks, months and years are calendar periods in
// the location the caller gives (the worker's local time zone).
//
// The package is pure: no clock, no I/O. What to do with the points that
// are not kept (merge them into the points that depend on them, delete
// them) is the prune's business.
package retention

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"
)

// DefaultMaxChain is the longest chain of images a disk gets when its
// policy does not say: the 31st backup of a disk is a full one.
const DefaultMaxChain = 30

// Policy is what to keep of one VM's restore points. A zero keep count
// turns its rule off; at least one rule must be on (see Validate).
type Policy struct {
	KeepLast    int `json:"keep_last"`
	KeepDaily   int `json:"keep_daily"`
	KeepWeekly  int `json:"keep_weekly"`
	KeepMonthly int `json:"keep_monthly"`
	KeepYearly  int `json:"keep_yearly"`
	// MaxChain bounds a disk's chain: when it holds MaxChain images, the
	// next backup of the disk is a full one. 0 means DefaultMaxChain.
	MaxChain int `json:"max_chain"`
}

// ErrNoRule is returned by Validate for a policy that would keep nothing.
var ErrNoRule = errors.New("a retention policy must keep something: give at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly greater than 0")

// Validate checks the counts: none negative, at least one keep rule on.
func (p Policy) Validate() error {
	for _, f := range []struct {
		name string
		n    int
	}{
		{"keep-last", p.KeepLast}, {"keep-daily", p.KeepDaily}, {"keep-weekly", p.KeepWeekly},
		{"keep-monthly", p.KeepMonthly}, {"keep-yearly", p.KeepYearly}, {"max-chain", p.MaxChain},
	} {
		if f.n < 0 {
			return fmt.Errorf("--%s %d: must be 0 or more", f.name, f.n)
		}
	}
	if p.KeepLast+p.KeepDaily+p.KeepWeekly+p.KeepMonthly+p.KeepYearly == 0 {
		return ErrNoRule
	}
	return nil
}

// Chain is the policy's chain bound, DefaultMaxChain when unset.
func (p Policy) Chain() int {
	if p.MaxChain <= 0 {
		return DefaultMaxChain
	}
	return p.MaxChain
}

// String describes the policy the way the flags set it, e.g.
// "keep-last 2, keep-daily 7, max-chain 30".
func (p Policy) String() string {
	var parts []string
	for _, f := range []struct {
		name string
		n    int
	}{
		{"keep-last", p.KeepLast}, {"keep-daily", p.KeepDaily}, {"keep-weekly", p.KeepWeekly},
		{"keep-monthly", p.KeepMonthly}, {"keep-yearly", p.KeepYearly},
	} {
		if f.n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", f.name, f.n))
		}
	}
	parts = append(parts, fmt.Sprintf("max-chain %d", p.Chain()))
	return strings.Join(parts, ", ")
}

// Point is a restore point as the rules see it: its ID and when it was
// taken.
type Point struct {
	ID   string
	Time time.Time
}

// Decision is what the policy says of one point.
type Decision struct {
	ID   string
	Time time.Time
	Keep bool
	// Reasons name the rules that keep the point, e.g. "last 1",
	// "daily 2026-12-03", "weekly 2026-W49", "monthly 2026-12",
	// "yearly 2026"; empty when the point is not kept.
	Reasons []string
}

// Select applies p to points and returns one decision per point, newest
// first (points of the same time in descending ID order, so the answer
// never depends on the input's order). loc is the time zone of the
// calendar rules.
func Select(points []Point, p Policy, loc *time.Location) []Decision {
	if loc == nil {
		loc = time.UTC
	}
	sorted := append([]Point(nil), points...)
	sort.Slice(sorted, func(i, j int) bool {
		if !sorted[i].Time.Equal(sorted[j].Time) {
			return sorted[i].Time.After(sorted[j].Time)
		}
		return sorted[i].ID > sorted[j].ID
	})
	type rule struct {
		name   string
		left   int
		period func(t time.Time, i int) string
		last   string
		used   bool
	}
	rules := []*rule{
		{name: "last", left: p.KeepLast, period: func(_ time.Time, i int) string { return fmt.Sprint(i + 1) }},
		{name: "daily", left: p.KeepDaily, period: func(t time.Time, _ int) string { return t.Format("2006-01-02") }},
		{name: "weekly", left: p.KeepWeekly, period: func(t time.Time, _ int) string {
			y, w := t.ISOWeek()
			return fmt.Sprintf("%04d-W%02d", y, w)
		}},
		{name: "monthly", left: p.KeepMonthly, period: func(t time.Time, _ int) string { return t.Format("2006-01") }},
		{name: "yearly", left: p.KeepYearly, period: func(t time.Time, _ int) string { return t.Format("2006") }},
	}
	out := make([]Decision, 0, len(sorted))
	for i, pt := range sorted {
		d := Decision{ID: pt.ID, Time: pt.Time}
		t := pt.Time.In(loc)
		for _, r := range rules {
			if r.left <= 0 {
				continue
			}
			per := r.period(t, i)
			if r.used && per == r.last {
				continue // a newer point already stands for this period
			}
			r.last, r.used = per, true
			r.left--
			d.Keep = true
			d.Reasons = append(d.Reasons, r.name+" "+per)
		}
		out = append(out, d)
	}
	// As restic does since 0.17: a calendar rule that found fewer periods
	// than it may keep also keeps the oldest point, so that a young
	// repository's history is not cut short ("oldest yearly": keep-yearly
	// 5 with two years of backups keeps the very first one too).
	if n := len(out); n > 0 {
		for _, r := range rules[1:] {
			if r.left > 0 && r.used {
				out[n-1].Keep = true
				out[n-1].Reasons = append(out[n-1].Reasons, "oldest "+r.name)
			}
		}
	}
	return out
}
