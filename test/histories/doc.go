// Package histories records the workflow histories that
// workflows/replay_test.go replays, on a whole stack (package stack: the
// Temporal dev server, the lab vCenter, a worker process built with the
// fault points, a fresh database): a full, an incremental and a CBT-reset
// BackupVM, the Backup that started the incremental, a Backup that waited
// for its BackupVM, one that found the VM's backup running
// (skip_if_running), a BackupVM that failed, one canceled in the middle
// of a transfer, a Sweep that cleaned up after a terminated backup, a
// Prune with its PruneVM, a Restore of a disk, a Verify of a point's two
// disks, and a Verify of an unknown point that failed.
//
// Every run (make test) drives the scenarios, checks each one's outcome,
// checks that no history holds the lab's password, and replays each
// history just produced on the current workflows. With -update,
//
//	go test -tags cbtflow_faultpoints ./test/histories -update
//
// it also saves a history into workflows/testdata as <case>_v<N+1>.json
// when its commands differ from every recorded version of its case (see
// commandsOf); it never overwrites or deletes a file. The package has only
// tests.
package histories
