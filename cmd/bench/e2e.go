package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	enumspb "go.temporal.io/api/enums/v1"
	historypb "go.temporal.io/api/history/v1"

	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/testutil"
	"github.com/cbtflow/cbtflow/workflows"
)

// e2eOptions configure the end-to-end part.
type e2eOptions struct {
	dir        string // work folder, removed at the end
	size, data int64  // the full backup's disk and its data
	incrData   int64  // changed bytes before each incremental
	incrWrite  int64  // size of each of those writes
	twoData    int64  // data on each disk of the unchanged two-disk VM
	runs       int
	seed       uint64
	verbose    bool
	keep       bool // keep the work folder
	// temporalTmpfs puts the Temporal dev server's database in memory
	// (in stack.TemporalDBTmpfs, the default of package stack; false
	// is its Options.TemporalDBOnDisk).
	temporalTmpfs bool
	cases         []string // of e2eCases, in that order

	scaleVMs             int   // VMs backed up at once
	scaleSize, scaleData int64 // each of their two disks, and its data
	scaleIncr            int64 // bytes changed on each disk before the incremental round

	largeSize, largeRef int64 // the large disk and the disk it is compared with
	largeData           int64 // the data both hold
	largeSpread         bool  // the large disk's data at offsets scaled to its size

	// copierRate is the copier part's full copy in bytes per second (0:
	// the copier part did not run).
	copierRate float64
	targets    *targets
}

// e2eCases are the end-to-end part's cases: the full, incremental and
// unchanged backups of one VM at a time (basic), many VMs at once through
// one worker (scale), and a large sparse disk against a small one with
// the same data (large).
var e2eCases = []string{"basic", "scale", "large"}

// e2eRun is the end-to-end part's stack and work folder, shared by its
// cases.
type e2eRun struct {
	o    e2eOptions
	s    *stack.Stack
	work string
}

// The lab VMs the end-to-end part creates.
const (
	vmOne = "bench-one" // one disk: the full and the incremental backups
	vmTwo = "bench-two" // two disks: the unchanged backups
)

// sample is one timed backup: its phases (phasesOf), in seconds.
type sample map[string]float64

// runE2E backs up lab VMs through the real starter, worker, Temporal and
// PostgreSQL on a stack of its own, case by case (o.cases), and prints
// where the time goes and issue 12's targets. Everything it starts or
// creates (the stack, its database, the lab's images, the repository) is
// gone when it returns.
func runE2E(ctx context.Context, o e2eOptions) (err error) {
	if o.dir != "" {
		if err := os.MkdirAll(o.dir, 0o755); err != nil {
			return err
		}
	}
	work, err := os.MkdirTemp(o.dir, "cbtflow-bench-e2e-")
	if err != nil {
		return err
	}
	defer func() {
		if o.keep {
			fmt.Printf("kept the end-to-end part's work folder %s (the stack's logs and state, Temporal's database included, in %s)\n", work, filepath.Join(work, "state"))
			return
		}
		err = errors.Join(err, os.RemoveAll(work))
	}()

	fmt.Printf("\nend to end: building the release worker and starter (make build), starting a stack of its own\n")
	bins, err := releaseBinaries(ctx, filepath.Join(work, "bin"))
	if err != nil {
		return err
	}
	dbURL, drop, err := stack.CreateDatabase(ctx, testutil.AdminDatabaseURL(), "cbtflow_bench_")
	if err != nil {
		return err
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		err = errors.Join(err, drop(dctx))
	}()
	up := time.Now()
	s, err := stack.Start(ctx, stack.Options{Dir: filepath.Join(work, "state"), DatabaseURL: dbURL, Binaries: bins, TemporalDBOnDisk: !o.temporalTmpfs})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := s.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		if err != nil {
			if b, rerr := os.ReadFile(s.WorkerLog()); rerr == nil {
				lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
				fmt.Fprintf(os.Stderr, "last lines of the worker's log:\n%s\n", strings.Join(lines[max(0, len(lines)-20):], "\n"))
			}
		}
	}()
	fmt.Printf("stack up in %.1fs (Temporal dev server %s, lab, worker)\n", time.Since(up).Seconds(), s.TemporalAddress())
	if db := s.TemporalDB(); !strings.HasPrefix(db, stack.TemporalDBTmpfs+"/") {
		if o.temporalTmpfs {
			fmt.Printf("warning: the Temporal dev server's database is on disk (%s), beside the repository: %s is missing or not writable\n", db, stack.TemporalDBTmpfs)
		}
	} else if _, err := os.Stat(db); err != nil {
		fmt.Printf("warning: the Temporal dev server did not make its database in %s (%v)\n", db, err)
	} else {
		fmt.Printf("the Temporal dev server's database is in memory (%s), not on the disk of the repository and the lab\n", db)
	}

	r := &e2eRun{o: o, s: s, work: work}
	for _, c := range o.cases {
		start := time.Now()
		switch c {
		case "basic":
			err = r.basic(ctx)
		case "scale":
			err = r.scale(ctx)
		case "large":
			err = r.large(ctx)
		default:
			err = fmt.Errorf("unknown case %q", c)
		}
		if err != nil {
			return fmt.Errorf("end-to-end case %s: %w", c, err)
		}
		fmt.Printf("(end-to-end case %s took %.0fs)\n", c, time.Since(start).Seconds())
	}
	return nil
}

