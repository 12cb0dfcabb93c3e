// Package e2e holds cbtflow's end-to-end acceptance test: on a stack of its
// own (package stack: the real Temporal dev server, a worker process, the
// lab vCenter, a fresh PostgreSQL database), it drives backups and restores
// through the real starter CLI and compares restored disks byte for byte
// with the guest data at each backup. It has no code outside its tests.
//
// `go test ./test/e2e -run TestEndToEnd -update` also rewrites the
// recorded workflow histories in workflows/testdata that
// workflows/replay_test.go replays, except backup.json: a Backup recorded
// before the per-VM workflow ID named the vCenter, kept as it is.
package e2e
