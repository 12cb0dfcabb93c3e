package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/workflows"
)

// scalePrefix names the scale case's lab VMs: bench-scale-01, ...
const scalePrefix = "bench-scale-"

// scaleWrite is the size of each write of the scale case's incremental
// changes.
const scaleWrite = 64 << 10

// roundTimeout bounds one round of backups at once: a backup that hangs
// fails the bench instead of holding it.
const roundTimeout = 10 * time.Minute

// round is one set of backups started at once.
type round struct {
	vms       int
	completed int
	failures  []string             // backups that did not complete, and why
	wall      time.Duration        // the first start to the last completion
	bytes     int64                // changed bytes of every disk of the completed backups
	phases    []map[string]float64 // each completed backup's phases (phasesOf: rowTotal is its Backup's start to its BackupVM's close), its workflow tasks' wait in the queue as rowTasksQueued
	retries   []retry
	transfers transferSums
	peaks     peaks
	waited    int // transfers that logged waiting for a transfer slot
	cpu       cpuUse
	vcenter   calls // calls the worker made to the lab's vCenter in the round, by method
}

// transferSums adds up the transfers of a round (a TransferDisk each, or
// each disk of a TransferDisks): their count, their wall time and the
// steps their results report, in seconds.
type transferSums struct {
	n                               int
	total, setup, copy, check, hash float64
}

func (t *transferSums) add(spans []span) {
	for _, sp := range spans {
		if tr := sp.transfer; tr != nil {
			t.n++
			// The disk's own time (a TransferDisks' disks share its span).
			if tr.Seconds > 0 {
				t.total += tr.Seconds
			} else {
				t.total += sp.end.Sub(sp.start).Seconds()
			}
			t.setup += tr.SetupSeconds
			t.copy += tr.CopySeconds
			t.check += tr.CheckSeconds
			t.hash += tr.HashSeconds
		}
	}
}

// copierRef is the copier alone on the data of one disk: the reference
// of a round's throughput.
type copierRef struct {
	bytes    int64
	seconds  float64 // median
	min, max float64 // the fastest and the slowest run
}

func (c copierRef) rate() float64 { return float64(c.bytes) / c.seconds }

