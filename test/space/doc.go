// Package space is the whole-stack test of the repository space check:
// a backup into a repository too small for it (a small tmpfs) fails
// before its snapshot, or, for an incremental whose estimate fit, right
// after its CBT query, with RepositoryFull naming the repository, the
// space needed and the space free; no snapshot and no file are left, and
// a backup that fits completes.
package space
