package merge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"golang.org/x/sys/unix"
)

// The methods Estimate measures and Run applies.
const (
	// MethodRebase copies Top's file to Temp and rebases the copy onto
	// Base (qemu-img rebase, safe mode).
	MethodRebase = "rebase"
	// MethodConvert writes Top's whole view as a standalone image
	// (qemu-img convert); only for Base == "".
	MethodConvert = "convert"
)

// Job is one merge: the kept image Top, the removed images it builds on,
// nearest first (Removed[0] is Top's backing file, each next one the
// backing file of the one before), and Base, the backing file of the last
// removed image, on which the result is built ("" when the last removed
// image is a full image: the result is then a full image too). All paths
// are absolute. Temp is where the result is written; it must be in Top's
// folder (the same filesystem, so the caller's rename is atomic, and
// relative backing names resolve alike) and is replaced when it exists.
type Job struct {
	Top     string
	Removed []string
	Base    string
	Temp    string
}

// ErrNoSpace is wrapped when Run refuses a method whose bytes exceed the
// space free in Top's folder.
var ErrNoSpace = errors.New("not enough space")

// ErrVerify is wrapped when the merged image does not show Top's disk
// (qemu-img compare, virtual size, backing file or format) or fails
// qemu-img check.
var ErrVerify = errors.New("the merged image failed verification")

// Plan is what Estimate measured and the method it chose.
type Plan struct {
	// Top and Base repeat the job's, so Run can refuse a plan made for
	// another job.
	Top  string
	Base string
	// Method is the applicable method with the fewest bytes (MethodConvert
	// on a tie: one pass, and a compact image).
	Method string
	// Bytes is, per applicable method, the bytes it would write or copy
	// into Temp (data and QCOW2 metadata).
	Bytes map[string]int64
	// TopAllocated is the bytes allocated in Top's file: what rebase's
	// copy of Top reads and writes (nothing is written when Clone).
	TopAllocated int64
	// Clone is true when Top's filesystem clones files (reflink): then
	// rebase's copy of Top shares its extents and writes no data.
	Clone bool
	// RemovedData is the bytes of Top's view that the removed images
	// hold and Top does not shadow: their data, and over a Base their
	// zero areas too (over no base these read as zeros anyway). It is
	// what rebase writes into the copy, at most.
	RemovedData int64
	// ViewData is the bytes of data (not zeros) in Top's whole view.
	ViewData int64
	// VirtualSize is the disk's size.
	VirtualSize int64
	// Free is the bytes available to an unprivileged writer in Top's
	// folder when Estimate ran. Run measures again and refuses a method
	// whose Bytes exceed what is free (plus a stale Temp's size).
	Free int64
}

// Result describes the merged image at Temp, durable and verified.
type Result struct {
	Method string
	// Size, SHA256 and Stamp are Temp's, as integrity records them. The
	// stamp includes the ctime, which a rename changes: a caller that
	// renames Temp should take integrity.StampOf of the new name (the
	// inode and mtime stay, so the content proof still holds).
	Size   int64
	SHA256 string
	Stamp  integrity.Stamp
	// Backing is the backing file name written in Temp's header: Base
	// named relative to the folder, "" for a full image.
	Backing string
	// Copied is the bytes the file copy of Top moved (rebase; 0 when
	// cloned), Allocated the bytes allocated in Temp's file at the end.
	Copied    int64
	Allocated int64
	// Write is the time spent writing Temp (copy and qemu-img), Verify
	// the time of the compare, check and hash.
	Write, Verify time.Duration
}

// beatEvery is how often Run calls beat.
var beatEvery = 5 * time.Second

// maxChain bounds the walk along backing headers (a loop is damage).
const maxChain = 10000

