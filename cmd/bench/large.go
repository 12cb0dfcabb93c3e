package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/workflows"
)

// The large case's lab VMs: one large sparse disk, and a small disk with
// the same data.
const (
	vmLarge = "bench-large"
	vmSmall = "bench-small"
)

// rowWorkerRSS is the worker's peak RSS during one backup, in KiB,
// beside the phases of a sample.
const rowWorkerRSS = "worker peak RSS, KiB"

// large backs up a lab VM with a large sparse disk (o.largeSize) and one
// with a small disk (o.largeRef) holding the same data, full and then
// incremental, o.runs times each, alternating which VM goes first, and
// compares their times phase by phase: nothing in a backup's path should
// grow with the disk's size rather than with its data.
func (r *e2eRun) large(ctx context.Context) error {
	o, s, work := r.o, r.s, r.work
	l := s.Lab()
	fmt.Printf("\na %s disk against a %s disk holding the same data\n", activities.HumanBytes(o.largeSize), activities.HumanBytes(o.largeRef))
	src := filepath.Join(work, "large.raw")
	if err := generate(src, o.largeRef, o.largeData, o.seed+20); err != nil {
		return err
	}
	defer os.Remove(src)
	// The same extents of data on both disks; on the large one at offsets
	// scaled to its size (o.largeSpread), so that its data spans the whole
	// disk as the small one's does.
	place := func(off int64) int64 { return off }
	layout := fmt.Sprintf("at the same offsets (the large disk's first %s only)", activities.HumanBytes(o.largeRef))
	if o.largeSpread {
		place = func(off int64) int64 { return scaleOffset(off, mib, o.largeRef, o.largeSize) }
		layout = fmt.Sprintf("each extent's offset scaled by %.1f (rounded down to 1 MiB): the data spans the whole disk", float64(o.largeSize)/float64(o.largeRef))
	}
	setup := time.Now()
	keySmall, err := labVM(l, vmSmall, o.largeRef)
	if err != nil {
		return err
	}
	if err := fillDisk(l, vmSmall, keySmall[0], src, nil); err != nil {
		return err
	}
	keyLarge, err := labVM(l, vmLarge, o.largeSize)
	if err != nil {
		return err
	}
	if err := fillDisk(l, vmLarge, keyLarge[0], src, place); err != nil {
		return err
	}
	exts, err := l.DiskExtents(vmLarge, keyLarge[0])
	if err != nil {
		return err
	}
	var onLarge int64
	for _, e := range exts {
		onLarge += e.Length
	}
	if onLarge != o.largeData {
		return fmt.Errorf("lab VM %s's disk holds %d bytes of data, want %d", vmLarge, onLarge, o.largeData)
	}
	fmt.Printf("lab VM %s: one %s disk holding %d MiB of random data in scattered 1 MiB pieces\n", vmSmall, activities.HumanBytes(o.largeRef), o.largeData/mib)
	fmt.Printf("lab VM %s: one %s disk holding the same pieces, %s (set up in %.1fs)\n", vmLarge, activities.HumanBytes(o.largeSize), layout, time.Since(setup).Seconds())
	if err := r.printLabUsage("after writing the data"); err != nil {
		return err
	}
	settle()
	// Incremental changes: the same writes on both disks, each write's
	// offset on the large disk scaled as the data's (in 64 KiB units).
	placeWrite := func(off int64) int64 { return off }
	if o.largeSpread {
		placeWrite = func(off int64) int64 { return scaleOffset(off, o.incrWrite, o.largeRef, o.largeSize) }
	}
	writeSmall, writeLarge := labWriter(l, vmSmall, keySmall[0]), labWriter(l, vmLarge, keyLarge[0])
	both := func(off int64, p []byte) error {
		if err := writeSmall(off, p); err != nil {
			return err
		}
		return writeLarge(placeWrite(off), p)
	}

	// The copier alone on the same data laid out as on each disk, into a
	// fresh QCOW2 of the disk's size, timed between the backups: what of
	// a difference comes from QCOW2 rather than from the
	// rest of the backup.
	bigSrc := filepath.Join(work, "large-big.raw")
	if err := spreadFile(src, bigSrc, o.largeSize, place); err != nil {
		return err
	}
	defer os.Remove(bigSrc)
	var alone [2]*copierAlone
	for k, f := range []struct {
		path string
		size int64
	}{{src, o.largeRef}, {bigSrc, o.largeSize}} {
		if alone[k], err = r.newCopierAlone(ctx, f.path, f.size); err != nil {
			return err
		}
		defer alone[k].close()
	}

	vms := []string{vmSmall, vmLarge}
	var full, incr [2][]sample
	for i := 0; i < o.runs; i++ {
		// The copier alone every other run: an explanation, not a
		// target, and on the large disk the longest step of the case.
		for j := 0; i%2 == 0 && j < len(alone); j++ {
			c := alone[(i/2+j)%2]
			if err := c.run(ctx, 1); err != nil {
				return err
			}
			if o.verbose {
				fmt.Printf("run %d: the copier alone on %s: %.3fs\n", i+1, filepath.Base(c.src), c.times[len(c.times)-1].Seconds())
			}
		}
		for j := range vms {
			k := (i + j) % 2 // alternate which goes first
			smp, err := r.backupWithRSS(ctx, vms[k], workflows.ModeFull, -1, "--full")
			if err != nil {
				return fmt.Errorf("full backup of %s, run %d: %w", vms[k], i+1, err)
			}
			full[k] = append(full[k], smp)
		}
		if err := scatter(both, o.largeRef, o.incrData, o.incrWrite, o.seed+300+uint64(i)); err != nil {
			return err
		}
		for j := range vms {
			k := (i + j) % 2
			smp, err := r.backupWithRSS(ctx, vms[k], workflows.ModeIncremental, o.incrData)
			if err != nil {
				return fmt.Errorf("incremental backup of %s, run %d: %w", vms[k], i+1, err)
			}
			incr[k] = append(incr[k], smp)
		}
		if o.verbose {
			fmt.Printf("run %d: full %.3fs / %.3fs, incremental %.3fs / %.3fs\n", i+1,
				full[0][i][rowTotal], full[1][i][rowTotal], incr[0][i][rowTotal], incr[1][i][rowTotal])
		}
	}
	small, big := activities.HumanBytes(o.largeRef), activities.HumanBytes(o.largeSize)
	names := []string{"full " + small, "full " + big, "incr. " + small, "incr. " + big}
	cols := [][]sample{full[0], full[1], incr[0], incr[1]}
	fmt.Printf("\nwhere the time of a backup goes, seconds (medians of %d runs of each; %s's and %s's backups alternate which goes first):\n", o.runs, vmSmall, vmLarge)
	meds := printPhases(names, cols)
	for _, row := range []struct{ name, key string }{
		{"worker peak RSS during the backup, MiB", rowWorkerRSS},
		{"QCOW2 image's file size, MiB", rowImageBytes},
		{"QCOW2 image's space taken, MiB", rowImageAllocated},
		{"digest file, KiB", rowDigestBytes},
	} {
		fmt.Printf("%-38s", row.name)
		for c, n := range names {
			v := meds[c][row.key]
			switch row.key {
			case rowWorkerRSS:
				v /= 1024
			case rowImageBytes, rowImageAllocated:
				v /= float64(mib)
			default:
				v /= 1024
			}
			fmt.Printf(" %*.1f", max(9, len(n)), v)
		}
		fmt.Println()
	}
	smallAlone, bigAlone := alone[0].ref(), alone[1].ref()
	fmt.Printf("%-38s %*.3f %*.3f\n", "the copier alone, the same data", max(9, len(names[0])), smallAlone.seconds, max(9, len(names[1])), bigAlone.seconds)
	fmt.Printf("full: %d MiB of data; incremental: %d MiB in %d KiB writes at scattered places, the same on both disks; the copier alone: the bench's copy command into a fresh QCOW2 of the disk's size (medians of %d)\n",
		o.largeData/mib, o.incrData/mib, o.incrWrite>>10, len(alone[0].times))
	if err := r.printLabUsage("at the end"); err != nil {
		return err
	}

	const section = "large sparse disk"
	t := o.targets
	note := ""
	if o.largeSize != 2<<40 || o.largeRef != 10*gib || o.largeData != 1*gib {
		note = "the target is for 1 GiB of data on 2 TiB against 10 GiB: these sizes differ"
	}
	for _, c := range []struct {
		name       string
		small, big float64
	}{{"full", meds[0][rowTotal], meds[1][rowTotal]}, {"incremental", meds[2][rowTotal], meds[3][rowTotal]}} {
		ratio := c.big / c.small
		t.add(section, fmt.Sprintf("%s: %s disk / %s disk", c.name, big, small), fmt.Sprintf("%.2f×", ratio), "≤ 1.20×", rounded(ratio, 2) <= 1.2, note)
	}
	ratio := bigAlone.seconds / smallAlone.seconds
	fmt.Printf("the copier alone: %s disk / %s disk %.2f× (the copier alone into its own QCOW2: what the image costs of the full's ratio)\n", big, small, ratio)
	t.print(os.Stdout, section)
	return nil
}

