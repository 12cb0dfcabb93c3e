// Command bench is `make bench`: it times cbtflow's copier against nbdcopy
// and qemu-img convert on the same generated disk, served by one source NBD
// server, in the same run, because figures on a shared two-core machine
// vary by tens of percent from one run to the next and only ratios measured
// together mean anything.
//
// Its end-to-end part (e2e.go) times whole backups of lab VMs through the
// real starter, worker, Temporal and PostgreSQL, on a stack of its own,
// split into their phases from the workflow histories, beside nbdcopy's
// time for the same bytes, run alternately. -part runs one part alone.
//
// It is a development tool, not part of cbtflow's product.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/nbd"
	"github.com/cbtflow/cbtflow/internal/qcow2"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/testkit/stack"
)

const (
	mib = int64(1) << 20
	gib = int64(1) << 30
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "copy" {
		if err := copyMain(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "bench copy:", err)
			os.Exit(1)
		}
		return
	}
	var (
		dir     = flag.String("dir", "", "work folder (default: a fresh one under $TMPDIR, removed at the end)")
		size    = flag.Int64("size", 4*gib, "disk size in bytes")
		data    = flag.Int64("data", 1*gib, "bytes of random data, in scattered 1 MiB pieces")
		runs    = flag.Int("runs", 5, "timed runs of each tool (at least 5)")
		seed    = flag.Uint64("seed", 1, "seed of the generated disk")
		verbose = flag.Bool("v", false, "log each run")
		only    = flag.String("tools", "", "comma-separated subset of cbtflow,cbt-nbd,nbdcopy,qemu-img to run (default all)")
		part    = flag.String("part", "all", "copier (the copier against nbdcopy and qemu-img), e2e (whole backups through a stack of their own), or all")
		incr    = flag.Int64("incr-data", 10*mib, "e2e: bytes changed before each incremental backup")
		piece   = flag.Int64("incr-write", 64<<10, "e2e: bytes of each of those writes, at scattered places")
		twoData = flag.Int64("two-data", 64*mib, "e2e: bytes of data on each disk of the unchanged two-disk VM")
		keep    = flag.Bool("keep", false, "e2e: keep its work folder (the stack's logs and state, Temporal's database, the repository) for a post-mortem instead of removing it; the database is dropped all the same")
		tmpDB   = flag.Bool("temporal-tmpfs", true, "e2e: the Temporal dev server's database in "+stack.TemporalDBTmpfs+", as every stack of package testkit/stack has it (false: on disk in the stack's folder, beside the repository and the lab's disks, whose writeback its every fsync then waits behind)")
		cases   = flag.String("cases", strings.Join(e2eCases, ","), "e2e: comma-separated cases to run: basic (full, incremental, unchanged backups one at a time), scale (many VMs at once), large (a large sparse disk against a small one)")

		scaleVMs  = flag.Int("scale-vms", 20, "e2e scale: VMs backed up at once")
		scaleSize = flag.Int64("scale-size", 4*gib, "e2e scale: size of each of a VM's two disks")
		scaleData = flag.Int64("scale-data", 64*mib, "e2e scale: bytes of data on each disk, in scattered 1 MiB pieces")
		scaleIncr = flag.Int64("scale-incr", 4*mib, "e2e scale: bytes changed on each disk before the incremental round, in 64 KiB writes")

		largeSize   = flag.Int64("large-size", 2<<40, "e2e large: size of the large sparse disk")
		largeRef    = flag.Int64("large-ref", 10*gib, "e2e large: size of the disk it is compared with")
		largeData   = flag.Int64("large-data", 1*gib, "e2e large: bytes of data on both disks, in scattered 1 MiB pieces (the incrementals change -incr-data in -incr-write writes)")
		largeSpread = flag.Bool("large-spread", true, "e2e large: the large disk's data at offsets scaled to its size (false: at the small disk's offsets)")
	)
	flag.Parse()
	if *runs < 5 {
		fmt.Fprintln(os.Stderr, "bench: --runs must be at least 5")
		os.Exit(2)
	}
	if *part != "all" && *part != "copier" && *part != "e2e" {
		fmt.Fprintf(os.Stderr, "bench: --part %q: want copier, e2e or all\n", *part)
		os.Exit(2)
	}
	if *incr <= 0 || *piece <= 0 || *incr%*piece != 0 {
		fmt.Fprintf(os.Stderr, "bench: --incr-data %d must be a positive multiple of --incr-write %d\n", *incr, *piece)
		os.Exit(2)
	}
	caseList, err := parseCases(*cases)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	if *scaleVMs < 1 || *scaleData <= 0 || *scaleData%mib != 0 || *scaleData > *scaleSize || *scaleIncr <= 0 || *scaleIncr%(64<<10) != 0 {
		fmt.Fprintln(os.Stderr, "bench: --scale-vms must be at least 1, --scale-data a multiple of 1 MiB no larger than --scale-size, --scale-incr a positive multiple of 64 KiB")
		os.Exit(2)
	}
	if *largeData <= 0 || *largeData%mib != 0 || *largeData > *largeRef || *largeRef > *largeSize || *largeRef%*piece != 0 || *largeSize%mib != 0 {
		fmt.Fprintln(os.Stderr, "bench: --large-data must be a positive multiple of 1 MiB no larger than --large-ref, itself no larger than --large-size (a multiple of 1 MiB) and a multiple of --incr-write")
		os.Exit(2)
	}
	// SIGPIPE is ignored, never caught: `make bench | head` must not kill
	// the bench before it stopped its stack and dropped its database, and
	// a caught SIGPIPE would also come from any socket of the process that
	// a peer closed (the in-process lab's connections, NBD): it canceled
	// a run half way. Ignored, a write to a closed stdout fails with EPIPE
	// and the run goes on to its cleanup.
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	start := time.Now()
	ts := &targets{}
	var copierRate float64
	if *part != "e2e" {
		copierRate, err = run(ctx, *dir, *size, *data, *runs, *seed, *verbose, *only, ts)
	}
	if err == nil && *part != "copier" {
		err = runE2E(ctx, e2eOptions{dir: *dir, size: *size, data: *data, incrData: *incr, incrWrite: *piece,
			twoData: *twoData, runs: *runs, seed: *seed, verbose: *verbose, keep: *keep, temporalTmpfs: *tmpDB, cases: caseList,
			scaleVMs: *scaleVMs, scaleSize: *scaleSize, scaleData: *scaleData, scaleIncr: *scaleIncr,
			largeSize: *largeSize, largeRef: *largeRef, largeData: *largeData, largeSpread: *largeSpread,
			copierRate: copierRate, targets: ts})
	}
	ts.summary(os.Stdout)
	fmt.Printf("bench took %.0fs\n", time.Since(start).Seconds())
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// tool is one way of doing the full copy.
type tool struct {
	name  string
	argv  func(target string) [][]string // commands run in order, timed together
	serve bool                           // the target is served by qemu-nbd
	times []time.Duration
	rss   []int64 // peak RSS of the first command, KiB
}

