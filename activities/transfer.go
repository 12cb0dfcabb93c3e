package activities

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"
	"golang.org/x/sys/unix"

	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/qcow2"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/source"
	"github.com/cbtflow/cbtflow/internal/sparse"
	"github.com/cbtflow/cbtflow/internal/vsphere"
)

// Transfer holds the activity that moves a disk's data.
type Transfer struct {
	Sessions *vsphere.Sessions
	Repo     *repository.Repository
	// RuntimeDir holds the private folders of NBD sockets; short, since a
	// unix socket path is limited to 107 bytes. Default: $TMPDIR/cbtflow-<uid>.
	RuntimeDir string
	// Copy is the template of the copier's options (request size, requests
	// in flight, flush interval); the activity fills in the rest.
	Copy copier.Options
	// Sources opens a snapshot disk as NBD; source.New when nil.
	Sources func(vsphere.Profile) (source.Opener, error)
	// Slots bounds the transfers that copy at once (the worker's
	// --max-transfers); nil: no bound.
	Slots *TransferSlots
	// Metrics receives each successful transfer's bytes and duration;
	// nil: none.
	Metrics Metrics
	// QemuNBDTarget makes every transfer write its image through
	// qemu-nbd, as transfers did before the copier wrote images itself
	// (qcow2.Writer); without it, qemu-nbd writes only the images the
	// writer does not take (another layout, more than one refcount
	// block's worth of clusters, an image larger than the disk (a
	// capacity not a multiple of 512 bytes), a resume point an attempt
	// through qemu-nbd left off the image's subclusters).
	QemuNBDTarget bool
	// Digests makes every transfer write the image's digest file beside
	// it (<image>.digests, internal/digest: the BLAKE3 of every block
	// written, the ranges zeroed), which the commit records and a
	// verification (internal/verify) checks the point against. The
	// worker sets it; the paths that remove images (FailBackup, prunes)
	// remove their digest files with them.
	Digests bool
	// HeartbeatQuiet is how long the first attempt of a TransferDisk runs
	// before it sends its first heartbeat (0: from its start). Each
	// heartbeat is a round trip through Temporal and a write of the
	// workflow's state there; an incremental of a few MiB ends well within
	// a second or two, and its heartbeats were most of what it cost
	// Temporal beyond its completion. What the quiet start gives up: a
	// cancel reaches the attempt later (cancels are answered in heartbeat
	// responses: at its first heartbeat after the quiet start, or, while
	// it waits for a slot, at its next wait beat), a retry of an attempt
	// that died within it copies afresh (no resume point was recorded),
	// and the progress shows the disk's transfer as started, with none of
	// its bytes, until then. A retry heartbeats from its start: the
	// details the server keeps are then an earlier attempt's, and would
	// stand for this one's (its resume point, its progress) until it
	// replaced them. It is held to half the attempt's HeartbeatTimeout
	// (the workflow gives transfers 15 s). An attempt that holds at fault
	// points (tests) heartbeats from its start, as they look for its
	// progress where it holds.
	HeartbeatQuiet time.Duration
}

// beater returns what records a heartbeat of a TransferDisk attempt that
// started at started: nothing within its quiet start (HeartbeatQuiet).
func (a *Transfer) beater(ctx context.Context, started time.Time) func(TransferProgress) {
	beat := a.quietBeater(ctx, started)
	return func(p TransferProgress) { beat(p) }
}

// quietBeater returns what records a heartbeat with any details for an
// attempt (of TransferDisk or TransferDisks) that started at started:
// nothing within its quiet start (HeartbeatQuiet).
func (a *Transfer) quietBeater(ctx context.Context, started time.Time) func(details any) {
	info := activity.GetInfo(ctx)
	quiet := quietStart(a.HeartbeatQuiet, info.Attempt, info.HeartbeatTimeout, faultpoint.Active(ctx))
	return func(details any) {
		if quiet > 0 && time.Since(started) < quiet {
			return
		}
		activity.RecordHeartbeat(ctx, details)
	}
}