// spreadFile writes the data extents of the sparse file src into a new
// sparse file dst of size bytes, each at place(its offset).
func spreadFile(src, dst string, size int64, place func(int64) int64) error {
	return makeSparse(dst, size, func(f *os.File) error {
		return eachExtent(src, place, func(off int64, r *io.SectionReader) error {
			_, err := io.Copy(io.NewOffsetWriter(f, off), r)
			return err
		})
	})
}

// backupWithRSS is backupOnce with the worker's peak RSS during the
// backup (its VmHWM, reset before) in the sample.
func (r *e2eRun) backupWithRSS(ctx context.Context, vm, mode string, minChanged int64, args ...string) (sample, error) {
	pid := r.s.WorkerPID()
	if err := resetPeakRSS(pid); err != nil {
		return nil, fmt.Errorf("reset the worker's peak RSS: %w", err)
	}
	smp, changed, err := backupOnce(ctx, r.s, vm, mode, -1, args...)
	if err != nil {
		return nil, err
	}
	if changed < minChanged {
		return nil, fmt.Errorf("%d changed bytes, fewer than the %d written", changed, minChanged)
	}
	st, err := procStatus(pid)
	if err != nil {
		return nil, err
	}
	smp[rowWorkerRSS] = float64(st["VmHWM"])
	return smp, nil
}

// printLabUsage prints the space the lab's folder takes: its disks'
// apparent size and what the file system allocated.
func (r *e2eRun) printLabUsage(when string) error {
	apparent, allocated, err := diskUsage(r.s.Lab().Dir())
	if err != nil {
		return err
	}
	fmt.Printf("the lab's folder %s: %s apparent, %s allocated\n", when, activities.HumanBytes(apparent), activities.HumanBytes(allocated))
	return nil
}

// scaleOffset moves off, a multiple of unit on a disk of from bytes, to
// the place of the same proportion on a disk of to bytes (to ≥ from),
// rounded down to unit. Distinct unit-aligned ranges stay distinct and
// in order, and a range that ends within from ends within to.
func scaleOffset(off, unit, from, to int64) int64 {
	return off / unit * (to / unit) / (from / unit) * unit
}
