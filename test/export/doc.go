// Package export tests instant access on a whole stack: `starter export
// BACKUP_ID --disk KEY` serves a restore point of a three-image chain
// (full + 2 incrementals) read-only over NBD, and nbdcopy and qemu-img
// convert read from its URI the disk as it was at backup time, byte for
// byte; `starter status` lists the export with its URI; a second export
// of the disk is refused naming the first; Ctrl-C of the starter stops
// it (qemu-nbd gone, the catalog's lease gone, the workflow canceled); a
// worker killed while it serves takes its qemu-nbd with it, and the
// export comes back on the retry at the same URI, with its lease; a
// prune with keep-last 1 while the oldest point is exported keeps that
// point (rule "exported") and prunes the rest, and after `starter export
// stop` the next prune removes it; an export that starts after a prune
// planned (held at BeforeMerge) to rewrite its chain makes the prune skip
// the VM, naming the export, with nothing changed; an export on a
// --listen port that is taken is named by the starter while its attempts
// are retried, and Ctrl-C then stops it before it served (exit 1).
package export