// quietStart is the quiet start of an attempt (its number, from 1) of an
// activity with the given HeartbeatTimeout (0: none): HeartbeatQuiet for a
// first attempt, held to half the timeout; none for a retry, nor where
// fault points hold the attempt.
func quietStart(quiet time.Duration, attempt int32, heartbeatTimeout time.Duration, faultPoints bool) time.Duration {
	if faultPoints || attempt > 1 {
		return 0
	}
	if heartbeatTimeout > 0 {
		quiet = min(quiet, heartbeatTimeout/2)
	}
	return quiet
}

// TransferSlots bounds how many TransferDisk calls of one worker process
// copy at the same time. Temporal can only bound all of a worker's
// activities together, and a transfer may not be refused once its task is
// taken, so a transfer beyond the bound waits for a slot inside the
// activity, first come first served, before it opens anything. While it
// waits it heartbeats, so that its HeartbeatTimeout does not end it and a
// cancel request reaches it (the server answers cancels in heartbeat
// responses); its context ending stops the wait at once.
type TransferSlots struct {
	mu      sync.Mutex
	free    int
	waiters []chan struct{} // oldest first; closed when handed a slot
}

// NewTransferSlots returns n slots (at least 1).
func NewTransferSlots(n int) *TransferSlots {
	return &TransferSlots{free: max(n, 1)}
}

// acquire takes a slot, calling beat every interval while it waits. The
// returned release gives it back; it must be called once.
func (s *TransferSlots) acquire(ctx context.Context, interval time.Duration, beat func()) (release func(), err error) {
	if s == nil {
		return func() {}, nil
	}
	s.mu.Lock()
	if s.free > 0 && len(s.waiters) == 0 {
		s.free--
		s.mu.Unlock()
		return s.release, nil
	}
	turn := make(chan struct{})
	s.waiters = append(s.waiters, turn)
	s.mu.Unlock()

	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		beat()
		select {
		case <-turn:
			return s.release, nil
		case <-ctx.Done():
			s.mu.Lock()
			if i := slices.Index(s.waiters, turn); i >= 0 {
				s.waiters = slices.Delete(s.waiters, i, i+1)
				s.mu.Unlock()
				return nil, ctx.Err()
			}
			s.mu.Unlock()
			// Handed a slot as the context ended: pass it on.
			s.release()
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
}

func (s *TransferSlots) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.waiters) > 0 {
		close(s.waiters[0])
		s.waiters = s.waiters[1:]
		return
	}
	s.free++
}

// waitBeat is how often a transfer waiting for a slot heartbeats: well
// within its HeartbeatTimeout (the SDK sends at most one heartbeat per
// 0.8 × HeartbeatTimeout anyway), and every 10 s without one, so that a
// cancel still reaches it.
func waitBeat(ctx context.Context) time.Duration {
	if hb := activity.GetInfo(ctx).HeartbeatTimeout; hb > 0 {
		return min(max(hb/4, 50*time.Millisecond), 10*time.Second)
	}
	return 10 * time.Second
}

// TransferDisk copies a disk's changed areas from the snapshot into a new
// QCOW2 — a fresh image, or an overlay on the previous restore point — and
// returns it durable, with its size and its proof (a seal or a SHA-256). A retried attempt resumes
// from the last resume point it heartbeated (advanced only after a FLUSH).
func (a *Transfer) TransferDisk(ctx context.Context, in TransferDiskInput) (*TransferDiskResult, error) {
	start := time.Now()
	var resume TransferProgress
	if activity.HasHeartbeatDetails(ctx) {
		if err := activity.GetHeartbeatDetails(ctx, &resume); err != nil {
			resume = TransferProgress{}
		}
	}
	return a.transfer(ctx, in, start, resume, a.beater(ctx, start), "")
}