// scale backs up o.scaleVMs lab VMs of two disks each at once through the
// one worker, twice: full backups, then incrementals of a few MiB per
// disk. Each round's throughput is compared with the copier alone on one
// disk's data, measured in the same run.
func (r *e2eRun) scale(ctx context.Context) error {
	o, s, work := r.o, r.s, r.work
	l := s.Lab()
	fmt.Printf("\n%d VMs at once through one worker\n", o.scaleVMs)
	// Two patterns of data, one per disk, shared by every VM: no part of
	// the product looks at other disks' data, and the setup stays short.
	var srcs [2]string
	for i := range srcs {
		srcs[i] = filepath.Join(work, fmt.Sprintf("scale-%d.raw", i))
		if err := generate(srcs[i], o.scaleSize, o.scaleData, o.seed+10+uint64(i)); err != nil {
			return err
		}
		defer os.Remove(srcs[i])
	}
	setup := time.Now()
	var vms []string
	keys := map[string][]int32{}
	for i := 1; i <= o.scaleVMs; i++ {
		name := fmt.Sprintf("%s%02d", scalePrefix, i)
		ks, err := labVM(l, name, o.scaleSize, o.scaleSize)
		if err != nil {
			return err
		}
		for d, k := range ks {
			if err := fillDisk(l, name, k, srcs[d], nil); err != nil {
				return err
			}
		}
		vms = append(vms, name)
		keys[name] = ks
	}
	fmt.Printf("lab VMs %s01..%02d: two %d GiB disks each, each disk holding %d MiB of random data in scattered 1 MiB pieces (set up in %.1fs)\n",
		scalePrefix, o.scaleVMs, o.scaleSize/gib, o.scaleData/mib, time.Since(setup).Seconds())

	// The references: the copier alone on one disk's data, and on one
	// disk's incremental changes, one run before each round they are
	// compared with.
	fullAlone, err := r.newCopierAlone(ctx, srcs[0], o.scaleSize)
	if err != nil {
		return err
	}
	defer fullAlone.close()
	incrSrc := filepath.Join(work, "scale-incr.raw")
	if err := writeScattered(incrSrc, o.scaleSize, o.scaleIncr, scaleWrite, o.seed+1000); err != nil {
		return err
	}
	defer os.Remove(incrSrc)
	incrAlone, err := r.newCopierAlone(ctx, incrSrc, o.scaleSize)
	if err != nil {
		return err
	}
	defer incrAlone.close()

	limits, err := r.workerLimits()
	if err != nil {
		return err
	}
	fmt.Println(limits)
	fmt.Printf("%d rounds of each kind, each after one run of the copier alone; before each of both, the page cache is written back (sync), so that neither waits behind the other's writes, and the machine let become quiet (its CPUs less than %.0f%% busy over %d ms, at most %s), so that neither runs beside what the other left running\n",
		o.runs, quietBusy*100, quietWindow.Milliseconds(), quietMax)
	var waits []time.Duration
	settleQuiet := func() error {
		writeBack()
		d, _, err := waitQuiet()
		waits = append(waits, d)
		return err
	}
	// aloneThenRound times one run of the copier alone, then a round,
	// each on a settled, quiet machine.
	aloneThenRound := func(alone *copierAlone, mode string, minChanged int64, args ...string) (round, error) {
		if err := settleQuiet(); err != nil {
			return round{}, err
		}
		if err := alone.run(ctx, 1); err != nil {
			return round{}, err
		}
		if err := settleQuiet(); err != nil {
			return round{}, err
		}
		return r.round(ctx, vms, mode, minChanged, args...)
	}

	// The full rounds keep only the newest restore point of each VM: a
	// prune between them removes the round before last's (a retention
	// policy of --keep-last 1 on each of the case's VMs for their time,
	// set once the first round put them in the catalog; other cases' VMs
	// have none, and keep everything), so the rounds hold the space of
	// two, not of every one.
	var full, incr []round
	for i := range o.runs {
		if i == 1 {
			for _, vm := range vms {
				if err := r.starterOK(ctx, "retention", "set", vm, "--keep-last", "1"); err != nil {
					return err
				}
			}
		}
		if i >= 2 {
			if err := r.starterOK(ctx, "prune", "--wait"); err != nil {
				return err
			}
		}
		rd, err := aloneThenRound(fullAlone, workflows.ModeFull, 0, "--full")
		if err != nil {
			return err
		}
		full = append(full, rd)
	}
	if len(full) > 1 { // the policies were set
		for _, vm := range vms {
			if err := r.starterOK(ctx, "retention", "clear", vm); err != nil {
				return err
			}
		}
	}
	fullRef := fullAlone.ref()
	r.printRounds(fmt.Sprintf("full rounds: %d VMs at once, --full", o.scaleVMs), full, fullRef, fullAlone.times)

	for i := range o.runs {
		for v, vm := range vms {
			for d, k := range keys[vm] {
				seed := o.seed + 2000 + uint64(1000*i+2*v+d)
				if err := scatter(labWriter(l, vm, k), o.scaleSize, o.scaleIncr, scaleWrite, seed); err != nil {
					return err
				}
			}
		}
		rd, err := aloneThenRound(incrAlone, workflows.ModeIncremental, o.scaleIncr)
		if err != nil {
			return err
		}
		incr = append(incr, rd)
	}
	incrRef := incrAlone.ref()
	r.printRounds(fmt.Sprintf("incremental rounds: %d VMs at once, %d MiB changed per disk in %d KiB writes", o.scaleVMs, o.scaleIncr/mib, scaleWrite>>10), incr, incrRef, incrAlone.times)

	slices.Sort(waits)
	fmt.Printf("\nthe waits for a quiet machine: median %.2fs, longest %.2fs (of %d)\n", median(waits), waits[len(waits)-1].Seconds(), len(waits))

	const section = "VMs at once through one worker"
	t := o.targets
	note := ""
	if o.scaleVMs != 20 {
		note = fmt.Sprintf("the target is for 20 VMs: %d here", o.scaleVMs)
	}
	for _, c := range []struct {
		name   string
		rounds []round
		ref    copierRef
	}{{"full", full, fullRef}, {"incremental", incr, incrRef}} {
		var vms, completed, retries int
		var hwm int64
		for _, rd := range c.rounds {
			vms += rd.vms
			completed += rd.completed
			retries += len(rd.retries)
			hwm = max(hwm, rd.peaks.hwmKiB<<10)
		}
		t.add(section, c.name+" rounds: backups completed", fmt.Sprintf("%d/%d", completed, vms), fmt.Sprintf("%d/%d", vms, vms), completed == vms, note)
		t.add(section, c.name+" rounds: retries and failed tasks", fmt.Sprint(retries), "0", retries == 0, "")
		ratio := medianRate(c.rounds) / c.ref.rate()
		t.add(section, c.name+" rounds: throughput / one copier alone", fmt.Sprintf("%.2f×", ratio), "≥ 0.80×", rounded(ratio, 2) >= 0.8,
			fmt.Sprintf("medians of %d rounds and %d runs", len(c.rounds), o.runs))
		t.add(section, c.name+" rounds: worker peak RSS", fmt.Sprintf("%d MiB", hwm>>20), fmt.Sprintf("≤ %d MiB", rssBound>>20), hwm <= rssBound, "the highest of the rounds")
	}
	t.print(os.Stdout, section)
	return nil
}