// basic times full, incremental and unchanged backups of one VM at a
// time, phase by phase, beside nbdcopy's time for the full backup's
// bytes, run alternately with the full backups.
func (r *e2eRun) basic(ctx context.Context) error {
	o, s, work := r.o, r.s, r.work
	l := s.Lab()
	src := filepath.Join(work, "one.raw")
	if err := generate(src, o.size, o.data, o.seed); err != nil {
		return err
	}
	defer os.Remove(src)
	keyOne, err := labVM(l, vmOne, o.size)
	if err != nil {
		return err
	}
	if err := fillDisk(l, vmOne, keyOne[0], src, nil); err != nil {
		return err
	}
	keysTwo, err := labVM(l, vmTwo, o.size, o.size)
	if err != nil {
		return err
	}
	for i, k := range keysTwo {
		p := filepath.Join(work, fmt.Sprintf("two-%d.raw", i))
		err := generate(p, o.size, o.twoData, o.seed+uint64(i)+1)
		if err == nil {
			err = fillDisk(l, vmTwo, k, p, nil)
		}
		os.Remove(p)
		if err != nil {
			return err
		}
	}
	fmt.Printf("lab VM %s: one %d GiB disk holding %d MiB of random data in scattered 1 MiB pieces\n", vmOne, o.size/gib, o.data/mib)
	fmt.Printf("lab VM %s: two %d GiB disks holding %d MiB each, unchanged between its backups\n", vmTwo, o.size/gib, o.twoData/mib)
	settle()

	// The nbdcopy reference: the same bytes, served as the lab source
	// serves a snapshot's image (nbdkit's file plugin, read-only), into
	// a fresh QCOW2 served by qemu-nbd.
	source, err := qemu.StartNbdkit(ctx, qemu.NbdkitFile(src, true))
	if err != nil {
		return err
	}
	defer source.Close()
	srcURI := source.URI()
	nbd := &tool{name: "nbdcopy", serve: true, argv: func(t string) [][]string {
		return [][]string{{"nbdcopy", "--flush", srcURI, t}}
	}}
	fmt.Printf("nbdcopy reference: nbdcopy --flush nbd+unix:///?socket=SOURCE.sock nbd+unix:///?socket=TARGET.sock\n" +
		"  (SOURCE: nbdkit file plugin, read-only, on the disk's data; TARGET: qemu-nbd on a fresh QCOW2)\n")

	// The two-disk VM's first backup is a full one: untimed, it also
	// warms the worker's sessions and connections.
	if _, _, err := backupOnce(ctx, s, vmTwo, workflows.ModeFull, -1, "--full"); err != nil {
		return err
	}
	var full, incr, unchanged []sample
	var ref []time.Duration
	for i := 0; i < o.runs; i++ {
		// The full backup and nbdcopy alternate which goes first.
		for j := 0; j < 2; j++ {
			if (i+j)%2 == 0 {
				smp, _, err := backupOnce(ctx, s, vmOne, workflows.ModeFull, -1, "--full")
				if err != nil {
					return fmt.Errorf("full backup, run %d: %w", i+1, err)
				}
				full = append(full, smp)
				continue
			}
			d, _, _, err := timeOne(ctx, work, nbd, o.size, src, i == 0)
			if err != nil {
				return fmt.Errorf("nbdcopy run %d: %w", i+1, err)
			}
			ref = append(ref, d)
		}
		if err := scatter(labWriter(l, vmOne, keyOne[0]), o.size, o.incrData, o.incrWrite, o.seed+100+uint64(i)); err != nil {
			return err
		}
		smp, changed, err := backupOnce(ctx, s, vmOne, workflows.ModeIncremental, -1)
		if err != nil {
			return fmt.Errorf("incremental backup, run %d: %w", i+1, err)
		}
		if changed < o.incrData {
			return fmt.Errorf("incremental backup, run %d: %d changed bytes, fewer than the %d written", i+1, changed, o.incrData)
		}
		incr = append(incr, smp)
		smp, _, err = backupOnce(ctx, s, vmTwo, workflows.ModeIncremental, 0)
		if err != nil {
			return fmt.Errorf("unchanged backup, run %d: %w", i+1, err)
		}
		unchanged = append(unchanged, smp)
		if o.verbose {
			fmt.Printf("run %d: full %.3fs, nbdcopy %.3fs, incremental %.3fs, unchanged %.3fs\n", i+1,
				full[i][rowTotal], ref[i].Seconds(), incr[i][rowTotal], unchanged[i][rowTotal])
		}
	}
	slices.Sort(ref)
	nbdcopy := median(ref)

	fmt.Printf("\nwhere the time of a backup goes, seconds (medians of %d runs of each; a row's median is its own, so the rows need not add up to the total):\n", len(full))
	meds := printPhases([]string{"full", "incremental", "unchanged"}, [][]sample{full, incr, unchanged})
	fmt.Printf("%-38s %9.3f\n", "nbdcopy --flush, the full's bytes", nbdcopy)
	fmt.Printf("full: %d MiB of data on a %d GiB disk; incremental: %d MiB in %d KiB writes at scattered places; unchanged: %d disks, nothing written\n",
		o.data/mib, o.size/gib, o.incrData/mib, o.incrWrite>>10, 2)

	const section = "one backup at a time"
	t := o.targets
	note := ""
	if o.data != 1*gib || o.size != 4*gib {
		note = "the target is for 1 GiB of data on a 4 GiB disk: these sizes differ"
	}
	ratio := meds[0][rowTotal] / nbdcopy
	t.add(section, "full end to end / nbdcopy", fmt.Sprintf("%.2f×", ratio), "≤ 1.00×", rounded(ratio, 2) <= 1.0, note)
	note = ""
	if o.incrData != 10*mib || o.incrWrite != 64<<10 {
		note = "the target is for 10 MiB in 64 KiB writes: these sizes differ"
	}
	t.add(section, "incremental end to end", fmt.Sprintf("%.3fs", meds[1][rowTotal]), "≤ 0.350s", rounded(meds[1][rowTotal], 3) <= 0.35, note)
	t.add(section, "unchanged two-disk VM", fmt.Sprintf("%.3fs", meds[2][rowTotal]), "≤ 0.300s", rounded(meds[2][rowTotal], 3) <= 0.3, "")
	t.print(os.Stdout, section)
	return nil
}

