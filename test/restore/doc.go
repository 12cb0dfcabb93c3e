// Package restore tests, on a whole stack, restores as Temporal
// workflows (`starter restore BACKUP_ID --disk KEY --to FILE` starts the
// Restore workflow, which the worker runs): the file written by the worker
// equals the disk at backup time, from a starter that can reach neither
// the catalog nor the repository; the progress query answers the live
// bytes of a running restore; a cancel leaves no file; bad input fails at
// once, not retried, naming what was wrong; the search attributes.
package restore
