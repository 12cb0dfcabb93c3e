// Package prune tests retention on whole stacks (a Temporal dev server,
// the lab, a worker process, a fresh database): policies set with
// `starter retention`, `starter prune` removing the restore points a
// policy does not keep and merging what kept points build on, every kept
// point restoring byte for byte as it was backed up, the repository
// shrinking, and the next backup continuing the chain.
package prune
