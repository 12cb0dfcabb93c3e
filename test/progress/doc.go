// Package progress tests, on a whole stack, what an operator sees of a
// running backup: the progress query (phases, bytes, rate, ETA, from the
// transfers' heartbeats), the search attributes of both backup
// workflows, and that a backup's history does not grow with its disk.
package progress