// printPhases prints the medians of every phase of each column's
// samples, skipping rows that are zero in every column, and returns the
// medians by column of every value of the samples (phases and others).
func printPhases(names []string, cols [][]sample) []map[string]float64 {
	fmt.Printf("%-38s", "phase")
	for _, n := range names {
		fmt.Printf(" %*s", max(9, len(n)), n)
	}
	fmt.Println()
	meds := make([]map[string]float64, len(cols))
	for c, col := range cols {
		meds[c] = map[string]float64{}
		rows := map[string]bool{}
		for _, s := range col {
			for row := range s {
				rows[row] = true
			}
		}
		for row := range rows {
			var v []float64
			for _, s := range col {
				v = append(v, s[row])
			}
			meds[c][row] = medianOf(v)
		}
	}
	for _, row := range phaseRows {
		zero := true
		for c := range cols {
			zero = zero && meds[c][row] == 0
		}
		if zero {
			continue
		}
		fmt.Printf("%-38s", row)
		for c, n := range names {
			fmt.Printf(" %*.3f", max(9, len(n)), meds[c][row])
		}
		fmt.Println()
	}
	return meds
}

// medianOf is the median of v (0 when empty); v is sorted in place.
func medianOf(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	n := len(v)
	return (v[(n-1)/2] + v[n/2]) / 2
}

