// Package sweep tests the snapshot sweeper against a whole stack: a
// terminated backup runs no cleanup code, and the sweeper must remove what
// it left. Test files only.
package sweep