// Estimate checks j against the images' headers, reads the chain's
// allocation and returns the bytes of each applicable method and the
// cheapest one. It reads only.
func Estimate(ctx context.Context, j Job) (Plan, error) {
	j, err := j.clean()
	if err != nil {
		return Plan{}, err
	}
	if err := j.check(); err != nil {
		return Plan{}, err
	}
	ext, err := mapChain(ctx, j.Top)
	if err != nil {
		return Plan{}, err
	}
	p := Plan{Top: j.Top, Base: j.Base, Bytes: map[string]int64{}}
	k := len(j.Removed)
	var removedZero int64
	for _, e := range ext {
		p.VirtualSize = max(p.VirtualSize, e.Start+e.Length)
		if !e.Present {
			continue
		}
		if e.Data {
			p.ViewData += e.Length
		}
		if e.Depth < 1 || e.Depth > k {
			continue
		}
		switch {
		case e.Data:
			p.RemovedData += e.Length
		case e.Zero:
			removedZero += e.Length
		}
	}
	if j.Base != "" {
		// A zero area of a removed image hides Base's data: rebase
		// writes it as zeros. Over no base it reads as zeros anyway.
		p.RemovedData += removedZero
	}
	if p.TopAllocated, err = allocated(j.Top); err != nil {
		return Plan{}, fmt.Errorf("merge: Top %s: %w", j.Top, err)
	}
	p.Clone = canClone(j.Top)
	if p.Free, err = free(filepath.Dir(j.Top)); err != nil {
		return Plan{}, fmt.Errorf("merge: %w", err)
	}
	rebase := p.RemovedData
	if !p.Clone {
		rebase += p.TopAllocated
	}
	p.Bytes[MethodRebase] = rebase
	p.Method = MethodRebase
	if j.Base == "" {
		conv, err := measure(ctx, j.Top)
		if err != nil {
			return Plan{}, err
		}
		p.Bytes[MethodConvert] = conv
		if conv <= rebase {
			p.Method = MethodConvert
		}
	}
	return p, nil
}

// Run writes the merged image at j.Temp with p's method, makes it durable
// (file and folder fsynced), verifies it (qemu-img compare of Temp's view
// over Base with Top's view, byte for byte; qemu-img check) and returns
// its size, SHA-256 and stamp. It opens Top, the removed images and Base
// read-only. A Temp that exists (left by a killed run) is removed first;
// on failure or cancellation Temp is removed again. beat, when set, is
// called every few seconds, from one goroutine at a time.
func Run(ctx context.Context, j Job, p Plan, beat func()) (res Result, err error) {
	j, err = j.clean()
	if err != nil {
		return Result{}, err
	}
	if err := j.check(); err != nil {
		return Result{}, err
	}
	if filepath.Clean(p.Top) != j.Top || cleanOrEmpty(p.Base) != j.Base {
		return Result{}, fmt.Errorf("merge: the plan was made for Top %s over Base %q, not for Top %s over Base %q", p.Top, p.Base, j.Top, j.Base)
	}
	switch p.Method {
	case MethodRebase:
	case MethodConvert:
		if j.Base != "" {
			return Result{}, fmt.Errorf("merge: method convert makes a full image; it cannot merge onto Base %s", j.Base)
		}
	default:
		return Result{}, fmt.Errorf("merge: unknown method %q (want %q or %q)", p.Method, MethodRebase, MethodConvert)
	}
	if n, ok := p.Bytes[p.Method]; ok {
		avail, err := free(filepath.Dir(j.Top))
		if err != nil {
			return Result{}, fmt.Errorf("merge: %w", err)
		}
		if st, err := os.Stat(j.Temp); err == nil {
			avail += st.Size() // the stale Temp is removed first
		}
		if n > avail {
			return Result{}, fmt.Errorf("merge: %w: %s has %d bytes free; method %s needs about %d", ErrNoSpace, filepath.Dir(j.Top), avail, p.Method, n)
		}
	}
	stop := heartbeat(beat)
	defer stop()

	dir := filepath.Dir(j.Top)
	if err := removeTemp(j.Temp); err != nil {
		return Result{}, err
	}
	defer func() {
		if err != nil {
			// Nothing half-written stays; a retry would replace it anyway.
			_ = os.Remove(j.Temp)
			_ = syncDir(dir)
		}
	}()
	res.Method = p.Method
	if j.Base != "" {
		if res.Backing, err = filepath.Rel(dir, j.Base); err != nil {
			return Result{}, fmt.Errorf("merge: Base %s cannot be named relative to %s: %w", j.Base, dir, err)
		}
	}

	t0 := time.Now()
	switch p.Method {
	case MethodRebase:
		res.Copied, _, err = copySparse(ctx, j.Top, j.Temp)
		if err != nil {
			return Result{}, fmt.Errorf("merge: copy Top %s to %s: %w", j.Top, j.Temp, err)
		}
		args := []string{"rebase", "-q", "-f", "qcow2", "-t", "writeback", "-b", res.Backing}
		if res.Backing != "" {
			args = append(args, "-F", "qcow2")
		}
		if _, _, err := runImg(ctx, "rebase", append(args, j.Temp)); err != nil {
			return Result{}, err
		}
	case MethodConvert:
		args := []string{"convert", "-q", "-f", "qcow2", "-O", "qcow2", "-t", "writeback", j.Top, j.Temp}
		if _, _, err := runImg(ctx, "convert", args); err != nil {
			return Result{}, err
		}
	}
	// qemu-img writes new L2 tables and refcount blocks whole (2 MiB in
	// images of internal/qemu.ImageOptions): their zeros are freed, which
	// changes no byte of the file.
	if err := punchZeros(ctx, j.Temp); err != nil {
		return Result{}, fmt.Errorf("merge: %w", err)
	}
	// qemu-img flushes at close with cache=writeback; fsync again so
	// durability does not hang on it, and the folder for Temp's name.
	if err := syncFile(j.Temp); err != nil {
		return Result{}, fmt.Errorf("merge: sync %s: %w", j.Temp, err)
	}
	if err := syncDir(dir); err != nil {
		return Result{}, fmt.Errorf("merge: sync %s: %w", dir, err)
	}
	res.Write = time.Since(t0)

	t1 := time.Now()
	if err := verify(ctx, j, res.Backing); err != nil {
		return Result{}, err
	}
	_, st, err := integrity.StampOf(j.Temp)
	if err != nil {
		return Result{}, fmt.Errorf("merge: %w", err)
	}
	res.Size, res.SHA256, err = integrity.Hash(ctx, j.Temp, nil)
	if err != nil {
		return Result{}, fmt.Errorf("merge: hash %s: %w", j.Temp, err)
	}
	if _, st2, err := integrity.StampOf(j.Temp); err != nil || st2 != st {
		return Result{}, fmt.Errorf("merge: %s changed while it was hashed", j.Temp)
	}
	res.Stamp = st
	if res.Allocated, err = allocated(j.Temp); err != nil {
		return Result{}, fmt.Errorf("merge: %w", err)
	}
	res.Verify = time.Since(t1)
	return res, nil
}

