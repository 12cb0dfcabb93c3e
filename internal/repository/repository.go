// Package repository decides where restore points live on disk. A restore
// point of one disk is a QCOW2 file at
//
//	<root>/<vcenter profile>/<vm instance uuid>/<disk key>/<backup id>.qcow2
//
// Incremental restore points are overlays whose backing file is the
// previous restore point of the same disk, named relatively (see
// internal/qemu), so a whole repository can be moved or mounted elsewhere.
// Every path component is validated: names come from operators and
// vCenters, and none may climb out of the root. VM names never appear in
// paths; the instance UUID does.
//
// The package only computes and checks paths and creates folders; it does
// not write images.
package repository

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Repository is a folder of restore points.
type Repository struct {
	root string
}

// Open returns the repository rooted at root, which must be an absolute
// path to a writable folder (created when missing).
func Open(root string) (*Repository, error) {
	if root == "" {
		return nil, errors.New("repository: no root folder given")
	}
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("repository: root %q is not an absolute path", root)
	}
	root = filepath.Clean(root)
	if err := os.MkdirAll(root, 0o750); err != nil {
		return nil, fmt.Errorf("repository: %w", err)
	}
	return &Repository{root: root}, nil
}

// Root is the repository's absolute root folder.
func (r *Repository) Root() string { return r.root }

// isComponent reports whether s is 1 to 128 letters, digits, dots,
// dashes and underscores, starting with a letter or digit (by hand: the
// regular expression of it took 3 ms of every process's start to compile).
func isComponent(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '.' && c != '_' && c != '-') {
			return false
		}
	}
	return true
}

// CheckComponent reports whether s may be one folder or file name of the
// repository: letters, digits, dot, dash and underscore, starting with a
// letter or digit, at most 128 bytes. what names s in the error.
func CheckComponent(what, s string) error {
	if !isComponent(s) || strings.Contains(s, "..") {
		return fmt.Errorf("repository: %s %q is not a safe name (letters, digits, '.', '-', '_'; no '..')", what, s)
	}
	return nil
}

// Key names one restore point of one disk.
type Key struct {
	Profile  string // vCenter profile
	VMUUID   string // VM instance UUID
	DiskKey  int32  // device key of the disk
	BackupID string
}

func (k Key) check() error {
	if err := CheckComponent("vCenter profile", k.Profile); err != nil {
		return err
	}
	if err := CheckComponent("VM instance UUID", k.VMUUID); err != nil {
		return err
	}
	if k.DiskKey < 0 {
		return fmt.Errorf("repository: disk key %d is negative", k.DiskKey)
	}
	return CheckComponent("backup ID", k.BackupID)
}

// DiskDir is the folder of all restore points of one disk.
func (r *Repository) DiskDir(k Key) (string, error) {
	if err := k.check(); err != nil {
		return "", err
	}
	return filepath.Join(r.root, k.Profile, k.VMUUID, strconv.Itoa(int(k.DiskKey))), nil
}

// ImagePath is the absolute path of the restore point's QCOW2.
func (r *Repository) ImagePath(k Key) (string, error) {
	dir, err := r.DiskDir(k)
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, k.BackupID+".qcow2"), nil
}

// PrepareImage creates the disk's folder and returns the image path.
func (r *Repository) PrepareImage(k Key) (string, error) {
	p, err := r.ImagePath(k)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
		return "", fmt.Errorf("repository: %w", err)
	}
	return p, nil
}

// StagingDir is a folder for one backup's working files (extent lists,
// NBD sockets); it is removed when the backup ends.
func (r *Repository) StagingDir(backupID string) (string, error) {
	if err := CheckComponent("backup ID", backupID); err != nil {
		return "", err
	}
	return filepath.Join(r.root, ".staging", backupID), nil
}

// Contains reports whether path lies inside the repository.
func (r *Repository) Contains(path string) bool {
	rel, err := filepath.Rel(r.root, filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel)
}

// Rel is the path of a file inside the repository relative to its root,
// as the catalog records it: a moved or remounted repository keeps
// working.
func (r *Repository) Rel(path string) (string, error) {
	if !r.Contains(path) {
		return "", fmt.Errorf("repository: %s is outside the repository %s", path, r.root)
	}
	return filepath.Rel(r.root, filepath.Clean(path))
}

// Resolve turns a path the catalog recorded into an absolute one: a
// relative path is taken from the root; an absolute one (catalogs from
// before relative paths) is kept as it is.
func (r *Repository) Resolve(path string) string { return ResolveUnder(r.root, path) }

// ResolveUnder is Resolve for a repository root that need not be opened
// (the CLI reading the catalog).
func ResolveUnder(root, path string) string {
	if filepath.IsAbs(path) {
		return filepath.Clean(path)
	}
	return filepath.Join(root, path)
}
