package activities

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/repository"
)

// TransferDisks transfers every disk of a backup in one activity, each as
// TransferDisk does (the same slots, resume points, checks and proofs;
// the snapshot is checked once for all, before and after),
// MaxParallel at a time. A backup of two disks is then one activity task
// and one workflow task at its end, where a TransferDisk per disk made an
// activity task each and a workflow task at the end of each.
//
// Its heartbeat (TransferDisksProgress) carries every running disk's
// latest progress, its resume point, and the result of every disk done:
// a retry resumes each disk from its point and does not copy a disk done
// again, as long as that disk's image is still the one its result names
// (its path, the file stamp its proof was taken with, its digest file;
// else the disk is transferred again). A disk that fails for good cancels
// the others; one whose error a retry may cure lets the running ones
// finish, for the retry to keep, and no other starts. The first error
// (or the first for good after it), the disk named in it, is the
// activity's: retried or not as TransferDisk's would be.
func (a *Transfer) TransferDisks(ctx context.Context, in TransferDisksInput) (*TransferDisksResult, error) {
	start := time.Now()
	if len(in.Disks) == 0 {
		return nil, temporal.NewNonRetryableApplicationError("TransferDisks: no disks", ErrTypeInvalidInput, nil)
	}
	first := in.Disks[0]
	seen := map[int32]bool{}
	var keys []int32
	for _, d := range in.Disks {
		if seen[d.Key] {
			return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("TransferDisks: disk %d given twice", d.Key), ErrTypeInvalidInput, nil)
		}
		if d.Profile != first.Profile || d.VMRef != first.VMRef || d.VMUUID != first.VMUUID || d.SnapshotRef != first.SnapshotRef || d.BackupID != first.BackupID {
			return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("TransferDisks: disk %d is not of the backup, VM and snapshot of disk %d", d.Key, first.Key), ErrTypeInvalidInput, nil)
		}
		seen[d.Key] = true
		keys = append(keys, d.Key)
	}
	var prev TransferDisksProgress
	if activity.HasHeartbeatDetails(ctx) {
		if err := activity.GetHeartbeatDetails(ctx, &prev); err != nil {
			prev = TransferDisksProgress{}
		}
	}
	beat := a.quietBeater(ctx, start)
	beats := &disksBeat{beat: func(p TransferDisksProgress) { beat(p) }}
	results := make([]*TransferDiskResult, len(in.Disks))
	for i, d := range in.Disks {
		if r := prev.doneResult(d.Key); r != nil && a.unchanged(d, r) {
			results[i] = r
		}
	}
	// The disks to transfer, those an earlier attempt began (a resume
	// point) first, else in the order given; their resume points stay in
	// the heartbeat until they start (as waiting), so that a retry of
	// this attempt still has them. They are in the state before the
	// first heartbeat that records the disks kept as done.
	var begun, fresh []int
	for i, d := range in.Disks {
		switch p := prev.progress(d.Key); {
		case results[i] != nil:
		case p.Path != "":
			beats.keep(p)
			begun = append(begun, i)
		default:
			fresh = append(fresh, i)
		}
	}
	pending := append(begun, fresh...)
	for i, d := range in.Disks {
		if r := results[i]; r != nil {
			beats.done(d.Key, *r)
			activity.GetLogger(ctx).Info("disk transferred by an earlier attempt, its image unchanged", "disk", d.Key, "backup", d.BackupID, "image", r.Path)
		}
	}
	// The snapshot is checked once for every disk: before any reads it
	// (a moref alone proves nothing after a vCenter restart), and after
	// every copy, the disks done by an earlier attempt included (if the
	// snapshot vanished or the moref names another one now, nothing
	// proves the data and the change IDs are this backup's).
	vc, err := a.Sessions.Client(ctx, first.Profile)
	if err != nil {
		return nil, permanent(err)
	}
	snapName := SnapshotPrefix + first.BackupID
	what := fmt.Sprintf("disks %v of VM %s (%s)", keys, first.VMRef, first.VMUUID)
	vmName, err := vc.CheckSnapshot(ctx, first.VMRef, first.SnapshotRef, snapName)
	if err != nil {
		return nil, snapshotErr(what, err)
	}
	what = fmt.Sprintf("disks %v of VM %q (%s, %s)", keys, vmName, first.VMRef, first.VMUUID)
	// A disk that fails for good cancels the others: the backup fails.
	// One that may succeed when retried lets the running ones finish (the
	// retry keeps them) and starts no other.
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, max(in.MaxParallel, 1))
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	failed := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return firstErr != nil
	}
	for _, i := range pending {
		select {
		case sem <- struct{}{}:
		case <-dctx.Done():
		}
		if dctx.Err() != nil || failed() {
			break
		}
		d := in.Disks[i]
		wg.Go(func() {
			defer func() { <-sem }()
			r, err := a.transfer(dctx, d, time.Now(), prev.progress(d.Key), beats.set, vmName)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				// The first error, unless a later one is for good: a
				// disk that fails for good cancels the others (errors
				// of disks canceled so are not theirs).
				own := ctx.Err() != nil || dctx.Err() == nil
				if own && (firstErr == nil || (retryable(firstErr) && !retryable(err))) {
					firstErr = diskErr(d.Key, err)
					if !retryable(err) {
						cancel()
					}
				}
				beats.stopped(d.Key)
				return
			}
			results[i] = r
			beats.done(d.Key, *r)
		})
	}
	wg.Wait()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if firstErr != nil {
		return nil, firstErr
	}
	if _, err := vc.CheckSnapshot(ctx, first.VMRef, first.SnapshotRef, snapName); err != nil {
		return nil, snapshotErr(what+", after the copy", err)
	}
	out := &TransferDisksResult{Disks: make([]TransferDiskResult, len(results))}
	for i, r := range results {
		out.Disks[i] = *r
	}
	return out, nil
}

