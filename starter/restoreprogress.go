package main

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"go.temporal.io/sdk/client"

	"github.com/cbtflow/cbtflow/internal/units"
	"github.com/cbtflow/cbtflow/workflows"
)

// followRestore waits for the Restore wid to end and returns its result
// (the error of Get), drawing its progress on w meanwhile (a terminal):
// a headline, then a bar for the chain's verification and one for the
// writing, as `backup --wait` draws a backup's.
func followRestore(ctx context.Context, c client.Client, w io.Writer, wid, runID string) (workflows.RestoreResult, error) {
	return followWorkflow(ctx, c, wid, runID, newRestoreBarView(ctx, w))
}

// resultView draws a workflow's progress answers (P) on a terminal,
// then its end and result (R).
type resultView[P, R any] interface {
	show(P)
	end(completed bool, res R)
}

// followWorkflow waits for the workflow wid to end and returns its result
// (the error of Get), showing its progress query's answers on v every
// pollInterval meanwhile (an answer that does not come keeps the last).
func followWorkflow[P, R any](ctx context.Context, c client.Client, wid, runID string, v resultView[P, R]) (R, error) {
	var res R
	done := make(chan error, 1)
	go func() { done <- c.GetWorkflow(ctx, wid, runID).Get(ctx, &res) }()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if p, err := queryProgress[P](qctx, c, wid, runID); err == nil {
			v.show(p)
		}
		cancel()
		select {
		case err := <-done:
			v.end(err == nil, res)
			return res, err
		case <-tick.C:
		}
	}
}

// restorePhaseText says where a restore stands, in an operator's words.
func restorePhaseText(p workflows.RestoreProgress) string {
	switch p.Phase {
	case workflows.RestoreStarting:
		return "looking up the restore point"
	case workflows.RestoreVerifying:
		return "verifying the chain against the catalog"
	case workflows.RestoreWriting:
		return "writing"
	}
	return string(p.Phase)
}

// restoreFigures is a stage's bytes, percent, rate and ETA.
func restoreFigures(done, total int64, rate, eta float64) string {
	if total <= 0 {
		return ""
	}
	s := fmt.Sprintf("%s of %s (%.0f%%)", units.Bytes(done), units.Bytes(total), min(100, float64(done)*100/float64(total)))
	if rate > 0 {
		s += fmt.Sprintf(", %s/s", units.Bytes(int64(rate)))
	}
	if eta > 0 {
		s += ", ETA " + units.Seconds(eta)
	}
	return s
}

// restoreStage is what one bar shows: its latest figures.
type restoreStage struct {
	done, total int64
	rate, eta   float64
	finished    bool
}

// restoreBarView draws a restore's headline and its two bars (mpb),
// redrawn in place. A bar never goes back: an answer without the
// activity's figures (the worker's describe failed) keeps the last ones.
type restoreBarView struct {
	p      *mpb.Progress
	mu     sync.Mutex
	last   workflows.RestoreProgress
	stages map[workflows.RestorePhase]*restoreStage
	bars   map[workflows.RestorePhase]*mpb.Bar
	head   *mpb.Bar
	start  time.Time
}

// restoreStages are the phases that have a bar, in order, and their labels.
var restoreStages = []struct {
	phase workflows.RestorePhase
	label string
}{{workflows.RestoreVerifying, "verify"}, {workflows.RestoreWriting, "write"}}

func newRestoreBarView(ctx context.Context, w io.Writer) *restoreBarView {
	v := &restoreBarView{p: mpb.NewWithContext(ctx, mpb.WithOutput(w), mpb.WithWidth(100), mpb.WithRefreshRate(200*time.Millisecond)),
		stages: map[workflows.RestorePhase]*restoreStage{}, bars: map[workflows.RestorePhase]*mpb.Bar{}, start: time.Now()}
	v.head = v.p.New(1, mpb.NopStyle(), mpb.PrependDecorators(decor.Any(func(decor.Statistics) string {
		v.mu.Lock()
		defer v.mu.Unlock()
		if v.last.BackupID == "" {
			return "starting the restore…"
		}
		vm := ""
		if v.last.VM != "" {
			vm = " of VM " + v.last.VM
		}
		return fmt.Sprintf("restore of backup %s%s disk %d to %s: %s (%s)", v.last.BackupID, vm, v.last.DiskKey, v.last.To,
			restorePhaseText(v.last), units.Duration(time.Since(v.start).Round(time.Second)))
	})))
	for _, s := range restoreStages {
		phase, label := s.phase, s.label
		v.stages[phase] = &restoreStage{}
		v.bars[phase] = v.p.New(0, mpb.BarStyle().Lbound("[").Rbound("]"),
			mpb.PrependDecorators(decor.Any(func(decor.Statistics) string { return fmt.Sprintf("  %-7s", label) })),
			mpb.AppendDecorators(decor.Any(func(decor.Statistics) string {
				v.mu.Lock()
				defer v.mu.Unlock()
				st := v.stages[phase]
				if st.finished {
					return " done" + func() string {
						if st.total > 0 {
							return ", " + units.Bytes(st.total)
						}
						return ""
					}()
				}
				return " " + restoreFigures(st.done, st.total, st.rate, st.eta)
			})))
	}
	return v
}

func (v *restoreBarView) show(p workflows.RestoreProgress) {
	v.mu.Lock()
	v.last = p
	reached := false
	for i := len(restoreStages) - 1; i >= 0; i-- {
		phase := restoreStages[i].phase
		st := v.stages[phase]
		switch {
		case p.Phase == workflows.RestoreCompleted || reached:
			// A later phase runs: this one is over.
			st.finished = true
		case p.Phase == phase && p.Live && p.Done >= st.done:
			st.done, st.total, st.rate, st.eta = p.Done, p.Total, p.Rate, p.ETASeconds
		}
		reached = reached || p.Phase == phase
	}
	type update struct {
		bar         *mpb.Bar
		done, total int64
		finished    bool
	}
	var ups []update
	for _, s := range restoreStages {
		st := v.stages[s.phase]
		ups = append(ups, update{v.bars[s.phase], st.done, st.total, st.finished})
	}
	v.mu.Unlock()
	for _, u := range ups {
		if u.bar.Completed() {
			continue
		}
		if u.total > 0 {
			u.bar.SetTotal(u.total, false)
		}
		u.bar.SetCurrent(u.done)
		if u.finished {
			u.bar.SetTotal(max(u.total, 1), true)
		}
	}
}

// end completes the bars (the writing's with the disk's size) with the
// completed restore's result or, when the restore did not complete,
// leaves them where they stood.
func (v *restoreBarView) end(completed bool, res workflows.RestoreResult) {
	if completed {
		v.mu.Lock()
		if st := v.stages[workflows.RestoreWriting]; res.Bytes > 0 {
			st.done, st.total = res.Bytes, res.Bytes
		}
		v.mu.Unlock()
		v.show(workflows.RestoreProgress{BackupID: res.BackupID, VM: res.VM, DiskKey: res.DiskKey, To: res.To,
			Format: res.Format, Phase: workflows.RestoreCompleted})
	}
	bars := []*mpb.Bar{v.head}
	for _, s := range restoreStages {
		bars = append(bars, v.bars[s.phase])
	}
	for _, b := range bars {
		if !b.Completed() {
			if completed {
				b.SetTotal(-1, true)
			} else {
				b.Abort(false)
			}
		}
	}
	v.p.Wait()
}
