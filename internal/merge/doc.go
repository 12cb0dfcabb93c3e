// Package merge builds, for a prune, the image that replaces a kept
// restore point whose backing images are being removed: one QCOW2 at
// Job.Temp, in Top's folder, whose view over Base (or alone, when Base is
// "") is byte for byte Top's view over its current chain. The caller
// renames Temp over Top (or records it under a new name) and removes the
// images; the catalog side and the workflow are not here.
//
// # Crash safety
//
// No existing file is modified: Top, the removed images and Base are
// opened read-only (a file copy, qemu-img map, measure, convert's source,
// rebase's old and new backing files, compare), and everything is written
// to Temp. Run removes a Temp left by a killed run before it starts (never
// a file that is a restore point: one that builds on Top, or that an image
// in the folder builds on, is refused by name), removes Temp again on any
// failure or cancellation, and returns only when Temp is durable (qemu-img
// runs with cache=writeback, which flushes at close; then Temp and its
// folder are fsynced) and verified: qemu-img compare of Temp's view with
// Top's, the backing name in Temp's header, and qemu-img check. qemu-img
// runs as a child killed with the context (SIGKILL) and with the worker
// (Pdeathsig, forked from a thread that never exits).
//
// # Methods
//
// Estimate measures each applicable method in bytes written or copied
// into Temp, data and QCOW2 metadata; Run applies the one in the Plan.
//
//   - rebase: copy Top's file to Temp (a clone when the filesystem has
//     reflinks, else only its data segments, SEEK_DATA/SEEK_HOLE and
//     copy_file_range), then qemu-img rebase (safe mode) onto Base, named
//     relatively, or onto nothing. The copy keeps Top's relative backing
//     name, which resolves alike in the same folder; rebase then writes
//     every area Top does not hold where the old chain and Base differ.
//     Bytes = Top's allocated bytes (0 with a clone) + the areas of the
//     view held by the removed images: their data, and with a Base also
//     their zeros (a zero written over Base's data must be written again
//     as zeros, or Base's data would show through). Over a Base this is
//     an upper bound (a zero area over a zero area of Base is not
//     written).
//   - convert (only when Base is ""): qemu-img convert of Top's whole view
//     into a new standalone image. Bytes = qemu-img measure's "required".
//     It cannot merge onto a Base: with -B, qemu-img convert copies only
//     the areas allocated in the source's top layer, so the removed
//     layers would be lost (checked with qemu-img 7.2: the result of
//     convert -B differs from Top where a removed middle image wrote).
//   - commit is not offered: qemu-img commit writes Top's data into its
//     backing file, an image that a kept restore point (or Base) still
//     reads, and rewrites headers to drop the intermediates, so a crash
//     midway leaves committed images modified; with invariant 2 (a
//     committed restore point is never modified) it cannot be used. Its
//     only crash-safe form would write into a copy of the bottom removed
//     image and needs Top's layer over that copy, i.e. a copy of Top as
//     well: more bytes than rebase, whatever the sizes, unless the
//     filesystem clones.
//
// The Plan picks the fewest bytes (convert on a tie), and Run refuses a
// method whose bytes exceed the free space. Over a Base only rebase
// applies. With Base "", both write about the same: Top's data plus the
// removed images' data that Top does not shadow. So convert wins when
// Top's file holds space its view no longer uses (clusters zeroed without
// unmapping, leaks), and rebase when the filesystem clones (the copy of
// Top is then free) — and otherwise by the cluster in which qemu-img
// measure exceeds the allocation. Measured in this package's tests (64 MiB
// disks, 2 busy cores; estimate / bytes allocated in Temp / time to write
// Temp):
//
// On ext4 (no clones):
//
//   - remove the full under a 6.3 MiB Top (12 MiB of removed data): rebase
//     19140608 / 19140608 / 40 ms (6557696 copied), convert 19202048 /
//     19140608 / 55 ms: rebase chosen, by 60 KiB.
//   - remove the full and two more under a 2.8 MiB Top: rebase 21237760 /
//     21237760 / 53 ms, convert 21299200 / 21237760 / 91 ms: rebase.
//   - a Top with 16 MiB zeroed but still allocated, over a 1 MiB full:
//     convert 2424832 / 2363392 / 43 ms, rebase 19140608 / 19140608 /
//     47 ms (18092032 copied): convert, by 8x.
//   - remove one middle image: rebase 10293248 / 10293248 / 34 ms; three
//     consecutive ones: rebase 16060416 / 15536128 / 32 ms (the estimate
//     counts zeros over zeros of Base).
//
// On XFS with reflinks (a loop device):
//
//   - a 32 MiB Top over a 1 MiB removed full: rebase 1048576 (nothing
//     copied, 35 ms), convert 34930688: rebase, by 33x.
//   - remove the full under the 6.3 MiB Top above: rebase 12582912,
//     convert 19202048: rebase.
//
// Verifying (compare, check, SHA-256) took 30–70 ms per merge.
package merge
