package activities

import (
	"context"
	"errors"
	"fmt"

	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/cbtflow/cbtflow/internal/catalog"
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
	r, err := verify.Chain(ctx, chain, verify.Options{Progress: func(phase string, done, total int64) {
		activity.RecordHeartbeat(ctx, phase, done, total)
	}})
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
	log := activity.GetLogger(ctx)
	if res.OK {
		log.Info("restore point verified", "backup", in.BackupID, "disk", in.Key, "checked_bytes", res.CheckedBytes)
	} else {
		log.Warn("restore point verification failed", "backup", in.BackupID, "disk", in.Key, "problem", r.First().String())
	}
	return res, nil
}