// verify proves Temp the merge of j: its backing file is Base (named
// backing), its view equals Top's byte for byte, and its metadata is sound.
func verify(ctx context.Context, j Job, backing string) error {
	name, err := integrity.BackingFile(j.Temp)
	if err != nil {
		return fmt.Errorf("merge: merged image: %w", err)
	}
	if name != backing {
		return fmt.Errorf("merge: %w: merged image %s has backing file %q, want %q", ErrVerify, j.Temp, name, backing)
	}
	// qemu-img compare takes images of different sizes as equal when the
	// longer one only adds zeros: the sizes are compared here.
	var infos [2]qemu.ImageInfo
	for i, img := range []string{j.Temp, j.Top} {
		out, _, err := runImg(ctx, "info", []string{"info", "--output=json", "-f", "qcow2", img})
		if err != nil {
			return err
		}
		if err := json.Unmarshal(out, &infos[i]); err != nil {
			return fmt.Errorf("merge: parse qemu-img info of %s: %w", img, err)
		}
	}
	if infos[0].VirtualSize != infos[1].VirtualSize {
		return fmt.Errorf("merge: %w: merged image %s is %d bytes, Top %s is %d bytes", ErrVerify, j.Temp, infos[0].VirtualSize, j.Top, infos[1].VirtualSize)
	}
	if backing != "" && infos[0].BackingFilenameFormat != "qcow2" {
		return fmt.Errorf("merge: %w: merged image %s names its backing file's format %q, want qcow2", ErrVerify, j.Temp, infos[0].BackingFilenameFormat)
	}
	out, code, err := runImg(ctx, "compare", []string{"compare", "-f", "qcow2", "-F", "qcow2", j.Temp, j.Top}, 1)
	if err != nil {
		return err
	}
	if code == 1 {
		return fmt.Errorf("merge: %w: merged image %s differs from Top %s: %s", ErrVerify, j.Temp, j.Top, trim(out))
	}
	out, _, err = runImg(ctx, "check", qemu.CheckArgs(j.Temp), 2, 3)
	if err != nil {
		return err
	}
	var cr qemu.CheckResult
	if err := json.Unmarshal(out, &cr); err != nil {
		return fmt.Errorf("merge: parse qemu-img check of %s: %w", j.Temp, err)
	}
	if !cr.Clean() {
		return fmt.Errorf("merge: %w: merged image %s fails qemu-img check: %d corruptions, %d errors", ErrVerify, j.Temp, cr.Corruptions, cr.CheckErrors)
	}
	return nil
}