// transfer is one disk's transfer (TransferDisk), begun at start, from
// resume (the last progress an earlier attempt heartbeated, or none),
// its progress told to beat. It checks the snapshot before it reads it
// and after the copy, unless checkedVM names the VM: then the caller
// (TransferDisks) checked it before and checks it after, for every disk
// at once.
func (a *Transfer) transfer(ctx context.Context, in TransferDiskInput, start time.Time, resume TransferProgress, beat func(TransferProgress), checkedVM string) (*TransferDiskResult, error) {
	log := activity.GetLogger(ctx)
	profile, err := a.Sessions.Profile(in.Profile)
	if err != nil {
		return nil, permanent(err)
	}
	if in.Mode != ModeFull && in.Mode != ModeIncremental {
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("disk %d: mode %q", in.Key, in.Mode), ErrTypeInvalidInput, nil)
	}
	path, err := a.Repo.PrepareImage(repository.Key{Profile: in.Profile, VMUUID: in.VMUUID, DiskKey: in.Key, BackupID: in.BackupID})
	if err != nil {
		return nil, permanent(err)
	}
	extents, err := readExtents(in.ExtentsFile)
	if err != nil {
		return nil, permanent(err)
	}

	// Resume only an image this activity made and flushed; anything else
	// at this path is a partial file of a dead attempt.
	if resume.Path != path {
		resume = TransferProgress{}
	}
	// Nothing is opened or written before the slot is ours. The wait
	// heartbeats the resume point it was given, so a retry that waits
	// keeps it.
	waited := false
	release, err := a.Slots.acquire(ctx, waitBeat(ctx), func() {
		if !waited {
			waited = true
			log.Info("waiting for a transfer slot", "disk", in.Key, "backup", in.BackupID)
		}
		beat(TransferProgress{Path: resume.Path, ResumePoint: resume.ResumePoint,
			Key: in.Key, Stage: TransferStageWaiting, Done: resume.Done, Total: in.ChangedBytes})
	})
	if err != nil {
		return nil, err
	}
	// The slot bounds the copies at once: it is given back as soon as the
	// copy is durable and its NBD servers are stopped, so the image check
	// and the seal (a read of the image's metadata) do not hold the next
	// transfer back. The deferred call covers every earlier way out.
	var releaseOnce sync.Once
	freeSlot := func() { releaseOnce.Do(release) }
	defer freeSlot()
	if _, err := os.Stat(path); err != nil {
		resume = TransferProgress{}
	}
	// The digest file beside the image records every block the copy
	// writes (internal/digest). A resumed copy keeps its records below the
	// resume point; a file that lacks them (an attempt of a worker before
	// digests, a lost file) means the copy starts afresh.
	digestPath := digest.PathOf(path)
	digestHead := digest.Header{Image: filepath.Base(path), Capacity: in.Capacity, Overlay: in.Mode == ModeIncremental}
	var digests *digest.Writer
	if resume.Path != "" && a.Digests {
		if digests, err = digest.Resume(digestPath, digestHead, resume.ResumePoint); err != nil {
			log.Warn("copying afresh: the digest file cannot be resumed", "disk", in.Key, "backup", in.BackupID, "error", err)
			resume = TransferProgress{}
		}
	}
	resumed := resume.Path != ""
	if !resumed {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, permanent(err)
		}
		if err := a.createImage(ctx, in, path, extents); err != nil {
			return nil, err
		}
		if a.Digests {
			if digests, err = digest.Create(digestPath, digestHead); err != nil {
				return nil, permanent(err)
			}
		}
	} else {
		log.Info("resuming transfer", "disk", in.Key, "backup", in.BackupID, "resume_point", resume.ResumePoint)
	}

	if digests != nil {
		defer digests.Close()
	}

	vc, err := a.Sessions.Client(ctx, in.Profile)
	if err != nil {
		return nil, permanent(err)
	}
	snapName := SnapshotPrefix + in.BackupID
	what := fmt.Sprintf("disk %d of VM %s (%s)", in.Key, in.VMRef, in.VMUUID)
	// Read only from this backup's own snapshot: a moref alone proves
	// nothing after a vCenter restart.
	vmName := checkedVM
	if checkedVM == "" {
		if vmName, err = vc.CheckSnapshot(ctx, in.VMRef, in.SnapshotRef, snapName); err != nil {
			return nil, snapshotErr(what, err)
		}
	}
	// Named now, while the VM exists: the check after the copy may find it
	// gone.
	what = fmt.Sprintf("disk %d of VM %q (%s, %s)", in.Key, vmName, in.VMRef, in.VMUUID)

	copyStart := time.Now()
	var res *copier.Result
	var writer string
	if len(extents) == 0 {
		// Nothing changed (or an empty disk): the new image is the whole
		// restore point as it is, so no NBD server is started and nothing
		// is copied; what the copy's final FLUSH would have made durable,
		// a sync does.
		if err := syncFileAndDir(path); err != nil {
			return nil, permanent(fmt.Errorf("disk %d: %w", in.Key, err))
		}
		res = &copier.Result{ResumePoint: in.Capacity}
	} else if res, writer, err = a.copyDisk(ctx, in, profile, path, extents, resume.ResumePoint, digests, beat); err != nil {
		return nil, err
	}
	copyTook := time.Since(copyStart)
	// Every record is written and synced, with the folder, before the
	// image is checked: the result names a durable file.
	var digestSize int64
	var digestSum string
	if digests != nil {
		if digestSize, digestSum, err = digests.Finish(); err != nil {
			return nil, permanent(fmt.Errorf("disk %d: %w", in.Key, err))
		}
	}
	freeSlot()

	// Verifying: the image's check and its proof (the seal: a read of
	// what the copy did not write itself; else a SHA-256 of the whole
	// image), reported as their own stage.
	verifying := TransferProgress{Path: path, ResumePoint: res.ResumePoint, Done: in.ChangedBytes, Total: in.ChangedBytes,
		Key: in.Key, Stage: TransferStageVerifying}
	if fi, err := os.Stat(path); err == nil {
		verifying.VerifyTotal = fi.Size()
	}
	beat(verifying)
	hashRate := newRateMeter()
	faultpoint.Hold(ctx, faultpoint.BeforeCheck)

	// The check (qcow2.Check: a read of the metadata, proven clean in
	// process, else qemu-img check decides) and the proof (a
	// read of what the copy did not write, after freeing the metadata's
	// zeros, which changes no byte) run at once, and the proof counts
	// only if the check is clean.
	type checked struct {
		res  *qemu.CheckResult
		err  error
		took time.Duration
	}
	checkDone := make(chan checked, 1)
	go func() {
		start := time.Now()
		res, err := qcow2.Check(ctx, path)
		checkDone <- checked{res, err, time.Since(start)}
	}()
	hashStart := time.Now()
	size, sum, before, proofErr := a.stampedProof(ctx, in.Key, path, digests != nil, func(n int64) {
		verifying.Verified, verifying.Rate = n, hashRate.observe(time.Now(), n)
		beat(verifying)
	})
	hashTook := time.Since(hashStart)
	check := <-checkDone
	checkTook := check.took
	if check.err != nil {
		return nil, permanent(check.err)
	}
	if !check.res.Clean() {
		return nil, checkFailed(in, path, resumed, check.res)
	}
	if errors.Is(proofErr, integrity.ErrNotSealable) {
		return nil, imageFailed(in, path, resumed, fmt.Sprintf("disk %d: image %s cannot be proven to hold what its copy wrote (%v)", in.Key, path, proofErr))
	}
	if proofErr != nil {
		return nil, proofErr
	}
	var allocated int64
	if fi, err := os.Stat(path); err == nil {
		allocated, _ = sparse.Allocated(fi)
	}
	// The copy read what the moref named when it began; if the snapshot
	// vanished or the moref names another snapshot now, nothing proves
	// the data and the change ID are this backup's: it must not commit.
	if checkedVM == "" {
		if _, err := vc.CheckSnapshot(ctx, in.VMRef, in.SnapshotRef, snapName); err != nil {
			return nil, snapshotErr(what+", after the copy", err)
		}
	}
	log.Info("disk transferred", "disk", in.Key, "backup", in.BackupID, "mode", in.Mode,
		"written", res.Written, "zeroed", res.Zeroed, "skipped", res.Skipped, "retried", res.Retried, "size", size)
	took := time.Since(start)
	metricsOr(a.Metrics).DiskTransferred(in.Mode, res.Read, res.Written, res.Zeroed, took)
	return &TransferDiskResult{Path: path, ReadBytes: res.Read, WrittenBytes: res.Written + res.Zeroed,
		SizeBytes: size, AllocatedBytes: allocated, SHA256: sum, Seconds: took.Seconds(), Stamp: (*FileStamp)(&before),
		DigestSHA256: digestSum, DigestSize: digestSize,
		SetupSeconds: copyStart.Sub(start).Seconds(), CopySeconds: copyTook.Seconds(),
		CheckSeconds: checkTook.Seconds(), HashSeconds: hashTook.Seconds(), Writer: writer}, nil
}

