//go:build cbtflow_faultpoints

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/client"
	tlog "go.temporal.io/sdk/log"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/testsuite"
	"go.temporal.io/sdk/workflow"

	"github.com/cbtflow/cbtflow/activities"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/repository"
	"github.com/cbtflow/cbtflow/internal/vsphere"
	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/testutil"
	"github.com/cbtflow/cbtflow/workflows"
)

// holdTransfers holds every transfer at about half its bytes for hold (or
// until its context ends), heartbeating so that a held transfer stays
// alive, and counts the transfers held at once: a transfer held there is
// copying, with its source and target open.
type holdTransfers struct {
	hold time.Duration

	mu         sync.Mutex
	holding    int
	maxHolding int
}

// Hold implements faultpoint.Holder.
func (h *holdTransfers) Hold(ctx context.Context, p faultpoint.Point) {
	if p != faultpoint.MidTransfer {
		return
	}
	h.mu.Lock()
	h.holding++
	h.maxHolding = max(h.maxHolding, h.holding)
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		h.holding--
		h.mu.Unlock()
	}()
	done := time.NewTimer(h.hold)
	defer done.Stop()
	beat := time.NewTicker(200 * time.Millisecond)
	defer beat.Stop()
	for {
		select {
		case <-done.C:
			return
		case <-ctx.Done():
			return
		case <-beat.C:
			activity.RecordHeartbeat(ctx)
		}
	}
}

// held returns how many transfers are held now.
func (h *holdTransfers) held() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.holding
}

func (h *holdTransfers) peak() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.maxHolding
}

// fanOutInput asks for one snapshot and one full transfer of the VM's
// second disk per backup ID, all transfers at once; the transfer of the
// backup ID signalled as signalCancel is canceled, and then a short
// activity (ResolveVM) runs as a probe.
type fanOutInput struct {
	Profile          string
	VM               string
	Backups          []string
	HeartbeatTimeout time.Duration
}

// signalCancel names the backup whose transfer transferFanOut cancels.
const signalCancel = "cancel-transfer"

type fanOutTransfer struct {
	BackupID     string
	ChangedBytes int64
	Result       *activities.TransferDiskResult
	Err          string
	Canceled     bool
	Done         time.Time
}

type fanOutResult struct {
	VMUUID    string
	DiskKey   int32
	Started   time.Time
	ProbeDone time.Time
	Transfers []fanOutTransfer
	Cleanup   []string // errors removing the snapshots
}