// heartbeat calls beat every beatEvery until stop is called.
func heartbeat(beat func()) (stop func()) {
	if beat == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(beatEvery)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				beat()
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

func mapChain(ctx context.Context, top string) ([]qemu.MapExtent, error) {
	out, _, err := runImg(ctx, "map", qemu.MapArgs(top))
	if err != nil {
		return nil, err
	}
	return qemu.ParseMap(out)
}

// measure returns the bytes qemu-img convert would write for top's whole
// view as a new QCOW2 (qemu-img measure: data and metadata).
func measure(ctx context.Context, top string) (int64, error) {
	out, _, err := runImg(ctx, "measure", []string{"measure", "--output=json", "-f", "qcow2", "-O", "qcow2", top})
	if err != nil {
		return 0, err
	}
	var m struct {
		Required *int64 `json:"required"`
	}
	if err := json.Unmarshal(out, &m); err != nil || m.Required == nil {
		return 0, fmt.Errorf("merge: parse qemu-img measure of %s: %q", top, trim(out))
	}
	return *m.Required, nil
}

func trim(b []byte) string {
	const n = 400
	s := strings.TrimSpace(string(b))
	if len(s) > n {
		s = s[:n] + "…"
	}
	return s
}

func cleanOrEmpty(p string) string {
	if p == "" {
		return ""
	}
	return filepath.Clean(p)
}

// clean checks that every path is absolute and cleans them.
func (j Job) clean() (Job, error) {
	abs := func(what, p string) (string, error) {
		if p == "" {
			return "", fmt.Errorf("merge: no %s given", what)
		}
		if !filepath.IsAbs(p) {
			return "", fmt.Errorf("merge: %s %q is not an absolute path", what, p)
		}
		return filepath.Clean(p), nil
	}
	var c Job
	var err error
	if c.Top, err = abs("Top", j.Top); err != nil {
		return Job{}, err
	}
	if c.Temp, err = abs("Temp", j.Temp); err != nil {
		return Job{}, err
	}
	if len(j.Removed) == 0 {
		return Job{}, errors.New("merge: no Removed image given: nothing to merge")
	}
	for i, r := range j.Removed {
		p, err := abs("Removed["+strconv.Itoa(i)+"]", r)
		if err != nil {
			return Job{}, err
		}
		c.Removed = append(c.Removed, p)
	}
	if j.Base != "" {
		if c.Base, err = abs("Base", j.Base); err != nil {
			return Job{}, err
		}
	}
	return c, nil
}

// check proves j's chain from the images' headers: Removed[0] is Top's
// backing file, each removed image's backing file is the next one, the
// last one's is Base (none when Base is ""), and Temp is a new name in
// Top's folder that is none of them.
func (j Job) check() error {
	if d := filepath.Dir(j.Top); filepath.Dir(j.Temp) != d {
		return fmt.Errorf("merge: Temp %s is not in Top's folder %s (the result must be renamed atomically, and relative backing names must resolve alike)", j.Temp, d)
	}
	names := []string{"Top"}
	paths := []string{j.Top}
	for i, r := range j.Removed {
		names = append(names, "Removed["+strconv.Itoa(i)+"]")
		paths = append(paths, r)
	}
	if j.Base != "" {
		names = append(names, "Base")
		paths = append(paths, j.Base)
	}
	for i, p := range paths {
		if p == j.Temp {
			return fmt.Errorf("merge: Temp %s is %s", j.Temp, names[i])
		}
		for k := 0; k < i; k++ {
			if paths[k] == p {
				return fmt.Errorf("merge: %s and %s are the same image %s", names[k], names[i], p)
			}
		}
		fi, err := os.Stat(p)
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("merge: %s %s: missing", names[i], p)
		}
		if err != nil {
			return fmt.Errorf("merge: %s: %w", names[i], err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("merge: %s %s is a %s, not a regular file", names[i], p, fi.Mode().Type())
		}
	}
	// Each image's header must name the next one; Base's own backing
	// file is not the merge's business.
	last := len(paths) - 1
	for i := 0; i <= last; i++ {
		if i == last && j.Base != "" {
			break
		}
		backing, raw, err := backingOf(paths[i])
		if err != nil {
			return fmt.Errorf("merge: %s: %w", names[i], err)
		}
		if i == last { // the last removed image, and no Base
			if backing != "" {
				return fmt.Errorf("merge: Base is \"\" but the last removed image %s (%s) is an overlay on %s (header: %q); give that as Base, or remove it too", paths[i], names[i], backing, raw)
			}
			break
		}
		if backing == "" {
			return fmt.Errorf("merge: %s %s is a full image, but %s %s is given as its backing file", names[i], paths[i], names[i+1], paths[i+1])
		}
		if !samePath(backing, paths[i+1]) {
			return fmt.Errorf("merge: %s %s is not the backing file of %s %s, which is %s (header: %q)", names[i+1], paths[i+1], names[i], paths[i], backing, raw)
		}
	}
	return checkTemp(j)
}

// backingOf returns the absolute backing file named in path's QCOW2
// header ("" for none) and the name as written.
func backingOf(path string) (string, string, error) {
	raw, err := integrity.BackingFile(path)
	if err != nil {
		return "", "", err
	}
	if raw == "" {
		return "", "", nil
	}
	if filepath.IsAbs(raw) {
		return filepath.Clean(raw), raw, nil
	}
	return filepath.Join(filepath.Dir(path), raw), raw, nil
}

func samePath(a, b string) bool {
	if filepath.Clean(a) == filepath.Clean(b) {
		return true
	}
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}

// checkTemp refuses a Temp that Run must not remove: anything but a
// regular file, a file some image in its folder builds on, or an image
// whose chain holds Top (a kept restore point above Top). A stale Temp of
// an earlier run is neither: its backing file is Top's, Base or none.
func checkTemp(j Job) error {
	fi, err := os.Lstat(j.Temp)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("merge: Temp: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("merge: Temp %s exists and is a %s, not a file a killed merge left", j.Temp, fi.Mode().Type())
	}
	p := j.Temp
	for n := 0; n < maxChain; n++ {
		next, _, err := backingOf(p)
		if err != nil || next == "" {
			break // not a QCOW2, or a full image: a stale Temp at worst
		}
		if samePath(next, j.Top) {
			return fmt.Errorf("merge: Temp %s exists and builds on Top %s: it is a restore point, not a stale merge result", j.Temp, j.Top)
		}
		p = next
	}
	ents, err := os.ReadDir(filepath.Dir(j.Temp))
	if err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		other := filepath.Join(filepath.Dir(j.Temp), e.Name())
		if other == j.Temp {
			continue
		}
		if b, _, err := backingOf(other); err == nil && b != "" && samePath(b, j.Temp) {
			return fmt.Errorf("merge: Temp %s exists and %s builds on it: it is a restore point, not a stale merge result", j.Temp, other)
		}
	}
	return nil
}

// free returns the bytes available to an unprivileged writer in dir's
// filesystem.
func free(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// removeTemp removes a Temp left by an earlier run, durably.
func removeTemp(temp string) error {
	err := os.Remove(temp)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("merge: remove stale %s: %w", temp, err)
	}
	if err := syncDir(filepath.Dir(temp)); err != nil {
		return fmt.Errorf("merge: sync %s: %w", filepath.Dir(temp), err)
	}
	return nil
}
