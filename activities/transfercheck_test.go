//go:build cbtflow_faultpoints

package activities_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"go.temporal.io/sdk/interceptor"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/copier"
	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// beforeCheck is a faultpoint.Holder that damages a transfer's files
// where the transfer is about to check and prove its image (the image is
// closed, its digest file complete), and counts how often.
type beforeCheck struct {
	t      *testing.T
	damage func() error

	mu    sync.Mutex
	times int
}

func (c *beforeCheck) Hold(ctx context.Context, p faultpoint.Point) {
	if p != faultpoint.BeforeCheck {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.times++
	if err := c.damage(); err != nil {
		c.t.Errorf("damage before the check: %v", err)
	}
}

func (c *beforeCheck) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.times
}

// corruptBeforeCheck zeroes the image's first refcount block before its
// check, so every cluster in use has a refcount of 0 (a corruption each).
func corruptBeforeCheck(t *testing.T, path string) *beforeCheck {
	return &beforeCheck{t: t, damage: func() error { return zeroRefcountBlock(path) }}
}

// zeroRefcountBlock overwrites a QCOW2's first refcount block with zeros.
func zeroRefcountBlock(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	h := make([]byte, 72)
	if _, err := f.ReadAt(h, 0); err != nil {
		return err
	}
	if string(h[:4]) != "QFI\xfb" {
		return fmt.Errorf("not a QCOW2 image")
	}
	clusterBits := binary.BigEndian.Uint32(h[20:24])
	table := int64(binary.BigEndian.Uint64(h[48:56]))
	entry := make([]byte, 8)
	if _, err := f.ReadAt(entry, table); err != nil {
		return err
	}
	block := int64(binary.BigEndian.Uint64(entry))
	if block == 0 {
		return fmt.Errorf("no refcount block")
	}
	if _, err := f.WriteAt(make([]byte, 1<<clusterBits), block); err != nil {
		return err
	}
	return f.Close()
}

// TestTransferDiskCheckFails: an image that fails qemu-img check after the
// copy is not retried into as it is. Made from scratch by the attempt, it
// fails the transfer non-retryably, naming the image; resumed from an
// earlier attempt, it is removed and the transfer fails retryably, and the
// next attempt (with the same heartbeat details) copies the disk afresh
// into a clean image.
func TestTransferDiskCheckFails(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	key := vm.disks[1].Key
	var ws []write
	for i := range 12 {
		ws = append(ws, write{off: int64(i) * (512 << 20), n: 4 << 20, seed: byte(40 + i)})
	}
	f.apply(t, key, ws...)
	// Flush often, so that an interrupted attempt leaves a resume point.
	copyOpts := copier.Options{FlushBytes: 2 << 20, FlushInterval: 50 * time.Millisecond, ProgressInterval: time.Millisecond, InFlight: 4}
	transfer := func() *activities.Transfer {
		return &activities.Transfer{Sessions: f.sessions, Repo: f.repo, RuntimeDir: f.runDir, Copy: copyOpts}
	}
	imagePath := func(b backup) string {
		p, err := f.repo.ImagePath(repository.Key{Profile: profileLab, VMUUID: vm.uuid, DiskKey: key, BackupID: b.id})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}

	t.Run("copied from scratch", func(t *testing.T) {
		b := f.takeBackup(t, env, vm, "check1", "*")
		path := imagePath(b)
		hooks := corruptBeforeCheck(t, path)
		tr := transfer()
		held := newActivityEnv(t, f.log, tr)
		holdAt(held, hooks)
		_, err := execute[activities.TransferDiskResult](t, held, tr.TransferDisk, b.input(""))
		if hooks.count() != 1 {
			t.Fatalf("the image was damaged %d times before its check, want 1 (error: %v)", hooks.count(), err)
		}
		wantAppError(t, err, activities.ErrTypeImageCorrupt, path, "qemu-img check")
		t.Logf("error: %v", err)
		// Kept as it is, for the operator the error sends to it.
		check, cerr := qemu.Check(ctxT(t, time.Minute), path)
		if cerr != nil || check.Clean() {
			t.Errorf("the damaged image %s: check %+v, %v; want it kept, damaged", path, check, cerr)
		}
	})

	t.Run("resumed", func(t *testing.T) {
		b := f.takeBackup(t, env, vm, "check2", "*")
		path := imagePath(b)
		total := b.changed.ChangedBytes

		// Attempt 1 dies a third of the way in, with a resume point.
		ic := &cancelOnProgress{stop: func(p activities.TransferProgress) bool {
			return p.ResumePoint > 0 && p.Done >= total/3
		}}
		tr1 := transfer()
		env1 := newActivityEnv(t, f.log, tr1)
		env1.SetWorkerOptions(worker.Options{Interceptors: []interceptor.WorkerInterceptor{ic}})
		_, err := execute[activities.TransferDiskResult](t, env1, tr1.TransferDisk, b.input(""))
		last, _, canceled := ic.lastBeat()
		if !canceled || err == nil || last.Path != path || last.ResumePoint <= 0 {
			t.Fatalf("attempt 1 was not interrupted with a resume point (canceled %v, last heartbeat %+v): %v", canceled, last, err)
		}

		// Attempt 2 resumes, and its image fails the check.
		hooks := corruptBeforeCheck(t, path)
		tr2 := transfer()
		env2 := newActivityEnv(t, f.log, tr2)
		holdAt(env2, hooks)
		env2.SetHeartbeatDetails(last)
		_, err = execute[activities.TransferDiskResult](t, env2, tr2.TransferDisk, b.input(""))
		if hooks.count() != 1 {
			t.Fatalf("the image was damaged %d times before its check, want 1 (error: %v)", hooks.count(), err)
		}
		t.Logf("attempt 2: %v", err)
		var app *temporal.ApplicationError
		if !errors.As(err, &app) || app.Type() != activities.ErrTypeImageCorrupt || app.NonRetryable() {
			t.Errorf("attempt 2: %v (%T), want a retryable %s", err, err, activities.ErrTypeImageCorrupt)
		}
		if _, serr := os.Stat(path); !errors.Is(serr, os.ErrNotExist) {
			t.Errorf("the resumed image that failed its check is still there (%v): a retry would resume into it", serr)
		}

		// Attempt 3 gets the same details, and starts afresh.
		tr3 := transfer()
		env3 := newActivityEnv(t, f.log, tr3)
		env3.SetHeartbeatDetails(last)
		res, err := execute[activities.TransferDiskResult](t, env3, tr3.TransferDisk, b.input(""))
		if err != nil {
			t.Fatalf("attempt 3: %v", err)
		}
		if res.ReadBytes != total {
			t.Errorf("attempt 3 read %d bytes, want all %d: nothing of the damaged image may be resumed", res.ReadBytes, total)
		}
		f.checkResult(t, b, res)
		if diff := sameContent(t, f.frozen(t, b), res.Path); diff != "" {
			t.Errorf("the image differs from the disk at snapshot time: %s", diff)
		}
	})
}