// copyDisk serves the snapshot's disk as NBD and copies the extents from
// resumeFrom on into the image at path, which the copier writes itself
// (qcow2.Writer), or qemu-nbd serves where the writer cannot; then it
// stops the servers: when it returns, the copy's final flush made the
// data durable.
func (a *Transfer) copyDisk(ctx context.Context, in TransferDiskInput, profile vsphere.Profile, path string,
	extents []copier.Extent, resumeFrom int64, digests *digest.Writer, beat func(TransferProgress)) (*copier.Result, string, error) {
	runDir, err := a.runtimeDir()
	if err != nil {
		return nil, "", permanent(err)
	}
	base := filepath.Join(runDir, in.BackupID+"-"+strconv.Itoa(int(in.Key)))
	// The servers' folders are named by the transfer, not made fresh, so
	// that a retry finds and stops a server a killed attempt left there;
	// the servers remove their sockets and pid files when they stop, and
	// the folders go after them (deferred first, so run last). A folder
	// that is not empty stays: a retry's server is in it; a retry whose
	// server was starting in it, still empty, makes it again (see
	// internal/qemu's start).
	for _, dir := range []string{base + "-s", base + "-t"} {
		defer removeEmptyDir(dir)
	}
	opener, err := a.opener(profile)
	if err != nil {
		return nil, "", permanent(err)
	}
	img, err := a.openImage(ctx, in, path, extents, resumeFrom)
	if err != nil {
		return nil, "", permanent(err)
	}
	if img != nil {
		defer img.Close()
	}
	// Where qemu-nbd serves the image, the two servers start at once:
	// each start waits for its server to accept connections, time the
	// slot is held and nothing is copied.
	type started struct {
		exp *qemu.Export
		err error
	}
	targetStarted := make(chan started, 1)
	if img == nil {
		go func() {
			exp, err := qemu.StartQemuNBD(ctx, qemu.QemuNBDOptions{Image: path, Format: "qcow2", Dir: base + "-t"})
			targetStarted <- started{exp, err}
		}()
	} else {
		targetStarted <- started{}
	}
	src, srcErr := opener.Open(ctx, source.Request{Profile: profile, VMRef: in.VMRef, SnapshotRef: in.SnapshotRef,
		Disk: vsphere.Disk{Key: in.Key, Capacity: in.Capacity, FileName: in.FileName}, Dir: base + "-s"})
	if srcErr == nil {
		defer src.Close()
	}
	t := <-targetStarted
	if t.exp != nil {
		defer t.exp.Close()
	}
	if t.err != nil || srcErr != nil {
		return nil, "", permanent(errors.Join(t.err, srcErr))
	}
	target := t.exp

	opts := a.Copy
	opts.Source = src.URI()
	if img != nil {
		opts.Image = img
	} else {
		opts.Target = target.URI()
	}
	opts.Extents = extents
	opts.Overlay = in.Mode == ModeIncremental
	opts.ResumeFrom = resumeFrom
	if digests != nil {
		opts.Digests = digests
	}
	if faultpoint.Active(ctx) && opts.ProgressInterval == 0 {
		// Fault tests hold a transfer at about half its bytes: a fast
		// copy of a few hundred MiB must report progress often enough to
		// be seen there, not only at its start and end.
		opts.ProgressInterval = 10 * time.Millisecond
	}
	halfway := false
	copyRate := newRateMeter()
	opts.Progress = func(p copier.Progress) {
		beat(TransferProgress{Path: path, ResumePoint: p.ResumePoint, Done: p.Done, Total: p.Total,
			Key: in.Key, Stage: TransferStageCopying, Rate: copyRate.observe(time.Now(), p.Done)})
		if faultpoint.Enabled && !halfway && p.Total > 0 && p.Done*2 >= p.Total && p.Done < p.Total {
			halfway = true
			faultpoint.Hold(ctx, faultpoint.MidTransfer)
		}
	}
	res, err := copier.Copy(ctx, opts)
	if err != nil {
		if ctx.Err() != nil {
			return nil, "", ctx.Err()
		}
		return nil, "", permanent(fmt.Errorf("disk %d into %s: %w", in.Key, path, err))
	}
	// A clean stop of qemu-nbd closes the image; the copy's final FLUSH
	// already made the data durable.
	if target != nil {
		if err := target.Close(); err != nil {
			return nil, "", fmt.Errorf("disk %d: stopping qemu-nbd: %w", in.Key, err)
		}
	}
	_ = src.Close()
	if img != nil {
		return res, WriterCopier, nil
	}
	return res, WriterQemuNBD, nil
}