// transferFanOut is the test's workflow: it runs through the worker the
// activities of a backup, with every transfer at once.
func transferFanOut(ctx workflow.Context, in fanOutInput) (*fanOutResult, error) {
	var vs *activities.VSphere
	var tr *activities.Transfer
	short := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{StartToCloseTimeout: time.Minute,
		RetryPolicy: &temporal.RetryPolicy{MaximumAttempts: 1}})
	var vm activities.ResolveVMResult
	if err := workflow.ExecuteActivity(short, vs.ResolveVM, activities.ResolveVMInput{Profile: in.Profile, VM: in.VM}).Get(ctx, &vm); err != nil {
		return nil, err
	}
	var prep activities.PrepareVMResult
	if err := workflow.ExecuteActivity(short, vs.PrepareVM, activities.PrepareVMInput{Profile: in.Profile, VMUUID: vm.VMUUID}).Get(ctx, &prep); err != nil {
		return nil, err
	}
	if len(prep.Disks) != 2 {
		return nil, fmt.Errorf("the VM has %d disks, want 2", len(prep.Disks))
	}
	out := &fanOutResult{VMUUID: vm.VMUUID, DiskKey: prep.Disks[1].Key}
	var snaps []activities.CreateSnapshotResult
	defer func() {
		dctx, cancel := workflow.NewDisconnectedContext(ctx)
		defer cancel()
		for _, s := range snaps {
			err := workflow.ExecuteActivity(workflow.WithActivityOptions(dctx, workflow.ActivityOptions{StartToCloseTimeout: time.Minute}),
				vs.RemoveSnapshot, activities.RemoveSnapshotInput{Profile: in.Profile, VMRef: vm.VMRef,
					SnapshotRef: s.SnapshotRef, SnapshotName: s.SnapshotName}).Get(dctx, nil)
			if err != nil {
				out.Cleanup = append(out.Cleanup, err.Error())
			}
		}
	}()
	var inputs []activities.TransferDiskInput
	for _, id := range in.Backups {
		var s activities.CreateSnapshotResult
		if err := workflow.ExecuteActivity(short, vs.CreateSnapshot, activities.CreateSnapshotInput{Profile: in.Profile,
			VMRef: vm.VMRef, VMUUID: vm.VMUUID, BackupID: id}).Get(ctx, &s); err != nil {
			return nil, err
		}
		snaps = append(snaps, s)
		var sd activities.SnapshotDisk
		for _, d := range s.Disks {
			if d.Key == out.DiskKey {
				sd = d
			}
		}
		var areas activities.ChangedAreasResult
		if err := workflow.ExecuteActivity(short, vs.ChangedAreas, activities.ChangedAreasInput{Profile: in.Profile,
			VMRef: vm.VMRef, SnapshotRef: s.SnapshotRef, BackupID: id, Key: sd.Key, Capacity: sd.Capacity, ChangeID: "*"}).Get(ctx, &areas); err != nil {
			return nil, err
		}
		inputs = append(inputs, activities.TransferDiskInput{Profile: in.Profile, VMRef: vm.VMRef, VMUUID: vm.VMUUID,
			SnapshotRef: s.SnapshotRef, BackupID: id, Key: sd.Key, Capacity: sd.Capacity, FileName: sd.FileName,
			Mode: "full", ExtentsFile: areas.ExtentsFile, ChangedBytes: areas.ChangedBytes})
	}

	// One attempt each: a transfer timed out while it waits for a slot
	// fails the test instead of being retried.
	trCtx := workflow.WithActivityOptions(ctx, workflow.ActivityOptions{StartToCloseTimeout: 5 * time.Minute,
		HeartbeatTimeout: in.HeartbeatTimeout, WaitForCancellation: true,
		RetryPolicy: &temporal.RetryPolicy{MaximumAttempts: 1}})
	out.Started = workflow.Now(ctx)
	sel := workflow.NewSelector(ctx)
	out.Transfers = make([]fanOutTransfer, len(inputs))
	cancels := map[string]workflow.CancelFunc{}
	for i, ti := range inputs {
		actx, cancel := workflow.WithCancel(trCtx)
		defer cancel()
		cancels[ti.BackupID] = cancel
		out.Transfers[i] = fanOutTransfer{BackupID: ti.BackupID, ChangedBytes: ti.ChangedBytes}
		sel.AddFuture(workflow.ExecuteActivity(actx, tr.TransferDisk, ti), func(f workflow.Future) {
			t := &out.Transfers[i]
			t.Done = workflow.Now(ctx)
			var r activities.TransferDiskResult
			if err := f.Get(ctx, &r); err != nil {
				var ce *temporal.CanceledError
				t.Canceled = errors.As(err, &ce)
				t.Err = err.Error()
				return
			}
			t.Result = &r
		})
	}
	var id string
	workflow.GetSignalChannel(ctx, signalCancel).Receive(ctx, &id)
	if cancel, ok := cancels[id]; ok {
		cancel()
	}
	if err := workflow.ExecuteActivity(short, vs.ResolveVM, activities.ResolveVMInput{Profile: in.Profile, VM: in.VM}).Get(ctx, nil); err != nil {
		return nil, err
	}
	out.ProbeDone = workflow.Now(ctx)
	for range inputs {
		sel.Select(ctx)
	}
	return out, nil
}

