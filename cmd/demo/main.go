// Command demo is `make demo`: cbtflow's main job, end to end, on the
// embedded lab vCenter. It starts a fresh stack of its own (scripts/dev
// with the demo's state folder, ports and database, so a `make dev` stack
// is never touched), writes guest data into both disks of the lab VM
// DC0_H0_VM0, takes a full backup, changes the disks (random data and an
// area overwritten with zeros), takes an incremental backup, restores both
// restore points of both disks and compares each, byte for byte, with the
// disk's content recorded at backup time. It prints one table row per
// disk and backup, stops the stack, and exits non-zero when a restore
// differs or an incremental QCOW2 is larger than its changes justify.
//
// Every step goes through the real CLI (bin/starter) against the real
// worker, Temporal dev server and PostgreSQL. It is a development tool,
// not part of cbtflow's product.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cbtflow/cbtflow/workflows"
)

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	gib = int64(1) << 30

	demoVM = "DC0_H0_VM0" // the lab VM with two disks
)

// disks are the device keys of demoVM's disks (10 GiB each).
var disks = []int32{204, 205}

// write is one guest write: length bytes at off, random or zeros.
type write struct {
	disk  int32
	off   int64
	len   int64
	zeros bool
}

// Guest writes before the full backup: a few MiB at a few offsets, some
// not block-aligned, one at the very end of a disk.
var fullWrites = []write{
	{disk: 204, off: 0, len: 4 * mib},
	{disk: 204, off: 1*gib + 12345, len: 2 * mib},
	{disk: 204, off: 7 * gib, len: 3 * mib},
	{disk: 205, off: 64 * mib, len: 4 * mib},
	{disk: 205, off: 5 * gib, len: 1 * mib},
	{disk: 205, off: 10*gib - 2*mib, len: 2 * mib},
}

// Guest writes between the full and the incremental backup: new data,
// data over earlier data, and zeros over earlier data — which the
// incremental must carry as zeros, or the full's data would show through.
var incrementalWrites = []write{
	{disk: 204, off: 512 * mib, len: 1 * mib},
	{disk: 204, off: 1*gib + 1*mib, len: 256 * kib},
	{disk: 204, off: 1 * mib, len: 1 * mib, zeros: true},
	{disk: 204, off: 9*gib + 4096, len: 64 * kib},
	{disk: 205, off: 3 * gib, len: 2 * mib},
	{disk: 205, off: 65 * mib, len: 2 * mib, zeros: true},
	{disk: 205, off: 10*gib - 128*kib, len: 128 * kib},
}

func main() {
	var (
		state        = flag.String("state", ".cbtflow-demo", "state `folder` of the demo's stack (wiped at the start; logs stay there)")
		db           = flag.String("db", "cbtflow_demo", "PostgreSQL `database` of the demo's catalog (dropped at the start)")
		temporalPort = flag.Int("temporal-port", 17233, "`port` of the demo's Temporal server")
		uiPort       = flag.Int("ui-port", 18233, "`port` of the demo's Temporal Web UI")
		labPort      = flag.Int("lab-port", 18989, "`port` of the demo's lab vCenter")
		metricsPort  = flag.Int("metrics-port", 19464, "`port` of the demo's worker metrics")
	)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	top, err := os.Getwd()
	if err == nil {
		_, err = os.Stat(filepath.Join(top, "scripts", "dev"))
		if err != nil {
			err = fmt.Errorf("run the demo from the checkout (make demo): %w", err)
		}
	}
	var st string
	if err == nil {
		st, err = filepath.Abs(*state)
	}
	if err == nil {
		s := &stack{top: top, state: st, db: *db, temporalPort: *temporalPort, uiPort: *uiPort, labPort: *labPort, metricsPort: *metricsPort}
		err = run(ctx, os.Stdout, s)
	}
	stop()
	switch {
	case errors.Is(err, errInterrupted):
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(130)
	case err != nil:
		fmt.Fprintln(os.Stderr, "demo: FAILED:", err)
		os.Exit(1)
	}
}

// errInterrupted ends a demo stopped by SIGINT or SIGTERM.
var errInterrupted = errors.New("interrupted")

func say(w io.Writer, format string, args ...any) {
	fmt.Fprintf(w, "demo: "+format+"\n", args...)
}

