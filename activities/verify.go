package activities

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/faultpoint"
	"github.com/cbtflow/cbtflow/internal/verify"
)

// VerifyPointInput names one disk of a restore point to verify.
type VerifyPointInput struct {
	BackupID string `json:"backup_id"`
	Key      int32  `json:"key"`
}

// VerifyProblem is one thing a verification found wrong.
type VerifyProblem struct {
	// BackupID is the restore point whose image is at fault; Image that
	// image's path and File the file found wrong (the image, or its
	// digest file), both relative to the repository.
	BackupID string `json:"backup_id"`
	Image    string `json:"image"`
	File     string `json:"file"`
	// Offset and Length are the disk range of a bad block; Offset is -1
	// for a problem of the whole file.
	Offset int64  `json:"offset"`
	Length int64  `json:"length,omitempty"`
	Reason string `json:"reason"`
}

// VerifyPointResult is what VerifyPoint found: OK, or the problems, the
// first of which names the first bad image and offset.
type VerifyPointResult struct {
	BackupID string          `json:"backup_id"`
	Key      int32           `json:"key"`
	OK       bool            `json:"ok"`
	Problems []VerifyProblem `json:"problems,omitempty"`
	// BlocksRead says the point's blocks were re-read and compared with
	// their digests (not when a file's problem made it pointless).
	BlocksRead     bool  `json:"blocks_read"`
	CheckedRecords int64 `json:"checked_records"`
	CheckedBytes   int64 `json:"checked_bytes"`
	SkippedRecords int64 `json:"skipped_records,omitempty"`
	SkippedBytes   int64 `json:"skipped_bytes,omitempty"`
	// Undigested are the backup IDs of chain images without a digest file
	// (made before digests existed): checked as files only.
	Undigested []string `json:"undigested,omitempty"`
}

// VerifyPoint checks one disk of a restore point (internal/verify): every
// image of its chain against the catalog (qemu-img check, size, SHA-256,
// backing link, digest file), then the point's blocks re-read through the
// chain against the digests recorded at backup time. A damaged point is a
// result, not an error; it reads only, so it may run any number of times.
func (a *Catalog) VerifyPoint(ctx context.Context, in VerifyPointInput) (*VerifyPointResult, error) {
	res := &VerifyPointResult{BackupID: in.BackupID, Key: in.Key}
	links, err := a.Catalog.Chain(ctx, in.BackupID, in.Key)
	var broken *catalog.BrokenChainError
	switch {
	case errors.Is(err, catalog.ErrNotFound):
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("restore point %s disk %d: %v", in.BackupID, in.Key, err),
			ErrTypeInvalidInput, err)
	case errors.As(err, &broken):
		res.Problems = []VerifyProblem{{BackupID: in.BackupID, Offset: -1, Reason: broken.Reason}}
		if err := a.record(ctx, res); err != nil {
			return nil, err
		}
		return res, nil
	case err != nil:
		return nil, permanent(err)
	}
	// The chain as the catalog recorded it, oldest first.
	chain := make([]verify.Image, len(links))
	owner := map[string]string{} // absolute image path → backup ID
	for i, link := range links {
		if link.Pending != nil {
			// A prune's merge is not settled: which file is there is for
			// the prune (or the next backup) to settle; try again later.
			return nil, fmt.Errorf("restore point %s disk %d: a prune's merge is pending; verify after it settles", link.BackupID, in.Key)
		}
		path := a.Repo.Resolve(link.Path)
		im := verify.Image{Path: path, Size: link.SizeBytes, SHA256: link.SHA256,
			DigestSHA256: link.DigestSHA256, DigestSize: link.DigestSize, DigestPartial: link.DigestPartial}
		if i+1 < len(links) {
			im.Backing = a.Repo.Resolve(links[i+1].Path)
		}
		chain[len(links)-1-i] = im
		owner[path] = link.BackupID
	}
	r, err := a.checkPointChain(ctx, chain)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	rel := func(p string) string {
		if r, err := a.Repo.Rel(p); err == nil {
			return r
		}
		return p
	}
	res.OK, res.BlocksRead = r.OK(), r.BlocksRead
	res.CheckedRecords, res.CheckedBytes, res.SkippedRecords, res.SkippedBytes = r.CheckedRecords, r.CheckedBytes, r.SkippedRecords, r.SkippedBytes
	for _, p := range r.Problems {
		res.Problems = append(res.Problems, VerifyProblem{BackupID: owner[p.Image], Image: rel(p.Image), File: rel(p.File),
			Offset: p.Offset, Length: p.Length, Reason: p.Reason})
	}
	for _, u := range r.Undigested {
		res.Undigested = append(res.Undigested, owner[u])
	}
	if err := a.record(ctx, res); err != nil {
		return nil, err
	}
	log := activity.GetLogger(ctx)
	if res.OK {
		log.Info("restore point verified", "backup", in.BackupID, "disk", in.Key, "checked_bytes", res.CheckedBytes)
	} else {
		log.Warn("restore point verification failed", "backup", in.BackupID, "disk", in.Key, "problem", r.First().String())
	}
	return res, nil
}

