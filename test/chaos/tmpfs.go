package chaos

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ownerFile, next to a tmpfs mount point, holds the pid of the harness
// that mounted it, so that a later run can unmount what a killed run left.
const ownerFile = "chaos-tmpfs.pid"

// MountTmpfs mounts a tmpfs of size bytes at dir (created when missing):
// a small file system that fills up, for the repository-full scenario.
// It needs root. The caller unmounts it with Unmount.
func MountTmpfs(dir string, size int64) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("chaos: tmpfs: %w", err)
	}
	owner := filepath.Join(filepath.Dir(dir), ownerFile)
	if err := os.WriteFile(owner, []byte(strconv.Itoa(os.Getpid())+"\n"+dir+"\n"), 0o600); err != nil {
		return fmt.Errorf("chaos: tmpfs: %w", err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		return fmt.Errorf("chaos: mount a %d-byte tmpfs at %s (the repository-full scenario needs root): %w", size, dir, err)
	}
	return nil
}

// Unmount unmounts the tmpfs at dir (lazily when busy) and removes its
// owner file.
func Unmount(dir string) error {
	err := unix.Unmount(dir, 0)
	if errors.Is(err, syscall.EBUSY) {
		err = unix.Unmount(dir, unix.MNT_DETACH)
	}
	if errors.Is(err, syscall.EINVAL) { // not mounted
		err = nil
	}
	_ = os.Remove(filepath.Join(filepath.Dir(dir), ownerFile))
	if err != nil {
		return fmt.Errorf("chaos: unmount %s: %w", dir, err)
	}
	return nil
}

// UnmountStale unmounts the tmpfs mounts below root that a harness which
// is no longer running left behind (killed before its cleanup), and
// returns their mount points.
func UnmountStale(root string) ([]string, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var stale []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 || fields[2] != "tmpfs" || !strings.HasPrefix(fields[1], root+string(filepath.Separator)) {
			continue
		}
		mnt := fields[1]
		b, err := os.ReadFile(filepath.Join(filepath.Dir(mnt), ownerFile))
		if err != nil {
			continue // not one of ours
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		pid, _ := strconv.Atoi(lines[0])
		if len(lines) < 2 || lines[1] != mnt || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); err == nil || errors.Is(err, syscall.EPERM) {
			continue // its harness still runs
		}
		if err := Unmount(mnt); err != nil {
			return stale, err
		}
		stale = append(stale, mnt)
	}
	return stale, sc.Err()
}