// openImage opens the image at path for the copier to write itself, or
// returns nil where qemu-nbd is to serve it: QemuNBDTarget, an image the
// writer does not take (qcow2.ErrUnsupported), one larger than the disk
// (a capacity not a multiple of 512 bytes), or a resume point off its
// subclusters (left by an attempt through qemu-nbd).
func (a *Transfer) openImage(ctx context.Context, in TransferDiskInput, path string, extents []copier.Extent, resumeFrom int64) (*qcow2.Writer, error) {
	if a.QemuNBDTarget {
		return nil, nil
	}
	log := activity.GetLogger(ctx)
	w, err := qcow2.OpenWriter(path, copier.Ranges(extents)...)
	if errors.Is(err, qcow2.ErrUnsupported) {
		log.Info("qemu-nbd writes the image", "disk", in.Key, "backup", in.BackupID, "reason", err.Error())
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("disk %d: %w", in.Key, err)
	}
	reason := ""
	if w.Size() != in.Capacity {
		// qemu-img made it (Create does not make such a disk), its size
		// rounded up to 512 bytes.
		reason = fmt.Sprintf("the image holds %d bytes for a disk of %d", w.Size(), in.Capacity)
	} else if g := w.Granularity(); resumeFrom%g != 0 && len(extents) > 0 && resumeFrom < extents[len(extents)-1].End() {
		reason = fmt.Sprintf("resume point %d is not on the image's subclusters of %d bytes", resumeFrom, g)
	}
	if reason == "" {
		return w, nil
	}
	log.Info("qemu-nbd writes the image", "disk", in.Key, "backup", in.BackupID, "reason", reason)
	if err := w.Close(); err != nil {
		log.Warn("closing the image", "disk", in.Key, "backup", in.BackupID, "error", err)
	}
	return nil, nil
}

