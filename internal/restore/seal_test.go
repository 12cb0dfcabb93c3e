package restore

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cbtflow/cbtflow/internal/catalog"
	"github.com/cbtflow/cbtflow/internal/digest"
	"github.com/cbtflow/cbtflow/internal/integrity"
	"github.com/cbtflow/cbtflow/internal/qemu"
	"github.com/cbtflow/cbtflow/testkit/testutil"
)

// TestSettledViewTransientError: while a prune's merge of a point is
// pending, a check of the old (sealed) image that fails for a reason that
// says nothing about the image (qemu-img killed) is that error, retried:
// not "damaged" because the file is not the merged image either.
func TestSettledViewTransientError(t *testing.T) {
	testutil.CheckNoChildren(t)
	ctx := context.Background()
	cat, err := catalog.Open(ctx, testutil.Database(t))
	if err != nil {
		t.Fatal(err)
	}
	defer cat.Close()
	dir := t.TempDir()
	full := filepath.Join(dir, "b1.qcow2")
	if err := qemu.Create(ctx, full, 16*mib); err != nil {
		t.Fatal(err)
	}
	writeVia(t, full, 0xaa, 0, 1*mib)
	w, err := digest.Create(digest.PathOf(full), digest.Header{Image: "b1.qcow2", Capacity: 16 * mib})
	if err != nil {
		t.Fatal(err)
	}
	w.Add(digest.Data(w.Algorithm(), 0, bytes.Repeat([]byte{0xaa}, mib)))
	dsize, dsum, err := w.Finish()
	if err != nil {
		t.Fatal(err)
	}
	size, seal, err := integrity.Seal(ctx, full, nil)
	if err != nil || !integrity.IsSeal(seal) {
		t.Fatalf("seal: %q %v", seal, err)
	}
	if err := cat.Begin(ctx, catalog.Backup{ID: "b1", Profile: "lab", VMUUID: "u", VMName: "vm", Mode: "auto"}); err != nil {
		t.Fatal(err)
	}
	if err := cat.Commit(ctx, "b1", []catalog.Disk{{Key: 204, Capacity: 16 * mib, Mode: catalog.ModeFull, Path: full,
		ChangeID: "x/b1", SizeBytes: size, SHA256: seal, DigestSHA256: dsum, DigestSize: dsize}}); err != nil {
		t.Fatal(err)
	}
	// A prune is about to rename its merged image over b1's.
	if err := cat.BeginMerges(ctx, "p1", []catalog.MergedImage{{BackupID: "b1", Key: 204, SizeBytes: size + 65536,
		SHA256: strings.Repeat("c", 64), TempPath: filepath.Join(dir, ".b1.qcow2.p1.merging")}}); err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyChain(ctx, cat, Options{BackupID: "b1", DiskKey: 204}); err != nil {
		t.Fatalf("the old image, sound: %v", err)
	}

	killed := filepath.Join(t.TempDir(), "qemu-img")
	if err := os.WriteFile(killed, []byte("#!/bin/sh\nkill -KILL $$\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	defer func(p string) { qemu.QemuImg = p }(qemu.QemuImg)
	qemu.QemuImg = killed
	_, err = VerifyChain(ctx, cat, Options{BackupID: "b1", DiskKey: 204})
	if err == nil || errors.Is(err, ErrDamaged) {
		t.Fatalf("qemu-img killed while the old image was checked: %v, want a plain error", err)
	}
}
