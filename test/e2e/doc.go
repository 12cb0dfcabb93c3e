// Package e2e holds cbtflow's end-to-end acceptance test: on a stack of its
// own (package stack: the real Temporal dev server, a worker process, the
// lab vCenter, a fresh PostgreSQL database), it drives backups and restores
// through the real starter CLI and compares restored disks byte for byte
// with the guest data at each backup. It has no code outside its tests.
//
// The workflow histories that workflows/replay_test.go replays are
// recorded by test/histories, not here.
package e2e