// run is the whole demo; the stack is stopped on every way out.
func run(ctx context.Context, out io.Writer, s *stack) (err error) {
	for _, b := range []string{"starter", "worker"} {
		if _, err := os.Stat(filepath.Join(s.top, "bin", b)); err != nil {
			return fmt.Errorf("bin/%s missing: run make build (make demo does)", b)
		}
	}
	rel := relTo(s.top, s.state)
	work := filepath.Join(s.state, "demo")
	say(out, "starting a fresh stack in %s (Temporal 127.0.0.1:%d, Web UI http://127.0.0.1:%d, lab vCenter 127.0.0.1:%d, database %s)",
		rel, s.temporalPort, s.uiPort, s.labPort, s.db)
	defer func() {
		if err != nil && ctx.Err() != nil {
			err = errInterrupted // whatever step was cut short says so less clearly
		}
		if derr := s.down(); derr != nil {
			err = errors.Join(err, derr)
			return
		}
		say(out, "stack stopped; its logs and repository stay in %s until the next make demo", rel)
		if err != nil {
			say(out, "the recorded and restored disk images are in %s", relTo(s.top, work))
		}
		if err == nil {
			say(out, "to watch backups in the Temporal Web UI, start the dev stack and back up the same VM:\n"+
				"  make dev\n"+
				"  . .cbtflow/dev.env && bin/starter backup %s --wait\n"+
				"  open http://127.0.0.1:8233 (workflow type BackupVM; filter e.g. CbtflowVM = \"%s\")", demoVM, demoVM)
		}
	}()
	start := time.Now()
	if err := s.up(ctx); err != nil {
		return err
	}
	say(out, "stack up in %.1f s", time.Since(start).Seconds())
	if err := os.MkdirAll(work, 0o700); err != nil {
		return err
	}

	var rows []row
	var ids []string
	for i, phase := range []struct {
		name   string
		writes []write
		args   []string
		mode   string
	}{
		{"full", fullWrites, []string{"--full"}, "full"},
		{"incremental", incrementalWrites, nil, "incremental"},
	} {
		n := strconv.Itoa(i + 1)
		if err := guestWrites(ctx, out, s, work, phase.writes); err != nil {
			return err
		}
		recorded := map[int32]string{}
		for _, d := range disks {
			recorded[d] = filepath.Join(work, fmt.Sprintf("disk%d.backup%s.raw", d, n))
			if _, err := s.starter(ctx, "lab", "read", "--vm", demoVM, "--disk", strconv.Itoa(int(d)), "--to", recorded[d]); err != nil {
				return err
			}
		}
		res, err := backup(ctx, s, phase.args...)
		if err != nil {
			return err
		}
		say(out, "backup %s (%s) of %s completed: %s", n, phase.name, demoVM, res.BackupID)
		ids = append(ids, res.BackupID)
		for _, w := range res.Warnings {
			say(out, "  warning: %s", w)
		}
		for _, d := range disks {
			rd, ok := res.FindDisk(d)
			if !ok {
				return fmt.Errorf("backup %s has no disk %d", res.BackupID, d)
			}
			if rd.Mode != phase.mode {
				return fmt.Errorf("backup %s, disk %d: mode %s, want %s (%s)", res.BackupID, d, rd.Mode, phase.mode, rd.Note)
			}
			restored := filepath.Join(work, fmt.Sprintf("disk%d.restore%s.raw", d, n))
			if _, err := s.starter(ctx, "restore", res.BackupID, "--disk", strconv.Itoa(int(d)), "--to", restored); err != nil {
				return err
			}
			cmp, err := compareSparse(recorded[d], restored)
			if err != nil {
				return err
			}
			r := row{Backup: n, Disk: d, Mode: rd.Mode, Changed: rd.ChangedBytes, Written: rd.WrittenBytes,
				QCOW2: rd.SizeBytes, Seconds: rd.Seconds, Verified: cmp.Equal}
			if rd.AllocatedBytes > 0 { // the space the (sparse) image takes
				r.QCOW2 = rd.AllocatedBytes
			}
			switch {
			case cmp.SizeA != cmp.SizeB:
				r.Diff = fmt.Sprintf("%d bytes restored, %d recorded", cmp.SizeB, cmp.SizeA)
			case !cmp.Equal:
				r.Diff = fmt.Sprintf("first difference at byte %d", cmp.FirstDiff)
			}
			rows = append(rows, r)
		}
	}

	fmt.Fprintln(out)
	if err := writeTable(out, rows); err != nil {
		return err
	}
	fmt.Fprintln(out)
	if bad := check(rows); len(bad) > 0 {
		return errors.New(strings.Join(bad, "\n"))
	}
	say(out, "every restore point of both disks equals the disk at backup time, byte for byte")
	say(out, "every incremental QCOW2 is at most 1.5 × its changed bytes + 1 MiB")
	if err := pruneToLast(ctx, out, s, work, ids); err != nil {
		return err
	}
	// The recorded and restored images (10 GiB sparse files) are kept
	// only when something failed, to look at; a checkout full of them
	// would also weigh on tools that read every file (docker build).
	if err := os.RemoveAll(work); err != nil {
		return err
	}
	return nil
}

