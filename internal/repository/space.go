package repository

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Space is the room on the filesystem that holds a folder.
type Space struct {
	// Free is what an unprivileged writer (the worker) may still write;
	// Size the filesystem's size. Both in bytes.
	Free, Size int64
}

// SpaceOf returns the space of the filesystem holding the folder dir
// (statfs). It neither creates dir nor opens the repository: the CLI asks
// about a folder that may not be reachable from where it runs.
func SpaceOf(dir string) (Space, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return Space{}, err
	}
	if !fi.IsDir() {
		return Space{}, fmt.Errorf("%s is not a folder", dir)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return Space{}, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return Space{Free: int64(st.Bavail) * int64(st.Bsize), Size: int64(st.Blocks) * int64(st.Bsize)}, nil
}
