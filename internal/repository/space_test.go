package repository

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestSpaceOf(t *testing.T) {
	dir := t.TempDir()
	sp, err := SpaceOf(dir)
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if size := int64(st.Blocks) * int64(st.Bsize); sp.Size != size || sp.Free <= 0 || sp.Free > sp.Size {
		t.Errorf("space of %s: %+v, want size %d and 0 < free <= size", dir, sp, size)
	}
	// A missing folder is an error, and SpaceOf does not create it.
	missing := filepath.Join(dir, "missing")
	if _, err := SpaceOf(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("space of a missing folder: %v, want ErrNotExist", err)
	}
	if _, err := os.Stat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("SpaceOf created %s", missing)
	}
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := SpaceOf(file); err == nil {
		t.Errorf("space of a file: no error")
	}
}