// unchanged reports whether the image of disk d, done by an earlier
// attempt with result r, is still what r says: at the disk's image path
// in this worker's repository, with the file stamp its proof was taken
// with, and its digest file (when r names one) of the size and SHA-256
// r says (the commit records neither otherwise, and the backup would
// fail where a new transfer succeeds).
func (a *Transfer) unchanged(d TransferDiskInput, r *TransferDiskResult) bool {
	if r.Stamp == nil || r.Path == "" {
		return false
	}
	path, err := a.Repo.ImagePath(repository.Key{Profile: d.Profile, VMUUID: d.VMUUID, DiskKey: d.Key, BackupID: d.BackupID})
	if err != nil || path != r.Path {
		return false
	}
	if _, now, err := integrity.StampOf(r.Path); err != nil || FileStamp(now) != *r.Stamp {
		return false
	}
	if r.DigestSHA256 == "" {
		return true
	}
	size, sum, err := digest.HashFile(digest.PathOf(r.Path))
	return err == nil && size == r.DigestSize && sum == r.DigestSHA256
}

// diskErr names disk key in err, unless its message does already, keeping
// what the SDK and the workflow read of it: an ApplicationError's type,
// retryability and category (not its details: no transfer error has
// any); a cancel as it is.
func diskErr(key int32, err error) error {
	name := fmt.Sprintf("disk %d", key)
	if strings.Contains(err.Error(), name) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		return temporal.NewApplicationErrorWithOptions(name+": "+app.Message(), app.Type(),
			temporal.ApplicationErrorOptions{NonRetryable: app.NonRetryable(), Cause: err, Category: app.Category()})
	}
	return fmt.Errorf("%s: %w", name, err)
}

// retryable reports whether Temporal retries an activity that fails with
// err.
func retryable(err error) bool {
	var app *temporal.ApplicationError
	return !errors.As(err, &app) || !app.NonRetryable()
}

// disksBeat gathers the progress of TransferDisks' disks into its
// heartbeat.
type disksBeat struct {
	beat func(TransferDisksProgress)
	mu   sync.Mutex
	p    TransferDisksProgress
}

// set records a running disk's progress and heartbeats them all.
func (b *disksBeat) set(p TransferProgress) {
	b.mu.Lock()
	defer b.mu.Unlock()
	i := slices.IndexFunc(b.p.Disks, func(d TransferProgress) bool { return d.Key == p.Key })
	if i < 0 {
		b.p.Disks = append(b.p.Disks, p)
	} else {
		b.p.Disks[i] = p
	}
	b.send()
}

// keep records the resume point of a disk an earlier attempt began, as
// waiting, until it starts (without heartbeating).
func (b *disksBeat) keep(p TransferProgress) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.p.Disks = append(b.p.Disks, waiting(p))
}

// stopped records a disk whose transfer failed as waiting (for a retry),
// its resume point kept, and heartbeats.
func (b *disksBeat) stopped(key int32) {
	b.mu.Lock()
	defer b.mu.Unlock()
	i := slices.IndexFunc(b.p.Disks, func(d TransferProgress) bool { return d.Key == key })
	if i < 0 {
		return
	}
	b.p.Disks[i] = waiting(b.p.Disks[i])
	b.send()
}

// waiting is a disk's progress p as a disk that waits: its resume point
// and bytes done, no stage of a running copy, no rate.
func waiting(p TransferProgress) TransferProgress {
	return TransferProgress{Path: p.Path, ResumePoint: p.ResumePoint, Done: p.Done, Total: p.Total, Key: p.Key, Stage: TransferStageWaiting}
}

// done records a disk's result and heartbeats.
func (b *disksBeat) done(key int32, r TransferDiskResult) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.p.Disks = slices.DeleteFunc(b.p.Disks, func(d TransferProgress) bool { return d.Key == key })
	b.p.Done = append(b.p.Done, TransferDiskDone{Key: key, Result: r})
	b.send()
}

// send heartbeats a copy (the SDK keeps the details until it sends them).
func (b *disksBeat) send() {
	b.beat(TransferDisksProgress{Disks: slices.Clone(b.p.Disks), Done: slices.Clone(b.p.Done)})
}

// doneResult is the result an earlier attempt recorded for disk key.
func (p TransferDisksProgress) doneResult(key int32) *TransferDiskResult {
	for _, d := range p.Done {
		if d.Key == key {
			r := d.Result
			return &r
		}
	}
	return nil
}

// progress is the last progress an earlier attempt recorded for disk
// key (its resume point), or none.
func (p TransferDisksProgress) progress(key int32) TransferProgress {
	for _, d := range p.Disks {
		if d.Key == key {
			return d
		}
	}
	return TransferProgress{}
}
