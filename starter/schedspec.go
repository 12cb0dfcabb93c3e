package main

import (
	"fmt"
	"strconv"
	"strings"

	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/units"
)

// specText says when a schedule runs, as a person reads it: "every 24h
// at +2h" for an interval, "cron 30 2 * * *" for calendar times (Temporal
// keeps a cron expression as calendar fields: they are shown as cron
// fields again).
func specText(sp *client.ScheduleSpec) string {
	if sp == nil {
		return "-"
	}
	var parts []string
	for _, iv := range sp.Intervals {
		s := "every " + units.Duration(iv.Every)
		if iv.Offset > 0 {
			s += " at +" + units.Duration(iv.Offset)
		}
		parts = append(parts, s)
	}
	for _, c := range sp.CronExpressions {
		parts = append(parts, "cron "+c)
	}
	for _, c := range sp.Calendars {
		parts = append(parts, "cron "+calendarCron(c))
	}
	if len(parts) == 0 {
		return "-"
	}
	s := strings.Join(parts, "; ")
	if sp.TimeZoneName != "" && sp.TimeZoneName != "UTC" {
		s += " (" + sp.TimeZoneName + ")"
	}
	return s
}

// calendarCron writes a calendar spec as a cron expression: minute hour
// day-of-month month day-of-week, with the seconds first when they are
// not 0 and the years last when set.
func calendarCron(c client.ScheduleCalendarSpec) string {
	fields := []string{
		cronField(c.Minute, 0, 59, "0"),
		cronField(c.Hour, 0, 23, "0"),
		cronField(c.DayOfMonth, 1, 31, "*"),
		cronField(c.Month, 1, 12, "*"),
		cronField(c.DayOfWeek, 0, 6, "*"),
	}
	if sec := cronField(c.Second, 0, 59, "0"); sec != "0" {
		fields = append([]string{sec}, fields...)
	}
	if len(c.Year) > 0 {
		if len(fields) == 5 {
			fields = append([]string{"0"}, fields...)
		}
		fields = append(fields, cronField(c.Year, 0, 0, "*"))
	}
	return strings.Join(fields, " ")
}

// cronField writes ranges as a cron field; the whole range [lo, hi] is
// "*" (or "*/step"), and no range at all is def (Temporal's default).
func cronField(rs []client.ScheduleRange, lo, hi int, def string) string {
	if len(rs) == 0 {
		return def
	}
	var out []string
	for _, r := range rs {
		end, step := r.End, r.Step
		if end < r.Start {
			end = r.Start
		}
		if step <= 0 {
			step = 1
		}
		var s string
		switch {
		case hi > 0 && r.Start == lo && end >= hi:
			s = "*"
		case end == r.Start:
			s = strconv.Itoa(r.Start)
		default:
			s = fmt.Sprintf("%d-%d", r.Start, end)
		}
		if step > 1 {
			s += "/" + strconv.Itoa(step)
		}
		out = append(out, s)
	}
	return strings.Join(out, ",")
}