// run is the copier part. It returns the copier's full copy in bytes per
// second (0 when the copier was not among the tools).
func run(ctx context.Context, dir string, size, data int64, runs int, seed uint64, verbose bool, only string, ts *targets) (float64, error) {
	if dir == "" {
		d, err := os.MkdirTemp("", "cbtflow-bench-")
		if err != nil {
			return 0, err
		}
		defer os.RemoveAll(d)
		dir = d
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}

	src := filepath.Join(dir, "source.raw")
	fmt.Printf("generating %s: %d GiB disk, %d MiB of random data in scattered 1 MiB pieces\n", src, size/gib, data/mib)
	if err := generate(src, size, data, seed); err != nil {
		return 0, err
	}
	extents, err := allocated(src)
	if err != nil {
		return 0, err
	}
	settle()
	var allocBytes int64
	for _, e := range extents {
		allocBytes += e.Length
	}
	fmt.Printf("source: %d bytes allocated in %d extents (what CBT \"*\" returns)\n", allocBytes, len(extents))
	extentsFile := filepath.Join(dir, "extents.json")
	if err := writeJSON(extentsFile, extents); err != nil {
		return 0, err
	}

	// 1. The copier does not read holes: count the source's reads with
	// nbdkit's stats filter in a separate, untimed pass.
	if err := checkNoHoleReads(ctx, dir, src, self, extentsFile, allocBytes, size); err != nil {
		return 0, err
	}

	// 2. Timed runs, one source server for every tool.
	source, err := qemu.StartNbdkit(ctx, qemu.NbdkitFile(src, true))
	if err != nil {
		return 0, err
	}
	defer source.Close()
	srcURI := source.URI()
	tools := []*tool{
		{name: "cbtflow", argv: func(t string) [][]string {
			argv := []string{self, "copy", "--source", srcURI, "--image", t, "--extents", extentsFile}
			if verbose {
				argv = append(argv, "-v")
			}
			return [][]string{argv}
		}},
		{name: "cbt-nbd", serve: true, argv: func(t string) [][]string {
			return [][]string{{self, "copy", "--source", srcURI, "--target", t, "--extents", extentsFile}}
		}},
		{name: "nbdcopy", serve: true, argv: func(t string) [][]string {
			return [][]string{{"nbdcopy", "--flush", srcURI, t}}
		}},
		{name: "qemu-img", argv: func(t string) [][]string {
			return [][]string{qemuImgConvert(srcURI, t), {"sync"}}
		}},
	}
	if only != "" {
		want := strings.Split(only, ",")
		tools = slices.DeleteFunc(tools, func(t *tool) bool { return !slices.Contains(want, t.name) })
		if len(tools) == 0 {
			return 0, fmt.Errorf("--tools %q names no tool", only)
		}
	}
	fmt.Println("commands (TARGET is a fresh QCOW2 of the disk's size, served by qemu-nbd where the tool needs NBD;")
	fmt.Println("cbtflow writes the image itself, as a backup does; cbt-nbd is the copier into qemu-nbd, as a backup did before):")
	for _, t := range tools {
		target := "TARGET.qcow2"
		if t.serve {
			target = "nbd+unix:///?socket=TARGET.sock"
		}
		var cmds []string
		for _, c := range t.argv(target) {
			cmds = append(cmds, strings.Join(c, " "))
		}
		fmt.Printf("  %-8s %s\n", t.name, strings.Join(cmds, " && "))
	}

	for i := 0; i < runs; i++ {
		for j := range tools {
			// Alternate the order so no tool always runs on a warmer machine.
			t := tools[(i+j)%len(tools)]
			d, rss, cpu, err := timeOne(ctx, dir, t, size, src, i == 0)
			if err != nil {
				return 0, fmt.Errorf("%s run %d: %w", t.name, i+1, err)
			}
			t.times = append(t.times, d)
			t.rss = append(t.rss, rss)
			if verbose {
				fmt.Printf("run %d %-8s %.3fs peak RSS %d KiB, CPU %.3fs\n", i+1, t.name, d.Seconds(), rss, cpu.Seconds())
			}
		}
	}

	fmt.Printf("\n%-8s %8s %8s %8s  %s\n", "tool", "median", "min", "max", "peak RSS")
	med := map[string]float64{}
	for _, t := range tools {
		s := slices.Clone(t.times)
		slices.Sort(s)
		m := median(s)
		med[t.name] = m
		fmt.Printf("%-8s %7.3fs %7.3fs %7.3fs  %d KiB\n", t.name, m, s[0].Seconds(), s[len(s)-1].Seconds(), slices.Max(t.rss))
	}
	fmt.Printf("copier peak memory: %d KiB (max RSS of the copier process over %d runs)\n", slices.Max(tools[0].rss), runs)
	if floor, err := diskFloor(dir, allocBytes, 3); err != nil {
		fmt.Printf("the disk's floor: not measured: %v\n", err)
	} else {
		fmt.Printf("the disk's floor: writing the same %d MiB straight to a file (O_DIRECT, 2 MiB at a time, then fsync) took %.3fs (8 writes in flight; median of 3):", allocBytes/mib, floor)
		for _, t := range tools {
			fmt.Printf(" %s %.2f×", t.name, med[t.name]/floor)
		}
		fmt.Println(" of it")
	}
	const section = "the copier alone"
	note := ""
	if size != 4*gib || data != 1*gib {
		note = "the target is for 1 GiB of data on a 4 GiB disk: these sizes differ"
	}
	for _, c := range []struct {
		other string
		goal  float64
	}{{"nbdcopy", 0.7}, {"qemu-img", 0.8}} {
		if med["cbtflow"] > 0 && med[c.other] > 0 {
			ratio := med["cbtflow"] / med[c.other]
			fmt.Printf("full cbtflow/%s %.2f\n", c.other, ratio)
			ts.add(section, "full copy, copier / "+c.other, fmt.Sprintf("%.2f×", ratio), fmt.Sprintf("≤ %.2f×", c.goal), rounded(ratio, 2) <= c.goal, note)
		}
	}
	if err := chainCheck(ctx, dir, src, runs, med["cbtflow"]); err != nil {
		return 0, err
	}
	ts.print(os.Stdout, section)
	if med["cbtflow"] == 0 {
		return 0, nil
	}
	return float64(allocBytes) / med["cbtflow"], nil
}