// pruneToLast sets the retention policy keep-last 1 on the demo VM and
// prunes: the first backup goes, its data merged into the second's images
// (now full images), which must still restore as the disks were then.
func pruneToLast(ctx context.Context, out io.Writer, s *stack, work string, ids []string) error {
	if _, err := s.starter(ctx, "retention", "set", demoVM, "--keep-last", "1"); err != nil {
		return err
	}
	stdout, err := s.starter(ctx, "prune", demoVM, "--wait", "--json")
	if err != nil {
		return err
	}
	var pr workflows.PruneResult
	if err := json.Unmarshal(stdout, &pr); err != nil {
		return fmt.Errorf("bin/starter prune: output is not JSON: %w: %q", err, stdout)
	}
	last := ids[len(ids)-1]
	if len(pr.VMs) != 1 || len(pr.VMs[0].Kept) != 1 || pr.VMs[0].Kept[0].BackupID != last || len(pr.VMs[0].Removed) != len(ids)-1 {
		return fmt.Errorf("prune kept/removed the wrong restore points: %s", stdout)
	}
	vm := pr.VMs[0]
	var methods []string
	for _, m := range vm.Merged {
		methods = append(methods, fmt.Sprintf("disk %d by %s", m.Key, m.Method))
	}
	say(out, "prune (retention keep-last 1): removed %d restore point(s) %s; kept %s (%s), its images merged into full images (%s); %s freed",
		len(vm.Removed), vm.Removed[0].BackupID, last, strings.Join(vm.Kept[0].Rules, ", "), strings.Join(methods, ", "), size(pr.BytesFreed))
	n := strconv.Itoa(len(ids))
	for _, d := range disks {
		restored := filepath.Join(work, fmt.Sprintf("disk%d.pruned%s.raw", d, n))
		if _, err := s.starter(ctx, "restore", last, "--disk", strconv.Itoa(int(d)), "--to", restored); err != nil {
			return err
		}
		cmp, err := compareSparse(filepath.Join(work, fmt.Sprintf("disk%d.backup%s.raw", d, n)), restored)
		if err != nil {
			return err
		}
		if !cmp.Equal {
			return fmt.Errorf("after the prune, restore point %s disk %d differs from the disk at backup time (first difference at byte %d)", last, d, cmp.FirstDiff)
		}
	}
	say(out, "after the prune, restore point %s still restores both disks byte for byte", last)
	return nil
}

// guestWrites makes the writes through `starter lab write`, from files of
// random data or zeros in work.
func guestWrites(ctx context.Context, out io.Writer, s *stack, work string, ws []write) error {
	perDisk := map[int32]int64{}
	for i, w := range ws {
		f, err := os.CreateTemp(work, "write-*.bin")
		if err != nil {
			return err
		}
		var src io.Reader = io.LimitReader(rand.Reader, w.len)
		if w.zeros {
			src = io.LimitReader(zeroReader{}, w.len)
		}
		_, err = io.Copy(f, src)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			_, err = s.starter(ctx, "lab", "write", "--vm", demoVM, "--disk", strconv.Itoa(int(w.disk)),
				"--offset", strconv.FormatInt(w.off, 10), "--from", f.Name())
		}
		os.Remove(f.Name())
		if err != nil {
			return fmt.Errorf("guest write %d: %w", i+1, err)
		}
		perDisk[w.disk] += w.len
	}
	var parts []string
	for _, d := range disks {
		var zeros int64
		for _, w := range ws {
			if w.disk == d && w.zeros {
				zeros += w.len
			}
		}
		p := fmt.Sprintf("disk %d: %s", d, size(perDisk[d]))
		if zeros > 0 {
			p += fmt.Sprintf(" (%s of it zeros over earlier data)", size(zeros))
		}
		parts = append(parts, p)
	}
	say(out, "guest writes to %s: %s", demoVM, strings.Join(parts, ", "))
	return nil
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// backup runs `starter backup demoVM --wait --json` and checks that it
// completed.
func backup(ctx context.Context, s *stack, args ...string) (*workflows.BackupReport, error) {
	argv := append([]string{"backup", demoVM, "--wait", "--json"}, args...)
	stdout, err := s.starter(ctx, argv...)
	var res workflows.BackupReport
	if jerr := json.Unmarshal(stdout, &res); jerr != nil {
		if err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("bin/starter %s: output is not JSON: %w: %q", strings.Join(argv, " "), jerr, stdout)
	}
	if err != nil || res.Status != workflows.ReportCompleted {
		return nil, fmt.Errorf("backup of %s %s: %s (%v)", demoVM, res.Status, res.Error, err)
	}
	return &res, nil
}

// relTo names path relative to base when it is inside it.
func relTo(base, path string) string {
	if r, err := filepath.Rel(base, path); err == nil && !strings.HasPrefix(r, "..") {
		return r
	}
	return path
}
