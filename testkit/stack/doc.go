// Package stack starts a whole cbtflow stack on one machine for tests, for
// the chaos tests that kill and restart its parts, and for make bench's
// end-to-end part (cmd/bench): the Temporal dev
// server (the real `temporal` CLI, on free ports, with its state in a db
// file so it can be restarted; in memory, in a folder of the stack's in
// /dev/shm, so that its fsyncs do not wait behind the backups' writeback;
// see Options.TemporalDBOnDisk), the lab vCenter (in-process), the vCenter
// profiles file, the repository folder, and the worker as a real separate
// process configured by environment variables, exactly as an operator runs
// it. The catalog database is given by the caller (see CreateDatabase);
// nothing here touches the dev stack's database, ports or state folder.
//
// Every child process is started with a parent-death signal from an OS
// thread that never exits, so it dies with the process that started it,
// and Close checks that no process of the stack (the worker's qemu-nbd and
// nbdkit included) outlives it. Close keeps the state folder, with
// Temporal's database copied into it, and removes the rest: the worker's
// TMPDIR and the stack's folder in /dev/shm (a stack killed by SIGKILL
// leaves them behind).
//
// It is test and demo support, not a deployment tool: production runs a
// Temporal cluster and workers under a service manager. Package stacktest
// wraps it for Go tests.
package stack
