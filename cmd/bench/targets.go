package main

import (
	"fmt"
	"io"
	"math"
)

// targets collects issue 12's targets as the bench measures them: each
// section prints its own when it ends, and the run ends with all of them,
// so that a reader of a long run finds every verdict in one place. Nothing
// is asserted: a FAIL is a figure, not an error.
type targets struct {
	lines []target
}

// target is one figure beside its target.
type target struct {
	section string
	name    string // what is measured
	value   string // the figure, with its unit
	goal    string // the target, e.g. "≤ 1.00×"
	ok      bool
	note    string // e.g. why the figure is not comparable to the target
}

func (t target) String() string {
	s := fmt.Sprintf("  %-44s %10s  target %-10s %s", t.name, t.value, t.goal, verdict(t.ok))
	if t.note != "" {
		s += " (" + t.note + ")"
	}
	return s
}

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "FAIL"
}

// add records a target of section.
func (ts *targets) add(section, name, value, goal string, ok bool, note string) {
	ts.lines = append(ts.lines, target{section: section, name: name, value: value, goal: goal, ok: ok, note: note})
}

// print writes section's targets under a heading.
func (ts *targets) print(w io.Writer, section string) {
	fmt.Fprintf(w, "\ntargets, %s (issue 12; not asserted anywhere):\n", section)
	for _, t := range ts.lines {
		if t.section == section {
			fmt.Fprintln(w, t)
		}
	}
}

// summary writes every target of the run, section by section, and the
// count of each verdict.
func (ts *targets) summary(w io.Writer) {
	if len(ts.lines) == 0 {
		return
	}
	fmt.Fprintf(w, "\nall targets of this run (issue 12; not asserted anywhere):\n")
	pass, section := 0, ""
	for _, t := range ts.lines {
		if t.section != section {
			section = t.section
			fmt.Fprintf(w, " %s:\n", section)
		}
		fmt.Fprintln(w, t)
		if t.ok {
			pass++
		}
	}
	fmt.Fprintf(w, "%d PASS, %d FAIL\n", pass, len(ts.lines)-pass)
}

// rounded rounds v to digits decimals: a verdict is on the figure as
// printed, so that "0.80×" never fails "≥ 0.80×".
func rounded(v float64, digits int) float64 {
	p := math.Pow10(digits)
	return math.Round(v*p) / p
}