// backupOnce runs `starter backup VM --wait --json` and returns the
// backup's phases, read from the histories of its Backup workflow (which
// resolves the VM, starts BackupVM and ends) and of that BackupVM, with
// the sizes of what it wrote (sizeRows), and the bytes its disks changed.
// Every disk must have been backed up in mode; changed, when not
// negative, is what each disk must have changed.
func backupOnce(ctx context.Context, s *stack.Stack, vm, mode string, changed int64, args ...string) (sample, int64, error) {
	res, err := s.Starter(ctx, append([]string{"backup", vm, "--wait", "--json"}, args...)...)
	if err != nil {
		return nil, 0, err
	}
	var rep workflows.BackupReport
	if res.ExitCode != 0 || json.Unmarshal([]byte(res.Stdout), &rep) != nil || rep.Status != workflows.ReportCompleted {
		return nil, 0, fmt.Errorf("starter backup %s: %s", vm, res)
	}
	var total int64
	for _, d := range rep.Disks {
		if d.Mode != mode || (changed >= 0 && d.ChangedBytes != changed) {
			return nil, 0, fmt.Errorf("backup %s of %s: disk %d in mode %s with %d changed bytes, want %s with %d", rep.BackupID, vm, d.Key, d.Mode, d.ChangedBytes, mode, changed)
		}
		total += d.ChangedBytes
	}
	parent, child, err := backupHistories(ctx, s, rep.WorkflowID)
	if err != nil {
		return nil, 0, err
	}
	spans, opened, closed, err := backupSpans(parent, child)
	if err != nil {
		return nil, 0, fmt.Errorf("backup %s: %w", rep.BackupID, err)
	}
	smp := phasesOf(spans, opened, closed, res.Duration)
	for _, sp := range spans {
		if sp.transfer != nil {
			smp[rowImageBytes] += float64(sp.transfer.SizeBytes)
			smp[rowImageAllocated] += float64(sp.transfer.AllocatedBytes)
			smp[rowDigestBytes] += float64(sp.transfer.DigestSize)
		}
	}
	return smp, total, nil
}

// backupHistories reads the history of a BackupVM workflow (by ID, its
// latest run) and of the Backup workflow that started it.
func backupHistories(ctx context.Context, s *stack.Stack, workflowID string) (parent, child []*historypb.HistoryEvent, err error) {
	child, err = history(ctx, s, workflowID, "")
	if err != nil {
		return nil, nil, err
	}
	if len(child) == 0 || child[0].GetEventType() != enumspb.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED {
		return nil, nil, fmt.Errorf("workflow %s: the history does not begin with its start", workflowID)
	}
	started := child[0].GetWorkflowExecutionStartedEventAttributes()
	if parentExec := started.GetParentWorkflowExecution(); parentExec != nil {
		parent, err = history(ctx, s, parentExec.GetWorkflowId(), parentExec.GetRunId())
		return parent, child, err
	}
	// Started detached, through the client: the memo names its Backup.
	memo := started.GetMemo().GetFields()
	var by, run string
	if f := memo[workflows.MemoStartedByWorkflowID]; f != nil {
		_ = json.Unmarshal(f.GetData(), &by)
	}
	if f := memo[workflows.MemoStartedByRunID]; f != nil {
		_ = json.Unmarshal(f.GetData(), &run)
	}
	if by == "" {
		return nil, nil, fmt.Errorf("workflow %s was started by no Backup workflow", workflowID)
	}
	parent, err = history(ctx, s, by, run)
	return parent, child, err
}

// backupSpans returns the activities of a backup's two workflows, when
// the first (Backup) started and when the later of them closed: the
// starter starts Backup detached and waits for BackupVM itself.
func backupSpans(parent, child []*historypb.HistoryEvent) (spans []span, opened, closed time.Time, err error) {
	spans, opened, closed, err = spansOf(parent)
	if err != nil {
		return nil, opened, closed, fmt.Errorf("the Backup workflow: %w", err)
	}
	more, _, childClosed, err := spansOf(child)
	if err != nil {
		return nil, opened, closed, fmt.Errorf("the BackupVM workflow: %w", err)
	}
	if childClosed.After(closed) {
		closed = childClosed
	}
	return append(spans, more...), opened, closed, nil
}

// history reads a workflow's whole history.
func history(ctx context.Context, s *stack.Stack, id, run string) ([]*historypb.HistoryEvent, error) {
	var events []*historypb.HistoryEvent
	it := s.Client().GetWorkflowHistory(ctx, id, run, false, enumspb.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT)
	for it.HasNext() {
		ev, err := it.Next()
		if err != nil {
			return nil, fmt.Errorf("history of workflow %s: %w", id, err)
		}
		events = append(events, ev)
	}
	return events, nil
}

