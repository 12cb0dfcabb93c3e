package catalog

import (
	"context"
	"strings"
	"testing"
)

// A disk's digest file is recorded with its image; a disk committed
// without one (an image made before digests) reads back without one.
func TestDigestColumns(t *testing.T) {
	c, _ := open(t)
	ctx := context.Background()
	for _, id := range []string{"b1", "b2"} {
		if err := c.Begin(ctx, Backup{ID: id, Profile: "lab", VMUUID: "u", VMName: "vm", Mode: "auto"}); err != nil {
			t.Fatal(err)
		}
	}
	old := disk(204, ModeFull, "c1", "")
	if err := c.Commit(ctx, "b1", []Disk{old}); err != nil {
		t.Fatal(err)
	}
	d := disk(204, ModeIncremental, "c2", "b1")
	d.DigestSHA256, d.DigestSize = strings.Repeat("d", 64), 1234
	half := d
	half.DigestSize = 0
	if err := c.Commit(ctx, "b2", []Disk{half}); err == nil {
		t.Fatal("a digest SHA-256 without its size was committed")
	}
	if err := c.Commit(ctx, "b2", []Disk{d}); err != nil {
		t.Fatal(err)
	}
	chain, err := c.Chain(ctx, "b2", 204)
	if err != nil {
		t.Fatal(err)
	}
	if got := chain[0]; got.DigestSHA256 != d.DigestSHA256 || got.DigestSize != 1234 || got.DigestPartial {
		t.Errorf("b2: digest %q %d partial %v", got.DigestSHA256, got.DigestSize, got.DigestPartial)
	}
	if got := chain[1]; got.DigestSHA256 != "" || got.DigestSize != 0 {
		t.Errorf("b1, committed without a digest file: %q %d", got.DigestSHA256, got.DigestSize)
	}
	var nulls int
	if err := c.pool.QueryRow(ctx, `SELECT count(*) FROM backup_disks WHERE digest_sha256 IS NULL AND digest_size IS NULL`).Scan(&nulls); err != nil {
		t.Fatal(err)
	}
	if nulls != 1 {
		t.Errorf("%d rows without a digest file are NULL; want 1", nulls)
	}
}
