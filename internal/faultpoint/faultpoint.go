// Package faultpoint stops a worker's activity at a named step boundary,
// so that a fault test can act exactly there: kill the worker, restart
// Temporal, cut the database, damage an image.
//
// It is a test facility, and release binaries do not contain it: the
// worker-side Hold only holds in a build with the tag cbtflow_faultpoints
// (which the test harness sets, see testkit/stack.BuildBinaries); in any
// other build Hold is an empty function the compiler removes, together
// with every point name and the CBTFLOW_TEST_PAUSE_DIR variable.
//
// Across processes, a fault point is driven through a folder (EnvDir):
// the harness arms a point by creating the file DIR/<point> (Gates.Arm);
// a worker's activity that reaches an armed point writes its pid into
// DIR/<point>.reached and holds until DIR/<point> is removed
// (Gates.Release) or its context ends. Both sides of that protocol live in
// this package, and nowhere else.
package faultpoint

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Point names a step boundary where an activity can be held; it is also
// the name of the point's file in the folder of the protocol. An alias,
// so that harnesses log and concatenate points as the strings they are.
type Point = string

// The fault points, in the order a backup reaches them.
const (
	AfterStartWorkflow   Point = "after-start-workflow"   // StartWorkflow (a detached Backup's): its BackupVM started, the local activity not yet completed
	AfterSnapshot        Point = "after-snapshot"         // CreateSnapshot: snapshot taken, activity not yet completed
	MidTransfer          Point = "mid-transfer"           // TransferDisk: about half of a disk's bytes copied
	BeforeCheck          Point = "before-check"           // TransferDisk: the image copied and closed, qemu-img check not yet run
	BeforeCommit         Point = "before-commit"          // CommitRestorePoint: every transfer done, nothing committed
	AfterCommit          Point = "after-commit"           // CommitRestorePoint: committed, activity not yet completed
	BeforeRemoveSnapshot Point = "before-remove-snapshot" // RemoveSnapshot: about to remove the snapshot
)

// The fault points of a prune, in the order it reaches them.
const (
	BeforeMerge       Point = "before-merge"        // MergeImage: nothing written yet
	AfterMerge        Point = "after-merge"         // MergeImage: the merged image written, synced and verified beside the kept one
	BeforePruneCommit Point = "before-prune-commit" // ApplyPrune: merges pending and renamed, catalog not yet changed
	AfterPruneCommit  Point = "after-prune-commit"  // ApplyPrune: catalog changed, removed points' files not yet deleted
)

// The fault points of a restore.
const (
	MidRestore   Point = "mid-restore"    // RestoreDisk: about half of the disk written, into its temporary file
	MidVMRestore Point = "mid-vm-restore" // WriteVMDisk: about half of the disk written into the VM's disk (at the latest, all of it, before the power state is read again)
)

// The fault points of a verification.
const (
	MidVerify Point = "mid-verify" // VerifyPoint: about half of the point's blocks re-read and compared with their digests
)

// All are every fault point, a backup's, a prune's, a restore's, then a
// verification's.
var All = []Point{AfterStartWorkflow, AfterSnapshot, MidTransfer, BeforeCheck, BeforeCommit, AfterCommit, BeforeRemoveSnapshot,
	BeforeMerge, AfterMerge, BeforePruneCommit, AfterPruneCommit, MidRestore, MidVMRestore, MidVerify}

// EnvDir names the worker's environment variable with the folder of its
// fault points. A worker built without the tag never reads it.
const EnvDir = "CBTFLOW_TEST_PAUSE_DIR"

// poll is how often both sides look at the folder: short against the
// seconds a fault test waits, long against a stat.
const poll = 20 * time.Millisecond

// gate is the file whose existence arms p in dir.
func gate(dir string, p Point) string { return filepath.Join(dir, p) }

// reached is the file an activity holding at p writes its pid into.
func reached(dir string, p Point) string { return gate(dir, p) + ".reached" }

// check refuses a point that is not one plain file name in a folder.
func check(dir string, p Point) error {
	if dir == "" || p == "" || strings.ContainsAny(p, `/\`) || strings.HasPrefix(p, ".") {
		return fmt.Errorf("faultpoint: point %q in %q", p, dir)
	}
	return nil
}

// Gates is the harness side: it drives the fault points of the workers
// whose EnvDir is Dir. Arm a point, Wait until an activity holds there,
// act, then Release it.
type Gates struct {
	Dir string
}

// Arm makes the next activity that reaches p hold there.
func (g Gates) Arm(p Point) error {
	if err := check(g.Dir, p); err != nil {
		return err
	}
	_ = os.Remove(reached(g.Dir, p))
	if err := os.WriteFile(gate(g.Dir, p), nil, 0o600); err != nil {
		return fmt.Errorf("faultpoint: arm %s: %w", p, err)
	}
	return nil
}

// Wait waits until an activity holds at p, and returns the pid of the
// process that holds it.
func (g Gates) Wait(ctx context.Context, p Point) (pid int, err error) {
	if err := check(g.Dir, p); err != nil {
		return 0, err
	}
	for {
		if b, err := os.ReadFile(reached(g.Dir, p)); err == nil {
			// A pid is written whole or not yet: a partial read fails
			// Atoi and is read again.
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				return pid, nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("faultpoint: %s not reached: %w", p, ctx.Err())
		case <-time.After(poll):
		}
	}
}

// Reached reports whether an activity reached p since it was armed.
func (g Gates) Reached(p Point) bool {
	_, err := os.Stat(reached(g.Dir, p))
	return err == nil
}

// Release lets the activity holding at p (if any) go on, and disarms p:
// later attempts pass it.
func (g Gates) Release(p Point) error {
	if err := check(g.Dir, p); err != nil {
		return err
	}
	if err := os.Remove(gate(g.Dir, p)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("faultpoint: release %s: %w", p, err)
	}
	_ = os.Remove(reached(g.Dir, p))
	return nil
}

// Tag is the build tag that compiles the fault points in. The test
// harness builds its worker with it; make build never sets it.
const Tag = "cbtflow_faultpoints"