// rate is a round's throughput: the changed bytes of its completed
// backups over its wall time.
func (rd round) rate() float64 { return float64(rd.bytes) / rd.wall.Seconds() }

// medianRate is the median of the rounds' throughputs.
func medianRate(rounds []round) float64 {
	v := make([]float64, len(rounds))
	for i, rd := range rounds {
		v[i] = rd.rate()
	}
	return medianOf(v)
}

// medianRound is the round of the median wall time (the faster of the
// two middle ones for an even count).
func medianRound(rounds []round) round {
	s := slices.Clone(rounds)
	slices.SortFunc(s, func(a, b round) int { return cmp.Compare(a.wall, b.wall) })
	return s[(len(s)-1)/2]
}

// starterOK runs the starter with args and fails unless it exits 0.
func (r *e2eRun) starterOK(ctx context.Context, args ...string) error {
	res, err := r.s.Starter(ctx, args...)
	if err != nil {
		return err
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("starter %s: %s", strings.Join(args, " "), res)
	}
	return nil
}

// rssBound is the worker's RSS the scale case accepts: what it needs
// idle (about 40 MiB), the copier's buffers of every transfer slot (16
// MiB each, 4 slots by default), and room for the SDK's caches of a few
// hundred workflows. A worker whose memory grew with the backups it runs
// rather than with its limits would pass it with 20 VMs only by luck, so
// the figure is printed beside the limits.
const rssBound = 256 << 20

