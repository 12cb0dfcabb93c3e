package stack

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// TemporalDBTmpfs is where a stack puts its Temporal dev server's
// database, unless Options.TemporalDBOnDisk: a folder of its own in it,
// removed by Close.
const TemporalDBTmpfs = "/dev/shm"

// temporalDBTmpfs is TemporalDBTmpfs, another folder in tests.
var temporalDBTmpfs = TemporalDBTmpfs

// temporalDBName is the file the stack names the dev server's database
// by, in the state folder (--db-filename): the database itself, or a
// symbolic link to it in the stack's folder in TemporalDBTmpfs.
const temporalDBName = "temporal.db"

// sqliteSuffixes are the database file's and its SQLite companions'
// (a rollback journal, hot after a kill; WAL files) suffixes.
var sqliteSuffixes = []string{"", "-journal", "-wal", "-shm"}

// setupTemporalDB decides where the Temporal dev server's database lives:
// in a fresh folder in TemporalDBTmpfs (s.temporalDBDir) with a symbolic
// link to it where the stack names the file (STATE/temporal.db), which
// SQLite follows, its journal too; or in the state folder itself when
// the options say so or TemporalDBTmpfs is missing or not writable (a
// line in stack.log says so). A database the state folder holds already
// (a stack before this one there) is moved along.
//
// The dev server commits every workflow task to that file with fsync
// (SQLite's default journal): on the disk the backups write to, each such
// fsync waits behind their writeback, for seconds under load, until
// namespace lookups and workflow tasks time out — a cost of putting
// Temporal's store beside the repository, which no production deployment
// does (Temporal keeps its own database).
func (s *Stack) setupTemporalDB() error {
	if !s.opts.TemporalDBOnDisk {
		dir, err := os.MkdirTemp(temporalDBTmpfs, "cbtstack-temporal-")
		if err == nil {
			// Every way out of Start from here goes through Close,
			// which removes it.
			s.temporalDBDir = dir
		} else {
			s.log.Warn("the Temporal dev server's database stays on disk in the state folder: no folder in "+temporalDBTmpfs, "error", err)
		}
	}
	to := s.dir
	if s.temporalDBDir != "" {
		to = s.temporalDBDir
	}
	if err := moveTemporalDB(s.dir, to); err != nil {
		return fmt.Errorf("stack: the Temporal dev server's database: %w", err)
	}
	s.log.Info("temporal database", "path", s.TemporalDB())
	return nil
}

// closeTemporalDB, once the dev server is stopped, copies its database
// from TemporalDBTmpfs into the state folder (where a post-mortem or a
// later stack in that folder finds it, as when it is on disk) and removes
// the stack's folder in TemporalDBTmpfs, also when the copy fails.
func (s *Stack) closeTemporalDB() error {
	if s.temporalDBDir == "" {
		return nil
	}
	err := moveTemporalDB(s.dir, s.dir)
	if err != nil {
		err = fmt.Errorf("stack: keep the Temporal dev server's database in the state folder: %w", err)
	}
	if rerr := os.RemoveAll(s.temporalDBDir); rerr != nil {
		err = errors.Join(err, rerr)
	}
	return err
}

// TemporalDB is the path of the Temporal dev server's database file
// while the stack runs: in the stack's folder in TemporalDBTmpfs, or in
// the state folder (Options.TemporalDBOnDisk, or no TemporalDBTmpfs).
// Either way STATE/temporal.db names it, and after Close it is there.
func (s *Stack) TemporalDB() string {
	if s.temporalDBDir != "" {
		return filepath.Join(s.temporalDBDir, temporalDBName)
	}
	return filepath.Join(s.dir, temporalDBName)
}

// moveTemporalDB makes the database that STATE/temporal.db names (a file,
// a symbolic link to one, or nothing yet) a file in toDir, with its
// SQLite companions, and STATE/temporal.db the file itself (toDir is
// stateDir) or a symbolic link to it. A link to a folder that is gone (a
// stack killed before its Close) is dropped: the server starts afresh.
// The server must not run.
func moveTemporalDB(stateDir, toDir string) error {
	name := filepath.Join(stateDir, temporalDBName)
	to := filepath.Join(toDir, temporalDBName)
	fi, err := os.Lstat(name)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	inState := err == nil && fi.Mode().IsRegular()
	from, err := filepath.EvalSymlinks(name)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		from = ""
	case err != nil:
		return err
	default:
		if same, err := sameFile(from, to); err != nil || same {
			return err
		}
		for _, suf := range sqliteSuffixes {
			err := copyFile(from+suf, to+suf)
			if suf != "" && errors.Is(err, fs.ErrNotExist) {
				// None beside the source: none beside the copy
				// either (a journal is the database's only with
				// its database).
				err = os.Remove(to + suf)
				if errors.Is(err, fs.ErrNotExist) {
					err = nil
				}
			}
			if err != nil {
				return err
			}
		}
	}
	if toDir == stateDir {
		if from == "" {
			// A link to nothing, or nothing.
			if err := os.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
		// Otherwise the copy replaced the link.
		return nil
	}
	if inState {
		// The database was a file in the state folder: its copy is
		// the database now.
		for _, suf := range sqliteSuffixes[1:] {
			if err := os.Remove(name + suf); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	if err := os.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return os.Symlink(to, name)
}

// sameFile reports whether the file a (an error when it does not exist)
// is b itself, not through a symbolic link; false when b does not exist.
func sameFile(a, b string) (bool, error) {
	fa, err := os.Stat(a)
	if err != nil {
		return false, err
	}
	fb, err := os.Lstat(b)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return os.SameFile(fa, fb), nil
}

// copyFile copies the file from to to through a temporary file beside to,
// renamed over it: a symbolic link at to is replaced, not written
// through.
func copyFile(from, to string) (err error) {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.CreateTemp(filepath.Dir(to), filepath.Base(to)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			out.Close()
			os.Remove(out.Name())
		}
	}()
	if _, err := io.Copy(out, in); err != nil {
		return err
	}
	if err := out.Chmod(0o600); err != nil {
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(out.Name(), to)
}