// TestMaxTransfers runs N+3 transfers at once through the worker that
// newWorker builds for --max-transfers N, on a real Temporal dev server,
// the lab, real qemu-nbd: at most N copy at the same time, and exactly N
// do; the others wait without being timed out by their short heartbeat
// timeout; the one canceled while it waits ends at once, before it opened
// anything; a short activity is not held up by the waiting transfers; and
// every other transfer completes.
func TestMaxTransfers(t *testing.T) {
	testutil.CheckNoChildren(t)
	const n = 2
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	dir := t.TempDir()
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))

	l, err := lab.Start(ctx, lab.Options{Dir: filepath.Join(dir, "lab"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("lab.Start: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("lab close: %v", err)
		}
	})
	disks, err := l.Disks(lab.SecondDiskVM)
	if err != nil || len(disks) != 2 {
		t.Fatalf("lab disks of %s: %v %+v", lab.SecondDiskVM, err, disks)
	}
	// 64 MiB: 32 of the copier's requests, enough for its progress to be
	// seen at about half (the hold point) before the end.
	for i := range 8 {
		data := bytes.Repeat([]byte{byte(0x11 * (i + 1))}, 8<<20)
		if _, err := l.WriteDisk(lab.SecondDiskVM, disks[1].Key, int64(i)<<30, bytes.NewReader(data)); err != nil {
			t.Fatalf("guest write: %v", err)
		}
	}
	pwFile := filepath.Join(dir, "password")
	if err := os.WriteFile(pwFile, []byte(l.Password()), 0o600); err != nil {
		t.Fatal(err)
	}
	profile := vsphere.Profile{Name: stack.Profile, URL: l.URL().String(), User: l.User(), PasswordFile: pwFile,
		Thumbprint: l.Thumbprint(), Source: vsphere.SourceLab}
	sessions := vsphere.NewSessions(map[string]vsphere.Profile{profile.Name: profile}, logger)
	t.Cleanup(func() { _ = sessions.Close(context.Background()) })
	repo, err := repository.Open(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}

	bin, err := stack.TemporalBinary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	serverLog, err := os.Create(filepath.Join(dir, "temporal.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer serverLog.Close()
	// Without cbtflow's dynamic configuration (stack.TemporalDynamicConfig):
	// what is tested here is the worker's slots, however its activities
	// reach it, and an eagerly started transfer's heartbeat timeout runs
	// from the answer to the workflow task, before the worker has the
	// task. (A 2 s heartbeat timeout was tight on a busy machine either
	// way: it failed 2 of 6 runs with eager execution, 1 of 4 without; it
	// is 6 s now.)
	srv, err := testsuite.StartDevServer(ctx, testsuite.DevServerOptions{ExistingPath: bin, LogLevel: "warn",
		Stdout: serverLog, Stderr: serverLog,
		ClientOptions: &client.Options{Logger: tlog.NewStructuredLogger(logger)}})
	if err != nil {
		t.Fatalf("start the Temporal dev server: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Stop(); err != nil {
			t.Logf("stop the Temporal dev server: %v", err)
		}
	})
	c := srv.Client()

	// Each transfer is held 15 s in the middle of its copy: with 2 slots,
	// the last ones wait about 30 s, five times their heartbeat timeout.
	hooks := &holdTransfers{hold: 15 * time.Second}
	w := newWorker(c, deps{sessions: sessions, repo: repo, namespace: "default",
		activityContext: faultpoint.With(context.Background(), hooks)}, n)
	w.RegisterWorkflow(transferFanOut)
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	defer w.Stop()

	// The live qemu-nbd processes are the transfers' targets: one per
	// transfer that copies.
	var mu sync.Mutex
	maxTargets := 0
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			k := 0
			for _, p := range testutil.Children(os.Getpid()) {
				if strings.HasPrefix(filepath.Base(strings.Fields(p.Cmd + " x")[0]), "qemu-nbd") {
					k++
				}
			}
			mu.Lock()
			maxTargets = max(maxTargets, k)
			mu.Unlock()
			select {
			case <-stopSampling:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()

	in := fanOutInput{Profile: profile.Name, VM: lab.SecondDiskVM, HeartbeatTimeout: 6 * time.Second}
	for i := range n + 3 {
		in.Backups = append(in.Backups, fmt.Sprintf("slots%d", i))
	}
	run, err := c.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: "max-transfers", TaskQueue: workflows.TaskQueue,
		WorkflowExecutionTimeout: 5 * time.Minute}, transferFanOut, in)
	if err != nil {
		t.Fatal(err)
	}
	// Once N transfers are held mid-copy, cancel one that has no image
	// yet: one that waits (the worker takes the tasks in any order).
	waitFor := time.Now().Add(2 * time.Minute)
	for hooks.held() < n && time.Now().Before(waitFor) {
		time.Sleep(20 * time.Millisecond)
	}
	cancelID := ""
	for _, id := range in.Backups {
		if imgs, _ := filepath.Glob(filepath.Join(dir, "repo", "*", "*", "*", id+".qcow2")); len(imgs) == 0 {
			cancelID = id
		}
	}
	if hooks.held() < n {
		t.Fatalf("after 2 minutes, %d transfers copy, want %d", hooks.held(), n)
	}
	if cancelID == "" {
		t.Fatalf("--max-transfers %d: all %d transfers made their images at once (%d held mid-copy now): none waits for a slot",
			n, len(in.Backups), hooks.held())
	}
	if err := c.SignalWorkflow(ctx, run.GetID(), run.GetRunID(), signalCancel, cancelID); err != nil {
		t.Fatal(err)
	}
	var res fanOutResult
	err = run.Get(ctx, &res)
	close(stopSampling)
	<-sampled
	if err != nil {
		t.Fatalf("the workflow failed: %v", err)
	}

	if got := hooks.peak(); got != n {
		t.Errorf("--max-transfers %d: %d transfers copied at the same time, want exactly %d", n, got, n)
	}
	if maxTargets > n {
		t.Errorf("--max-transfers %d: up to %d qemu-nbd targets ran at the same time", n, maxTargets)
	}
	firstDone := time.Time{}
	var canceled fanOutTransfer
	for _, tr := range res.Transfers {
		if tr.BackupID == cancelID {
			canceled = tr
			continue
		}
		if tr.Result == nil {
			t.Errorf("transfer %s failed: %s", tr.BackupID, tr.Err)
			continue
		}
		if tr.Result.ReadBytes != tr.ChangedBytes || tr.ChangedBytes < 64<<20 {
			t.Errorf("transfer %s read %d of %d bytes", tr.BackupID, tr.Result.ReadBytes, tr.ChangedBytes)
		}
		if firstDone.IsZero() || tr.Done.Before(firstDone) {
			firstDone = tr.Done
		}
	}
	if !canceled.Canceled {
		t.Errorf("the transfer canceled while it waited: result %+v, error %q; want a CanceledError", canceled.Result, canceled.Err)
	}
	// Canceled while it waited: it ends before any slot frees, and never
	// made its image.
	if !canceled.Done.Before(firstDone) {
		t.Errorf("the canceled transfer ended %v after the start, the first transfer %v: its cancel waited for a slot",
			canceled.Done.Sub(res.Started), firstDone.Sub(res.Started))
	}
	img, err := repo.ImagePath(repository.Key{Profile: profile.Name, VMUUID: res.VMUUID, DiskKey: res.DiskKey, BackupID: canceled.BackupID})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the transfer canceled while it waited made its image %s (%v)", img, err)
	}
	// Other activities run while transfers wait for a slot.
	if !res.ProbeDone.Before(firstDone) {
		t.Errorf("ResolveVM, started with the cancel, ended %v after the start, after the first transfer (%v)",
			res.ProbeDone.Sub(res.Started), firstDone.Sub(res.Started))
	}
	if len(res.Cleanup) != 0 {
		t.Errorf("removing the snapshots: %v", res.Cleanup)
	}
	t.Logf("at most %d transfers held mid-copy at once, %d qemu-nbd targets; first transfer done after %v, canceled one after %v, probe after %v",
		hooks.peak(), maxTargets, firstDone.Sub(res.Started), canceled.Done.Sub(res.Started), res.ProbeDone.Sub(res.Started))
}