// TestTransferDiskUnsealable: an image that cannot be proven against the
// digests its copy recorded (here its digest file is damaged after the
// copy) is not committed with a hash of the file as it is: the transfer
// fails, naming the image, as for a failed image check.
func TestTransferDiskUnsealable(t *testing.T) {
	testutil.CheckNoChildren(t)
	f := newFixture(t, lab.Options{})
	testutil.CheckNoSockets(t, f.runDir)
	env := f.newEnv(t)
	vm := f.prepareVM(t, env)
	key := vm.disks[1].Key
	f.apply(t, key, write{off: 0, n: 4 << 20, seed: 71}, write{off: 1 << 30, n: 1 << 20, seed: 72})
	b := f.takeBackup(t, env, vm, "unsealable1", "*")
	path, err := f.repo.ImagePath(repository.Key{Profile: profileLab, VMUUID: vm.uuid, DiskKey: key, BackupID: b.id})
	if err != nil {
		t.Fatal(err)
	}
	// The digest file cut in half: what the copy recorded cannot be read.
	hooks := &beforeCheck{t: t, damage: func() error {
		dp := digest.PathOf(path)
		fi, err := os.Stat(dp)
		if err != nil {
			return err
		}
		return os.Truncate(dp, fi.Size()/2)
	}}
	tr := &activities.Transfer{Sessions: f.sessions, Repo: f.repo, RuntimeDir: f.runDir, Digests: true}
	held := newActivityEnv(t, f.log, tr)
	holdAt(held, hooks)
	_, err = execute[activities.TransferDiskResult](t, held, tr.TransferDisk, b.input(""))
	if hooks.count() != 1 {
		t.Fatalf("the digest file was damaged %d times, want 1 (error: %v)", hooks.count(), err)
	}
	// Non-retryable: it was copied from scratch.
	wantAppError(t, err, activities.ErrTypeImageCorrupt, path, "cannot be proven")
	t.Logf("error: %v", err)
}