// diskFloor times writing n bytes of random data to a new file in dir
// with O_DIRECT, 2 MiB at a time with 8 writes in flight (as the copier's
// 8 requests reach qemu-nbd), and an fsync, the median of runs: what no
// copy of n bytes into a file of that disk goes below.
func diskFloor(dir string, n int64, runs int) (float64, error) {
	const chunk, inFlight = 2 << 20, 8
	buf, err := unix.Mmap(-1, 0, chunk, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE) // page-aligned
	if err != nil {
		return 0, err
	}
	defer unix.Munmap(buf)
	rand.NewChaCha8([32]byte{1}).Read(buf)
	path := filepath.Join(dir, "floor.raw")
	defer os.Remove(path)
	var times []time.Duration
	for range runs {
		os.Remove(path)
		start := time.Now()
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_DIRECT, 0o600)
		if err != nil {
			return 0, err
		}
		var next atomic.Int64
		errs := make(chan error, inFlight)
		for range inFlight {
			go func() {
				for {
					off := next.Add(chunk) - chunk
					if off >= n {
						errs <- nil
						return
					}
					if _, err := f.WriteAt(buf, off); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		for range inFlight {
			err = errors.Join(err, <-errs)
		}
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return 0, fmt.Errorf("the disk's floor: %w", err)
		}
		times = append(times, time.Since(start))
	}
	slices.Sort(times)
	return median(times), nil
}

// chainCheck times the check every incremental runs before it builds on a
// disk's chain (internal/integrity, as BeginBackup calls it, without the
// catalog's query): a chain of the longest allowed length, a full image of
// the generated disk and overlays on it. With the stamps unchanged it
// must not re-read the images; the cost when they changed (a copied
// repository: one full SHA-256 of each image) is shown beside the copy.
func chainCheck(ctx context.Context, dir, src string, runs int, copySeconds float64) error {
	const length = 30 // the default chain limit
	cdir := filepath.Join(dir, "chain")
	if err := os.MkdirAll(cdir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(cdir)
	full := filepath.Join(cdir, "b00.qcow2")
	if err := qemu.Convert(ctx, qemu.ConvertOptions{Source: src, SourceFormat: "raw", Target: full, TargetFormat: "qcow2"}); err != nil {
		return err
	}
	images := []integrity.Image{}
	prev := ""
	for i := 0; i < length; i++ {
		path := filepath.Join(cdir, fmt.Sprintf("b%02d.qcow2", i))
		if i > 0 {
			if err := qcow2.MakeOverlay(ctx, path, prev); err != nil {
				return err
			}
		}
		size, st, err := integrity.StampOf(path)
		if err != nil {
			return err
		}
		_, sum, err := integrity.Hash(ctx, path, nil)
		if err != nil {
			return err
		}
		images = append([]integrity.Image{{Path: path, Size: size, SHA256: sum, Stamp: st, Backing: prev}}, images...)
		prev = path
	}
	measure := func(chain []integrity.Image) (float64, error) {
		var times []time.Duration
		for i := 0; i < runs; i++ {
			start := time.Now()
			if idx, err := integrity.CheckChain(ctx, chain, nil, nil); err != nil || idx != -1 {
				return 0, fmt.Errorf("chain check: %v (image %d)", err, idx)
			}
			times = append(times, time.Since(start))
		}
		slices.Sort(times)
		return median(times), nil
	}
	cheap, err := measure(images)
	if err != nil {
		return err
	}
	// Stamps that no longer match (a copied repository): every image is
	// re-read once.
	stale := slices.Clone(images)
	for i := range stale {
		stale[i].Stamp = integrity.Stamp{}
	}
	rehash, err := measure(stale)
	if err != nil {
		return err
	}
	fmt.Printf("\nchain check before an incremental (%d images, the full one holding the generated data; medians of %d):\n", length, runs)
	fmt.Printf("  stamps unchanged (every backup): %.3f ms, %.1f µs per image\n", cheap*1e3, cheap*1e6/length)
	fmt.Printf("  stamps changed (once after a repository copy: a full SHA-256 of each image): %.3fs", rehash)
	if copySeconds > 0 {
		fmt.Printf(" (%.2f× the copier's full copy)", rehash/copySeconds)
	}
	fmt.Println()
	return nil
}

func qemuImgConvert(srcURI, target string) []string {
	args := qemu.ConvertArgs(qemu.ConvertOptions{Source: srcURI, SourceFormat: "raw", Target: target, TargetFormat: "qcow2", OutOfOrder: true})
	return append([]string{qemu.QemuImg}, args...)
}

// timeOne makes a fresh target, runs the tool's commands and times them.
// The first run of each tool is checked against the source.
func timeOne(ctx context.Context, dir string, t *tool, size int64, src string, verify bool) (time.Duration, int64, time.Duration, error) {
	img := filepath.Join(dir, "target-"+t.name+".qcow2")
	_ = os.Remove(img)
	defer os.Remove(img)
	var target string
	var exp *qemu.Export
	if t.serve {
		if err := qcow2.Make(ctx, img, size); err != nil {
			return 0, 0, 0, err
		}
		var err error
		exp, err = qemu.StartQemuNBD(ctx, qemu.QemuNBDOptions{Image: img, Format: "qcow2"})
		if err != nil {
			return 0, 0, 0, err
		}
		defer exp.Close()
		target = exp.URI()
	} else {
		target = img
	}
	var rss int64
	var cpu time.Duration
	start := time.Now()
	for k, argv := range t.argv(target) {
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return 0, 0, 0, fmt.Errorf("%s: %w", strings.Join(argv, " "), err)
		}
		if k == 0 {
			if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
				rss = ru.Maxrss
				cpu = time.Duration(syscall.TimevalToNsec(ru.Utime) + syscall.TimevalToNsec(ru.Stime))
			}
		}
	}
	elapsed := time.Since(start)
	if exp != nil {
		if err := exp.Close(); err != nil {
			return 0, 0, 0, err
		}
	}
	if verify {
		diff, err := qemu.Compare(ctx, src, "raw", img, "qcow2")
		if err != nil {
			return 0, 0, 0, err
		}
		if diff != "" {
			return 0, 0, 0, fmt.Errorf("copy differs from the source: %s", diff)
		}
		fmt.Printf("verified: %s's copy is identical to the source (qemu-img compare)\n", t.name)
	}
	return elapsed, rss, cpu, nil
}

