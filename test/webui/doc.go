// Package webui holds cbtflow's browser test of the Temporal Web UI: on a
// stack of its own with the Web UI on (package stack: the real Temporal dev
// server, a worker process, the lab vCenter, a fresh PostgreSQL database),
// Debian's chromium, driven headless with chromedp, starts a backup with the
// UI's Start Workflow form, finds it in the workflow list filtered by the
// CbtflowVM search attribute, and runs the BackupVM workflow's progress
// query in its Queries tab, as the README tells operators to. It saves a
// screenshot of every step. It has no code outside its tests.
//
// Chromium is required: the test fails, never skips, without it (scripts/deps
// installs Debian's chromium package; CBTFLOW_CHROMIUM names another
// binary).
package webui