// round starts a backup of every VM at once (`starter backup VM... --json`,
// without --wait: one process starts them all), waits
// for every one to end, and reads from the histories and the worker what
// they did. Each disk must be backed up in mode, and have changed at
// least minChanged bytes.
func (r *e2eRun) round(ctx context.Context, vms []string, mode string, minChanged int64, args ...string) (round, error) {
	s := r.s
	ctx, cancel := context.WithTimeout(ctx, roundTimeout)
	defer cancel()
	pid := s.WorkerPID()
	if pid == 0 {
		return round{}, fmt.Errorf("the worker is not running")
	}
	logStart, err := fileSize(s.WorkerLog())
	if err != nil {
		return round{}, err
	}
	callsBefore, err := vcenterCalls(s.MetricsURL())
	if err != nil {
		return round{}, err
	}
	smp, err := startSampler(pid, s.MetricsURL(), sampleEvery)
	if err != nil {
		return round{}, err
	}
	cpuBefore, err := cpuSnapshot(pid, s.TemporalPID())
	if err != nil {
		return round{}, err
	}
	type outcome struct {
		vm       string
		workflow string
		res      workflows.BackupVMResult
		end      time.Time
		err      error
	}
	out := make([]outcome, len(vms))
	var wg sync.WaitGroup
	start := time.Now()
	res, err := s.Starter(ctx, append(append([]string{"backup"}, vms...), append([]string{"--json"}, args...)...)...)
	if err != nil {
		return round{}, err
	}
	// Keyed by the VM's name as the worker resolved it: the bench names
	// its VMs by name, so that is the name given.
	started := map[string]workflows.BackupReport{}
	for line := range strings.Lines(res.Stdout) {
		var rep workflows.BackupReport
		if json.Unmarshal([]byte(line), &rep) == nil {
			started[rep.VM] = rep
		}
	}
	for i, vm := range vms {
		o := &out[i]
		o.vm = vm
		rep, ok := started[vm]
		if !ok || rep.Status != workflows.ReportRunning || rep.WorkflowID == "" {
			o.err = fmt.Errorf("starter backup: %s not started: %s", vm, res)
			continue
		}
		o.workflow = rep.WorkflowID
		wg.Add(1)
		go func() {
			defer wg.Done()
			o.err = s.Client().GetWorkflow(ctx, rep.WorkflowID, "").Get(ctx, &o.res)
			o.end = time.Now()
		}()
	}
	wg.Wait()
	cpuAfter, err := cpuSnapshot(pid, s.TemporalPID())
	if err != nil {
		return round{}, err
	}
	pk, err := smp.end()
	if err != nil {
		return round{}, err
	}
	if ctx.Err() != nil {
		return round{}, fmt.Errorf("the backups did not end within %s", roundTimeout)
	}
	callsAfter, err := vcenterCalls(s.MetricsURL())
	if err != nil {
		return round{}, err
	}
	rd := round{vms: len(vms), peaks: pk, cpu: cpuAfter.sub(cpuBefore), vcenter: callsAfter.sub(callsBefore)}
	var last time.Time
	for _, o := range out {
		if o.end.After(last) {
			last = o.end
		}
		if o.err != nil {
			rd.failures = append(rd.failures, fmt.Sprintf("%s: %v", o.vm, oneLine(o.err.Error())))
		} else {
			ok := true
			for _, d := range o.res.Disks {
				if d.Mode != mode || d.ChangedBytes < minChanged {
					rd.failures = append(rd.failures, fmt.Sprintf("%s: disk %d backed up %s with %d changed bytes, want %s with at least %d",
						o.vm, d.Key, d.Mode, d.ChangedBytes, mode, minChanged))
					ok = false
				}
				rd.bytes += d.ChangedBytes
			}
			if ok {
				rd.completed++
			}
		}
		if o.workflow == "" {
			continue
		}
		parent, child, err := backupHistories(ctx, s, o.workflow)
		if err != nil {
			return round{}, err
		}
		rd.retries = append(rd.retries, retriesOf(parent)...)
		rd.retries = append(rd.retries, retriesOf(child)...)
		if o.err == nil {
			if spans, opened, closed, err := backupSpans(parent, child); err == nil {
				ph := phasesOf(spans, opened, closed, closed.Sub(opened))
				ph[rowTasksQueued] = (workflowTasksQueued(parent) + workflowTasksQueued(child)).Seconds()
				rd.phases = append(rd.phases, ph)
				rd.transfers.add(spans)
			}
		}
	}
	if last.IsZero() { // none ended: the round's time is all there is
		last = time.Now()
	}
	rd.wall = last.Sub(start)
	log, err := readFrom(s.WorkerLog(), logStart)
	if err != nil {
		return round{}, err
	}
	rd.waited = strings.Count(log, "waiting for a transfer slot")
	return rd, nil
}