// checkNoHoleReads copies once through an nbdkit source with the stats
// filter and shows that the bytes read are the allocated data, not the disk.
func checkNoHoleReads(ctx context.Context, dir, src, self, extentsFile string, allocBytes, size int64) error {
	statsFile := filepath.Join(dir, "stats.txt")
	o := qemu.NbdkitFile(src, true)
	o.Filters = []string{"stats"}
	o.Params = append(o.Params, "statsfile="+statsFile)
	source, err := qemu.StartNbdkit(ctx, o)
	if err != nil {
		return err
	}
	defer source.Close()
	img := filepath.Join(dir, "target-stats.qcow2")
	defer os.Remove(img)
	cmd := exec.CommandContext(ctx, self, "copy", "--source", source.URI(), "--image", img, "--extents", extentsFile)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("copier through the stats filter: %w", err)
	}
	if err := source.Close(); err != nil { // the stats filter writes its file on exit
		return err
	}
	b, err := os.ReadFile(statsFile)
	if err != nil {
		return fmt.Errorf("nbdkit stats: %w", err)
	}
	read, err := statsBytes(string(b), "read")
	if err != nil {
		return err
	}
	fmt.Printf("nbdkit stats on the source during one copier run:\n")
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if strings.Contains(line, "read:") || strings.Contains(line, "extents:") || strings.HasPrefix(line, "total:") {
			fmt.Printf("  %s\n", strings.TrimSpace(line))
		}
	}
	// nbdkit rounds to two decimals of its unit: allow that much.
	slack := allocBytes / 200
	fmt.Printf("copier read about %d bytes of a %d-byte disk with %d bytes allocated: it read no holes\n",
		read, size, allocBytes)
	if read > allocBytes+slack {
		return fmt.Errorf("the copier read about %d bytes, more than the %d allocated: it read holes", read, allocBytes)
	}
	return nil
}