// VerifyProgress is VerifyPoint's heartbeat detail: the stage and its
// bytes, which the worker adds to the Verify's progress query.
type VerifyProgress struct {
	// Stage is VerifyStageChecking while the chain's images are checked
	// (qemu-img check, SHA-256: Total is the image being hashed), then
	// VerifyStageReading while the blocks are re-read (Done of Total bytes).
	Stage string  `json:"stage"`
	Done  int64   `json:"done"`
	Total int64   `json:"total"`
	Rate  float64 `json:"rate,omitempty"` // bytes per second, recently
}

// The stages of a VerifyPoint, in its heartbeat details.
const (
	VerifyStageChecking = "checking"
	VerifyStageReading  = "reading"
)

// verifyBeat is how often VerifyPoint heartbeats whatever it is doing
// (qemu-img check of a big image, a hold at a fault point): a dead worker
// is noticed within the heartbeat timeout, and a cancel reaches it.
const verifyBeat = time.Second

// checkPointChain runs verify.Chain, heartbeating its progress every second
// and, in a fault test, holding at MidVerify half way through the blocks.
func (a *Catalog) checkPointChain(ctx context.Context, chain []verify.Image) (*verify.Result, error) {
	var mu sync.Mutex
	latest := VerifyProgress{Stage: VerifyStageChecking}
	beat := func() {
		mu.Lock()
		p := latest
		mu.Unlock()
		activity.RecordHeartbeat(ctx, p)
	}
	defer heartbeatEvery(ctx, verifyBeat, func() any {
		mu.Lock()
		defer mu.Unlock()
		return latest
	})()
	beat()
	o := verify.Options{}
	if faultpoint.Active(ctx) {
		// Fault tests hold a verification at about half its blocks: a
		// small point is read in a moment, so report often enough to be
		// seen there.
		o.ProgressEvery = 10 * time.Millisecond
	}
	meter, halfway := newRateMeter(), false
	o.Progress = func(phase string, done, total int64) {
		p := VerifyProgress{Stage: VerifyStageChecking, Done: done, Total: total}
		if phase == "reading" {
			p.Stage, p.Rate = VerifyStageReading, meter.observe(time.Now(), done)
		}
		mu.Lock()
		latest = p
		mu.Unlock()
		if faultpoint.Enabled && !halfway && p.Stage == VerifyStageReading && total > 0 && done*2 >= total && done < total {
			halfway = true
			beat()
			faultpoint.Hold(ctx, faultpoint.MidVerify)
		}
	}
	return verify.Chain(ctx, chain, o)
}

