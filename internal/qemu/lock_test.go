package qemu

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestHoldOffWriters: with the image served writable by qemu-nbd, the
// hold is refused; while it is held, qemu-nbd cannot serve the image
// writable (qemu-img info, a reader, still opens it); released, it can.
func TestHoldOffWriters(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "x.qcow2")
	if err := Create(context.Background(), img, 64<<20); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	exp, err := StartQemuNBD(ctx, QemuNBDOptions{Image: img, Format: "qcow2", Dir: filepath.Join(dir, "nbd")})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if release, err := HoldOffWriters(f); !errors.Is(err, ErrImageWritten) {
		if release != nil {
			release()
		}
		t.Fatalf("with qemu-nbd serving the image writable: %v, want ErrImageWritten", err)
	}
	if err := exp.Close(); err != nil {
		t.Fatal(err)
	}

	release, err := HoldOffWriters(f)
	if err != nil {
		t.Fatalf("with no writer: %v", err)
	}
	_, err = StartQemuNBD(ctx, QemuNBDOptions{Image: img, Format: "qcow2", Dir: filepath.Join(dir, "nbd2"), Timeout: 10 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "lock") {
		t.Errorf("qemu-nbd serving the image writable while it is held: %v, want a lock error", err)
	}
	if out, err := exec.Command(QemuImg, "info", img).CombinedOutput(); err != nil {
		t.Errorf("qemu-img info while the image is held: %v: %s", err, out)
	}
	release()
	exp, err = StartQemuNBD(ctx, QemuNBDOptions{Image: img, Format: "qcow2", Dir: filepath.Join(dir, "nbd3")})
	if err != nil {
		t.Fatalf("qemu-nbd after the release: %v", err)
	}
	exp.Close()
}
