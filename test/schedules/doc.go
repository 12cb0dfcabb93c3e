// Package schedules tests backups on Temporal schedules (starter schedule
// add, update, pause, unpause, trigger, describe, list, delete) against a
// whole stack: a scheduled run commits a restore point; an unknown VM gets
// no schedule; update changes the timing (interval, offset, cron) and the
// backups (mode, --full-every); a run triggered while a backup of the VM
// runs starts nothing and ends skipped; --full-every 2 alternates full and
// incremental backups. Test files only.
package schedules
