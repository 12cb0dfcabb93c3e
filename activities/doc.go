// Package activities holds the steps of cbtflow's workflows as Temporal
// activities: methods on structs whose dependencies (vCenter sessions, the
// catalog, the repository, disk sources) are injected by the worker.
//
// Every activity is idempotent, since Temporal runs activities at least
// once. Errors that no retry can fix (an unknown VM, a bad login, a full or
// read-only repository, …) are returned as non-retryable ApplicationErrors
// whose types are the ErrType constants, so workflows and operators can
// tell them apart without parsing messages.
//
// The input and result structs are plain data: they travel through
// workflow history, so they never carry a secret and stay small (extent
// lists live in files of the repository's staging folder).
package activities