var statsLine = regexp.MustCompile(`(?m)^\s*(\w+):\s*\d+ ops,\s*[\d.]+ s,\s*([\d.]+) ?(bytes|B|KiB|MiB|GiB|TiB)\b`)

// statsBytes returns the amount of data of one operation in nbdkit's stats
// file ("read: 8 ops, 0.001224 s, 2.00 MiB, 1.60 GiB/s op, ..."). nbdkit
// prints it with two decimals of a binary unit, so the value is rounded.
func statsBytes(stats, op string) (int64, error) {
	units := map[string]float64{"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
	for _, m := range statsLine.FindAllStringSubmatch(stats, -1) {
		if m[1] == op {
			v, err := strconv.ParseFloat(m[2], 64)
			if err != nil {
				return 0, err
			}
			return int64(v * units[m[3]]), nil
		}
	}
	return 0, fmt.Errorf("nbdkit stats: no %q line in:\n%s", op, stats)
}

func median(s []time.Duration) float64 {
	n := len(s)
	if n%2 == 1 {
		return s[n/2].Seconds()
	}
	return (s[n/2-1].Seconds() + s[n/2].Seconds()) / 2
}

// settle writes back every dirty page of the machine (sync) before a
// timed part: the disks a case just wrote (gigabytes of a lab's VMs) are
// otherwise written back while it is timed, and the backups' own writes
// queue behind them. A lab's disks stand for a datastore, which is not
// the repository's disk.
func settle() {
	fmt.Printf("wrote the page cache back before timing (sync, %.1fs)\n", writeBack().Seconds())
}

// writeBack is settle without its line, for parts that say once that
// they settle before each run; it returns the time the sync took.
func writeBack() time.Duration {
	start := time.Now()
	syscall.Sync()
	return time.Since(start)
}

// generate writes a sparse raw disk with data bytes of random data in 1 MiB
// pieces at random 1 MiB-aligned places; an eighth of the pieces are
// neighbours, so extents have varied lengths as on a real disk.
func generate(path string, size, data int64, seed uint64) error {
	return makeSparse(path, size, func(f *os.File) error {
		r := rand.New(rand.NewPCG(seed, 0xcb7f))
		slots := size / mib
		pieces := data / mib
		used := make([]bool, slots)
		buf := make([]byte, mib)
		for n := int64(0); n < pieces; {
			s := r.Int64N(slots)
			if used[s] {
				continue
			}
			used[s] = true
			n++
			for i := 0; i < len(buf); i += 8 {
				v := r.Uint64()
				for k := 0; k < 8; k++ {
					buf[i+k] = byte(v >> (8 * k))
				}
			}
			if _, err := f.WriteAt(buf, s*mib); err != nil {
				return err
			}
		}
		return f.Sync()
	})
}

// makeSparse creates a file of size bytes at path, all a hole, lets
// fill write into it, and closes it.
func makeSparse(path string, size int64, fill func(f *os.File) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	if err := fill(f); err != nil {
		return err
	}
	return f.Close()
}

// allocated lists the data extents of a sparse file (SEEK_DATA/SEEK_HOLE),
// merged, as CBT's "*" query would return them.
func allocated(path string) ([]copier.Extent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	var out []copier.Extent
	fd := int(f.Fd())
	for off := int64(0); off < fi.Size(); {
		data, err := syscall.Seek(fd, off, 3) // SEEK_DATA
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break
			}
			return nil, err
		}
		hole, err := syscall.Seek(fd, data, 4) // SEEK_HOLE
		if err != nil {
			return nil, err
		}
		out = append(out, copier.Extent{Offset: data, Length: hole - data})
		off = hole
	}
	return out, nil
}