// releaseBinaries builds the worker and the starter as make build does
// (no fault points: the product is measured), into dir.
func releaseBinaries(ctx context.Context, dir string) (stack.Binaries, error) {
	temporal, err := stack.TemporalBinary(ctx)
	if err != nil {
		return stack.Binaries{}, err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+string(filepath.Separator),
		"github.com/cbtflow/cbtflow/worker", "github.com/cbtflow/cbtflow/starter")
	if out, err := cmd.CombinedOutput(); err != nil {
		return stack.Binaries{}, fmt.Errorf("go build worker starter: %w\n%s", err, out)
	}
	return stack.Binaries{Temporal: temporal, Worker: filepath.Join(dir, "worker"), Starter: filepath.Join(dir, "starter")}, nil
}

// labVM creates a lab VM with disks of the given capacities and returns
// their keys.
func labVM(l *lab.Lab, name string, capacities ...int64) ([]int32, error) {
	if _, err := l.CreateVM(name, capacities...); err != nil {
		return nil, fmt.Errorf("lab VM %s: %w", name, err)
	}
	disks, err := l.Disks(name)
	if err != nil {
		return nil, fmt.Errorf("lab VM %s: %w", name, err)
	}
	var keys []int32
	for _, d := range disks {
		keys = append(keys, d.Key)
	}
	if len(keys) != len(capacities) {
		return nil, fmt.Errorf("lab VM %s has %d disks, want %d", name, len(keys), len(capacities))
	}
	return keys, nil
}

// fillDisk writes the data extents of the sparse file src into a lab
// disk, as a guest would; the disk's holes stay holes. place, when not
// nil, moves each extent: its offset on the disk is place(offset in src).
func fillDisk(l *lab.Lab, vm string, key int32, src string, place func(int64) int64) error {
	return eachExtent(src, place, func(off int64, r *io.SectionReader) error {
		if n, err := l.WriteDisk(vm, key, off, r); err != nil || n != r.Size() {
			return fmt.Errorf("lab write %s/%d at %d: %d of %d bytes: %v", vm, key, off, n, r.Size(), err)
		}
		return nil
	})
}

// eachExtent calls write with each data extent of the sparse file src
// and its offset, moved by place when not nil.
func eachExtent(src string, place func(int64) int64, write func(off int64, r *io.SectionReader) error) error {
	extents, err := allocated(src)
	if err != nil {
		return err
	}
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, e := range extents {
		off := e.Offset
		if place != nil {
			off = place(off)
		}
		if err := write(off, io.NewSectionReader(f, e.Offset, e.Length)); err != nil {
			return err
		}
	}
	return nil
}

// labWriter writes into a lab disk as a guest would.
func labWriter(l *lab.Lab, vm string, key int32) func(off int64, p []byte) error {
	return func(off int64, p []byte) error {
		if _, err := l.WriteDisk(vm, key, off, bytes.NewReader(p)); err != nil {
			return fmt.Errorf("lab write %s/%d at %d: %w", vm, key, off, err)
		}
		return nil
	}
}

// scatter writes n bytes of random data in pieces of piece bytes, each
// at a different piece-aligned place of a size-byte disk chosen at
// random; write gets each piece (its buffer is reused).
func scatter(write func(off int64, p []byte) error, size, n, piece int64, seed uint64) error {
	r := rand.New(rand.NewPCG(seed, 0x5ca7))
	slots := size / piece
	if n/piece > slots {
		return fmt.Errorf("%d bytes in %d-byte writes do not fit a %d-byte disk", n, piece, size)
	}
	used := map[int64]bool{}
	buf := make([]byte, piece)
	for w := int64(0); w < n/piece; {
		s := r.Int64N(slots)
		if used[s] {
			continue
		}
		used[s] = true
		w++
		for i := range buf {
			buf[i] = byte(r.UintN(255) + 1)
		}
		if err := write(s*piece, buf); err != nil {
			return err
		}
	}
	return nil
}

// parseCases checks a comma-separated list of e2eCases and returns it in
// the order of e2eCases.
func parseCases(list string) ([]string, error) {
	want := strings.Split(list, ",")
	for _, c := range want {
		if !slices.Contains(e2eCases, strings.TrimSpace(c)) {
			return nil, fmt.Errorf("--cases: unknown case %q (cases: %s)", c, strings.Join(e2eCases, ", "))
		}
	}
	var out []string
	for _, c := range e2eCases {
		if slices.ContainsFunc(want, func(w string) bool { return strings.TrimSpace(w) == c }) {
			out = append(out, c)
		}
	}
	return out, nil
}
