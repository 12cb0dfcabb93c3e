// Package cli holds whole-stack tests of what an operator meets at the
// edges of the starter CLI, through the real bin/starter against a stack
// of its own (package stack): the command line itself (help on stdout
// and exit 0, a bad command line exit 2 naming what was wrong and
// starting nothing, ignored flags noted on stderr only), where a restore
// may write (a file, refused if it exists unless --force; a block device
// in place; nothing else, refused before anything is converted), Ctrl-C
// of a starter waiting for a backup (the backup goes on, exit code 4),
// and a backup of a VM refused (exit code 3) while one runs under another
// profile of the same vCenter. It has no code besides its tests.
package cli