// printRounds prints each round in a line, beside the run of the copier
// alone before it (times, in the order run), then the round of the median
// wall time in detail.
func (r *e2eRun) printRounds(title string, rounds []round, ref copierRef, times []time.Duration) {
	fmt.Printf("\n%s:\n", title)
	for i, rd := range rounds {
		alone := "-"
		if i < len(times) {
			alone = fmt.Sprintf("%.3fs", times[i].Seconds())
		}
		fmt.Printf("  round %d: %d of %d completed, %.2fs, %.1f MiB/s (%.2f× the copier alone's median), the copier alone before it %s, worker peak RSS %d MiB\n",
			i+1, rd.completed, rd.vms, rd.wall.Seconds(), rd.rate()/float64(mib), rd.rate()/ref.rate(), alone, rd.peaks.hwmKiB>>10)
		for _, f := range rd.failures {
			fmt.Printf("    not completed: %s\n", f)
		}
	}
	fmt.Printf("  median of the rounds' throughputs %.1f MiB/s, %.2f× the copier alone (%.1f MiB/s, median of %d runs)\n",
		medianRate(rounds)/float64(mib), medianRate(rounds)/ref.rate(), ref.rate()/float64(mib), len(times))
	med := medianRound(rounds)
	n := slices.IndexFunc(rounds, func(rd round) bool { return rd.wall == med.wall })
	r.printRound(fmt.Sprintf("the round of the median wall time (round %d), in detail", n+1), med, ref)
}

// printRound prints what a round did and the worker's peaks meanwhile.
func (r *e2eRun) printRound(title string, rd round, ref copierRef) {
	fmt.Printf("%s:\n", title)
	row := func(name, format string, args ...any) {
		fmt.Printf("  %-52s %s\n", name, fmt.Sprintf(format, args...))
	}
	row("backups completed", "%d of %d", rd.completed, rd.vms)
	for _, f := range rd.failures {
		row("  not completed", "%s", f)
	}
	row("wall time, first start to last completion", "%.2fs", rd.wall.Seconds())
	// column is one phase of every completed backup, sorted.
	column := func(name string) []float64 {
		var v []float64
		for _, ph := range rd.phases {
			v = append(v, ph[name])
		}
		slices.Sort(v)
		return v
	}
	if len(rd.phases) > 0 {
		lat := column(rowTotal)
		row("each backup, Backup's start to BackupVM's close", "median %.2fs, min %.2fs, max %.2fs", medianOf(slices.Clone(lat)), lat[0], lat[len(lat)-1])
		row("each backup's phases, seconds", "median (max) of the %d completed", len(rd.phases))
		for _, name := range []string{rowSnapshot, rowQuery, rowSetup, rowCopy, rowOverhead, rowTasksQueued} {
			v := column(name)
			label := strings.TrimSpace(name)
			if name == rowSetup {
				label += ", the wait for a slot included"
			}
			row("  "+label, "%.3f (%.3f)", medianOf(slices.Clone(v)), v[len(v)-1])
		}
	}
	rate := float64(rd.bytes) / rd.wall.Seconds()
	row("bytes copied (changed bytes of every disk)", "%d MiB", rd.bytes/mib)
	row("aggregate throughput", "%.1f MiB/s", rate/float64(mib))
	row("one copier alone, one disk's bytes", "%.1f MiB/s (%d MiB in %.3fs, median of %d, one before each round, %.3f–%.3fs; %.2f× of it)",
		ref.rate()/float64(mib), ref.bytes/mib, ref.seconds, r.o.runs, ref.min, ref.max, rate/ref.rate())
	if r.o.copierRate > 0 {
		row("the copier part's full copy", "%.1f MiB/s (%.2f× of it)", r.o.copierRate/float64(mib), rate/r.o.copierRate)
	}
	row("vCenter calls (the worker's cbtflow_vcenter_calls_total)", "%.0f, %.1f per backup", rd.vcenter.total(), rd.vcenter.total()/float64(max(rd.vms, 1)))
	row("  per backup, by method", "%s", rd.vcenter.perBackup(rd.vms))
	if len(rd.retries) == 0 {
		row("activity retries, failed activities, failed workflow tasks", "none")
	} else {
		row("activity retries, failed activities, failed workflow tasks", "%d", len(rd.retries))
		for _, c := range retryCounts(rd.retries) {
			fmt.Printf("    %s\n", c)
		}
	}
	if tr := rd.transfers; tr.n > 0 {
		row(fmt.Sprintf("the %d transfers (TransferDisk), seconds summed", tr.n), "%.1f: setup with the wait for a slot %.1f, copy %.1f, image check %.1f, checksum %.1f, rest %.1f",
			tr.total, tr.setup, tr.copy, tr.check, tr.hash, max(0, tr.total-tr.setup-tr.copy-tr.check-tr.hash))
	}
	row("transfers that waited for a transfer slot", "%d", rd.waited)
	if c := rd.cpu; c.cpus > 0 {
		// Every start to the last completion (the CPU is read after the
		// last backup's result, a little after its completion).
		row("CPU seconds used, machine (of CPUs × wall time)", "%.1f of %.1f", c.machine, float64(c.cpus)*rd.wall.Seconds())
		row("  the worker, its NBD servers and qemu-img runs", "%.1f", c.worker)
		row("  the Temporal dev server", "%.1f", c.temporal)
		row("  PostgreSQL", "%.1f", c.postgres)
		row("  the bench: the lab's vCenter and disks, the starters", "%.1f", c.bench)
		row("  the rest of the machine", "%.1f", max(0, c.machine-c.worker-c.temporal-c.postgres-c.bench))
		row("CPU seconds the host took (steal: other guests ran on these CPUs)", "%.1f", c.steal)
	}
	row("worker peak RSS (VmHWM, reset before the round)", "%d MiB (highest VmRSS sampled: %d MiB)", rd.peaks.hwmKiB>>10, rd.peaks.rssKiB>>10)
	row("worker's open files, most sampled", "%d", rd.peaks.files)
	row("worker's NBD servers (qemu-nbd, nbdkit), most at once", "%d (their RSS together: %d MiB)", rd.peaks.servers, rd.peaks.serversRSS>>10)
	row("activity slots in use, most sampled", "%d", rd.peaks.activitySlot)
	row(fmt.Sprintf("samples (every %d ms)", sampleEvery.Milliseconds()), "%d", rd.peaks.samples)
}