// PlanVerifyInput says which restore points a Verify checks: one by its
// BackupID, the newest committed one of VM (a name or instance UUID,
// under Profile when set), or with All the newest of every VM.
type PlanVerifyInput struct {
	BackupID string `json:"backup_id,omitempty"`
	VM       string `json:"vm,omitempty"`
	Profile  string `json:"profile,omitempty"`
	All      bool   `json:"all,omitempty"`
}

// VerifyTarget is one restore point to verify, with its disks.
type VerifyTarget struct {
	BackupID string  `json:"backup_id"`
	VM       string  `json:"vm"`
	VMUUID   string  `json:"vm_uuid"`
	Profile  string  `json:"profile"`
	Keys     []int32 `json:"keys"`
}

// PlanVerifyResult lists the points to verify, in the catalog's order.
type PlanVerifyResult struct {
	Targets []VerifyTarget `json:"targets"`
}

// PlanVerify finds the restore points a verification checks. A point
// that is not committed, or a VM without one, is an input error.
func (a *Catalog) PlanVerify(ctx context.Context, in PlanVerifyInput) (*PlanVerifyResult, error) {
	n := 0
	for _, set := range []bool{in.BackupID != "", in.VM != "", in.All} {
		if set {
			n++
		}
	}
	if n != 1 {
		return nil, temporal.NewNonRetryableApplicationError("verify: give exactly one of a backup ID, a VM or all", ErrTypeInvalidInput, nil)
	}
	target := func(b catalog.Backup) VerifyTarget {
		t := VerifyTarget{BackupID: b.ID, VM: b.VMName, VMUUID: b.VMUUID, Profile: b.Profile, Keys: []int32{}}
		for _, d := range b.Disks {
			t.Keys = append(t.Keys, d.Key)
		}
		return t
	}
	res := &PlanVerifyResult{Targets: []VerifyTarget{}}
	if in.BackupID != "" {
		b, err := a.Catalog.Get(ctx, in.BackupID)
		switch {
		case errors.Is(err, catalog.ErrNotFound):
			return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("verify: no restore point %s", in.BackupID), ErrTypeInvalidInput, err)
		case err != nil:
			return nil, permanent(err)
		case b.Status != catalog.StatusCommitted:
			return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("verify: backup %s is %s, not a restore point", in.BackupID, b.Status), ErrTypeInvalidInput, nil)
		}
		res.Targets = append(res.Targets, target(*b))
		return res, nil
	}
	points, err := a.Catalog.List(ctx, catalog.ListFilter{VM: in.VM, Profile: in.Profile, Status: catalog.StatusCommitted})
	if err != nil {
		return nil, permanent(err)
	}
	seen := map[string]bool{}
	for _, b := range points { // newest first: the first of each VM
		vm := b.Profile + "/" + b.VMUUID
		if !seen[vm] {
			seen[vm] = true
			res.Targets = append(res.Targets, target(b))
		}
	}
	if in.VM != "" && len(res.Targets) == 0 {
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("verify: VM %s has no restore point", in.VM), ErrTypeInvalidInput, nil)
	}
	if in.VM != "" && len(res.Targets) > 1 {
		return nil, temporal.NewNonRetryableApplicationError(fmt.Sprintf("verify: %q names %d VMs (profiles or names shared): give its instance UUID or --profile", in.VM, len(res.Targets)), ErrTypeInvalidInput, nil)
	}
	return res, nil
}

// record keeps the outcome of a disk's verification in the catalog
// (starter list, the metrics), its first problem in words.
func (a *Catalog) record(ctx context.Context, res *VerifyPointResult) error {
	problem := ""
	if len(res.Problems) > 0 {
		p := res.Problems[0]
		problem = p.File
		if problem == "" {
			problem = p.Image
		}
		if p.Offset >= 0 {
			problem += fmt.Sprintf(" at offset %d", p.Offset)
		}
		if problem != "" {
			problem += ": "
		}
		problem += p.Reason
	}
	if err := a.Catalog.RecordVerification(ctx, res.BackupID, res.Key, res.OK, problem); err != nil {
		return permanent(err)
	}
	return nil
}