func writeJSON(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// copyMain is the copier run as its own process, so its peak memory can be
// measured apart from the benchmark's.
func copyMain(args []string) error {
	fs := flag.NewFlagSet("copy", flag.ContinueOnError)
	source := fs.String("source", "", "source NBD URI")
	target := fs.String("target", "", "target NBD URI")
	image := fs.String("image", "", "a new QCOW2 image the copier makes and writes itself (instead of --target)")
	extentsFile := fs.String("extents", "", "JSON file of extents")
	reqSize := fs.Int("request-size", 0, "bytes per request (0: the copier's default)")
	inFlight := fs.Int("in-flight", 0, "requests in flight (0: the copier's default)")
	srcConns := fs.Int("source-connections", 0, "source connections (0: the copier's default)")
	verbose := fs.Bool("v", false, "print when the last data was written and when the final flush completed")
	if err := fs.Parse(args); err != nil {
		return err
	}
	f, err := os.Open(*extentsFile)
	if err != nil {
		return err
	}
	b, err := io.ReadAll(f)
	f.Close()
	if err != nil {
		return err
	}
	var extents []copier.Extent
	if err := json.Unmarshal(b, &extents); err != nil {
		return err
	}
	start := time.Now()
	var written time.Duration
	opts := copier.Options{Source: *source, Target: *target, Extents: extents,
		RequestSize: *reqSize, InFlight: *inFlight, SourceConnections: *srcConns}
	if *image != "" {
		// As a backup makes it: the image with the extents' tables, then
		// written in process.
		w, err := openImage(*source, *image, extents)
		if err != nil {
			return err
		}
		defer w.Close()
		opts.Image = w
	}
	if *verbose {
		opts.ProgressInterval = time.Millisecond
		opts.Progress = func(p copier.Progress) {
			if p.Done == p.Total && written == 0 {
				written = time.Since(start)
			}
		}
	}
	res, err := copier.Copy(context.Background(), opts)
	if err == nil && *verbose {
		fmt.Fprintf(os.Stderr, "bench copy: data done after %.3fs, final flush done after %.3fs (%d flushes)\n",
			written.Seconds(), res.Duration.Seconds(), res.Flushes)
	}
	return err
}

// openImage makes a fresh image at path of the size of the disk at the
// NBD URI src, with the tables of extents, and opens it for the copier.
func openImage(src, path string, extents []copier.Extent) (*qcow2.Writer, error) {
	h, err := nbd.Connect(src)
	if err != nil {
		return nil, err
	}
	size, err := h.Size()
	h.Close()
	if err != nil {
		return nil, err
	}
	rs := copier.Ranges(extents)
	if err := qcow2.Create(path, size, "", rs...); err != nil {
		return nil, err
	}
	return qcow2.OpenWriter(path, rs...)
}