// copierAlone times the bench's copy command (the copier in a process of
// its own, as in the copier part) on the data of one sparse file, into a
// fresh QCOW2 it writes itself (as a backup does: --image), from nbdkit's
// file plugin: the copier
// alone on the bytes a backup copies, measured between the backups so
// that both see the same machine.
type copierAlone struct {
	r       *e2eRun
	src     string
	size    int64 // the disk's size, the target's
	bytes   int64 // the data copied
	extents string
	source  *qemu.Export
	tool    *tool
	times   []time.Duration
}

// newCopierAlone serves src for copierAlone runs; close stops it.
func (r *e2eRun) newCopierAlone(ctx context.Context, src string, size int64) (c *copierAlone, err error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	extents, err := allocated(src)
	if err != nil {
		return nil, err
	}
	c = &copierAlone{r: r, src: src, size: size, extents: src + ".extents.json"}
	for _, e := range extents {
		c.bytes += e.Length
	}
	if err := writeJSON(c.extents, extents); err != nil {
		return nil, err
	}
	if c.source, err = qemu.StartNbdkit(ctx, qemu.NbdkitFile(src, true)); err != nil {
		os.Remove(c.extents)
		return nil, err
	}
	c.tool = &tool{name: "cbtflow", argv: func(target string) [][]string {
		return [][]string{{self, "copy", "--source", c.source.URI(), "--image", target, "--extents", c.extents}}
	}}
	return c, nil
}

