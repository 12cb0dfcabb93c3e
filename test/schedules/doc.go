// Package schedules tests backups on Temporal schedules (starter
// schedule add/list/delete) against a whole stack. Test files only.
package schedules
