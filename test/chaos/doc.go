// Package chaos is cbtflow's fault harness: it runs backups of the lab's
// VMs on whole stacks (package stack: the Temporal dev server, the lab
// vCenter with real CBT, a fresh PostgreSQL database, the worker as a real
// process) while it injects one fault at a time — the worker killed at
// each step boundary (the first: once a Backup started its BackupVM,
// before the Backup's workflow task completed, where the rerun must find
// that BackupVM and start no second), the Temporal server restarted, the database cut
// during the commit, read errors on the source disk, a full repository, a
// backup's snapshot moref made to name an administrator's snapshot, a
// restore into a VM whose worker is killed half way (group restore-vm) —
// and checks after every scenario what cbtflow promises: every backup ends
// within a bounded time; every committed change ID is the one the lab
// stamped on that backup's snapshot and no completed backup lacks its
// restore point; every restore point restores byte for byte as the disk
// was at backup time; every image the catalog names has the recorded size
// and SHA-256; no cbtflow snapshot and no qemu-nbd or nbdkit is left; the
// next backup after a failure succeeds.
//
// `go test ./test/chaos` (part of make test) runs a reduced form: one
// worker kill and two other faults. `make chaos` runs every scenario
// (flag -full) and prints a table of the results; -group REGEXP (with
// -full) runs only the groups of scenarios whose name matches.
//
// The non-test files hold the harness's tools that are not about cbtflow:
// a TCP proxy that can cut the database away, a size-limited tmpfs, the
// results table.
package chaos