// run times n copies; the first copy of all is compared with the source.
func (c *copierAlone) run(ctx context.Context, n int) error {
	for i := 0; i < n; i++ {
		d, _, _, err := timeOne(ctx, c.r.work, c.tool, c.size, c.src, len(c.times) == 0)
		if err != nil {
			return fmt.Errorf("the copier alone on %s, run %d: %w", filepath.Base(c.src), len(c.times)+1, err)
		}
		c.times = append(c.times, d)
	}
	return nil
}

// ref is the median of the runs so far.
func (c *copierAlone) ref() copierRef {
	t := slices.Clone(c.times)
	slices.Sort(t)
	return copierRef{bytes: c.bytes, seconds: median(t), min: t[0].Seconds(), max: t[len(t)-1].Seconds()}
}

func (c *copierAlone) close() {
	c.source.Close()
	os.Remove(c.extents)
}

// workerLimits describes the running worker's concurrency limits as it
// was configured: its transfer slots (from its start-up log line), the
// SDK's task slots (its gauges, available plus used), its open files
// limit.
func (r *e2eRun) workerLimits() (string, error) {
	s := r.s
	pid := s.WorkerPID()
	b, err := os.ReadFile(s.WorkerLog())
	if err != nil {
		return "", err
	}
	transfers := logSetting(string(b), "worker starting", "max_transfers")
	limits, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return "", err
	}
	text, err := scrape(httpClient(), s.MetricsURL())
	if err != nil {
		return "", err
	}
	avail, used := gauges(text, slotsAvailable, "worker_type"), gauges(text, slotsUsed, "worker_type")
	slots := func(kind string) string {
		a, ok := avail[kind]
		if !ok {
			return "? (no gauge yet)"
		}
		return fmt.Sprint(a + used[kind])
	}
	var w strings.Builder
	fmt.Fprintf(&w, "the worker's concurrency limits, as configured (read from the running worker, pid %d):\n", pid)
	fmt.Fprintf(&w, "  %-52s %s\n", "transfer slots (--max-transfers; its start-up log)", transfers)
	fmt.Fprintf(&w, "  %-52s %s\n", "activity slots (SDK gauges: available + used)", slots("ActivityWorker"))
	fmt.Fprintf(&w, "  %-52s %s\n", "local activity slots", slots("LocalActivityWorker"))
	fmt.Fprintf(&w, "  %-52s %s\n", "workflow task slots", slots("WorkflowWorker"))
	pollers := gauges(text, numPollers, "poller_type")
	poll := func(kind, how string) string {
		n, ok := pollers[kind]
		if !ok {
			return "? (no gauge yet)"
		}
		return fmt.Sprintf("%v now (%s)", n, how)
	}
	fmt.Fprintf(&w, "  %-52s %s\n", "workflow task pollers (SDK gauge)", poll("workflow_task", "the worker's fixed number, split between its sticky and normal queues"))
	fmt.Fprintf(&w, "  %-52s %s\n", "activity task pollers", poll("activity_task", "scaled by the SDK between 1 and 100"))
	fmt.Fprintf(&w, "  %-52s %s", "open files (soft limit, /proc/PID/limits)", limitOf(string(limits), "Max open files"))
	return w.String(), nil
}

// logSetting returns the value of key=value on the last line of a log
// that contains marker ("?" when there is none).
func logSetting(log, marker, key string) string {
	v := "?"
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, marker) {
			continue
		}
		for _, f := range strings.Fields(line) {
			if val, ok := strings.CutPrefix(f, key+"="); ok {
				v = val
			}
		}
	}
	return v
}

// writeScattered makes a sparse file of size bytes holding n bytes of
// random data in piece-byte writes at scattered places (scatter).
func writeScattered(path string, size, n, piece int64, seed uint64) error {
	return makeSparse(path, size, func(f *os.File) error {
		return scatter(func(off int64, p []byte) error { _, err := f.WriteAt(p, off); return err }, size, n, piece, seed)
	})
}

func fileSize(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// readFrom reads a file from offset on.
func readFrom(path string, offset int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if _, err := f.Seek(offset, 0); err != nil {
		return "", err
	}
	b, err := io.ReadAll(f)
	return string(b), err
}