// removeEmptyDir removes dir if it exists and is empty.
func removeEmptyDir(dir string) {
	_ = unix.Rmdir(dir)
}

// syncFileAndDir makes a new file and its entry in its folder durable.
func syncFileAndDir(path string) error {
	for _, p := range []string{path, filepath.Dir(path)} {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		err = f.Sync()
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// proof returns the size of the image at path and the proof the commit
// records with it: its seal when the transfer wrote its digest file (the
// digest file already holds the digest of every range the copy wrote, so
// only the rest of the file is read), else the SHA-256 of the whole file.
// An image the seal cannot cover (its digest file unreadable, or a record
// of a range the image does not hold itself: a write of the copy that is
// not there) gives an error wrapping integrity.ErrNotSealable: hashing it
// whole would prove the image as it is, not as the copy wrote it.
func (a *Transfer) proof(ctx context.Context, path string, digests bool, beat func(int64)) (int64, string, error) {
	if digests {
		return integrity.Seal(ctx, path, beat)
	}
	return integrity.Hash(ctx, path, beat)
}

// stampedProof returns the image's size, its proof (proof) and its file
// stamp, which is the same before and after the proof was taken: the
// commit records the stamp with the proof, so what was proven is the file
// as it stays. With digests, the zeros of the image's metadata (qemu
// writes its 2 MiB refcount blocks whole) are freed first (integrity.Compact, a
// write that leaves the content as it is, so before the stamp): the space
// the image takes shrinks to what it uses.
func (a *Transfer) stampedProof(ctx context.Context, key int32, path string, digests bool, beat func(int64)) (int64, string, integrity.Stamp, error) {
	if digests {
		if _, err := integrity.Compact(ctx, path); err != nil {
			if ctx.Err() != nil {
				return 0, "", integrity.Stamp{}, ctx.Err()
			}
			activity.GetLogger(ctx).Warn("the zeros of the image's metadata were not freed", "disk", key, "image", path, "error", err)
		}
	}
	_, before, err := integrity.StampOf(path)
	if err != nil {
		return 0, "", before, permanent(err)
	}
	size, sum, err := a.proof(ctx, path, digests, beat)
	if err != nil {
		return 0, "", before, permanent(err)
	}
	if _, after, err := integrity.StampOf(path); err != nil || after != before {
		return 0, "", before, fmt.Errorf("disk %d: %s changed while it was hashed (%v)", key, path, err)
	}
	return size, sum, before, nil
}

// checkFailed is the error of a transfer whose image fails qemu-img check.
// An image resumed from an earlier attempt is suspect as a whole (that
// attempt may have died in the middle of a metadata update, and the resume
// point says nothing of the metadata): it is removed, so the retry copies
// every area into a new image. An image this attempt made from scratch
// says that copying is not the cure: retrying into it 8 times fails 8
// times, each a full copy while the snapshot stays on the VM, so the
// transfer fails non-retryably, naming the image, for an operator to look
// at the repository's storage.
func checkFailed(in TransferDiskInput, path string, resumed bool, check *qemu.CheckResult) error {
	return imageFailed(in, path, resumed, fmt.Sprintf("disk %d: image %s fails qemu-img check (%d corruptions, %d check errors)", in.Key, path, check.Corruptions, check.CheckErrors))
}

// imageFailed is the error of a transfer whose image is not sound after
// its copy (msg says how): one copied from scratch fails non-retryably;
// one resumed from an earlier attempt is removed, and the next attempt
// copies afresh.
func imageFailed(in TransferDiskInput, path string, resumed bool, msg string) error {
	if !resumed {
		return temporal.NewNonRetryableApplicationError(msg+" after a copy from scratch: the repository's storage (or qemu) damaged it, and a new copy would not fare better",
			ErrTypeImageCorrupt, nil)
	}
	if err := os.Remove(path); err != nil {
		return temporal.NewNonRetryableApplicationError(msg+fmt.Sprintf("; it was resumed, but it cannot be removed to start afresh: %v", err),
			ErrTypeImageCorrupt, err)
	}
	return temporal.NewApplicationError(msg+" after it was resumed from an earlier attempt: removed, the next attempt copies it afresh",
		ErrTypeImageCorrupt)
}

// createImage makes the empty image at path, with the L2 tables of the
// extents the copy will write (qcow2.Create).
func (a *Transfer) createImage(ctx context.Context, in TransferDiskInput, path string, extents []copier.Extent) error {
	written := copier.Ranges(extents)
	if in.Mode == ModeFull {
		return permanent(qcow2.Make(ctx, path, in.Capacity, written...))
	}
	if in.BackingPath == "" {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("disk %d: incremental without a backing image", in.Key), ErrTypeInvalidInput, nil)
	}
	if !a.Repo.Contains(in.BackingPath) {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("disk %d: backing image %s is outside the repository", in.Key, in.BackingPath), ErrTypeInvalidInput, nil)
	}
	return permanent(qcow2.MakeOverlay(ctx, path, in.BackingPath, written...))
}

func (a *Transfer) opener(p vsphere.Profile) (source.Opener, error) {
	if a.Sources != nil {
		return a.Sources(p)
	}
	return source.New(p)
}

func (a *Transfer) runtimeDir() (string, error) {
	dir := a.RuntimeDir
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "cbtflow-"+strconv.Itoa(os.Getuid()))
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	return dir, os.Chmod(dir, 0o700)
}
