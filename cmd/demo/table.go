package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"
)

// row is one line of the demo's table: one disk of one backup.
type row struct {
	Backup   string // "1" for the full, "2" for the incremental
	Disk     int32
	Mode     string
	Changed  int64 // bytes CBT reported as changed
	Written  int64 // bytes written into the QCOW2 (zeros and holes excluded)
	QCOW2    int64 // the QCOW2 file's size
	Seconds  float64
	Verified bool // the restore equals the disk at backup time, byte for byte
	Diff     string
}

// incrementalSlack is the fixed allowance of an incremental QCOW2 over
// its changed bytes: QCOW2 header, L1/L2 tables and refcount blocks.
const incrementalSlack = 1 << 20

// maxIncrementalSize is the largest QCOW2 an incremental of changed bytes
// may make: 1.5 × changed + 1 MiB. More means the overlay holds data that
// did not change (or the metadata overhead is out of proportion).
func maxIncrementalSize(changed int64) int64 {
	return changed + changed/2 + incrementalSlack
}

// check returns what is wrong with the rows: a restore that is not
// byte-for-byte equal, an incremental QCOW2 that is too large, or a
// second backup that was not incremental.
func check(rows []row) []string {
	var bad []string
	for _, r := range rows {
		if !r.Verified {
			msg := fmt.Sprintf("backup %s, disk %d: the restored disk differs from the disk at backup time", r.Backup, r.Disk)
			if r.Diff != "" {
				msg += " (" + r.Diff + ")"
			}
			bad = append(bad, msg)
		}
		if r.Mode == "incremental" {
			if limit := maxIncrementalSize(r.Changed); r.QCOW2 > limit {
				bad = append(bad, fmt.Sprintf("backup %s, disk %d: incremental QCOW2 is %d bytes, more than 1.5 × %d changed + 1 MiB = %d",
					r.Backup, r.Disk, r.QCOW2, r.Changed, limit))
			}
		}
	}
	return bad
}

// writeTable prints the rows as a table: text columns aligned left,
// numbers right.
func writeTable(w io.Writer, rows []row) error {
	header := []string{"backup", "disk", "mode", "changed", "written", "QCOW2", "seconds", "verified"}
	right := []bool{false, false, false, true, true, true, true, false}
	cells := [][]string{header}
	for _, r := range rows {
		mark := "✗"
		if r.Verified {
			mark = "✓"
		}
		cells = append(cells, []string{r.Backup, strconv.Itoa(int(r.Disk)), r.Mode,
			size(r.Changed), size(r.Written), size(r.QCOW2), fmt.Sprintf("%.2f", r.Seconds), mark})
	}
	width := make([]int, len(header))
	for _, line := range cells {
		for i, c := range line {
			width[i] = max(width[i], utf8.RuneCountInString(c))
		}
	}
	var b strings.Builder
	for _, line := range cells {
		var l strings.Builder
		for i, c := range line {
			if i > 0 {
				l.WriteString("  ")
			}
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(c))
			if right[i] {
				l.WriteString(pad + c)
			} else {
				l.WriteString(c + pad)
			}
		}
		b.WriteString(strings.TrimRight(l.String(), " ") + "\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// size prints a byte count in binary units with one decimal.
func size(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return strings.TrimSpace(fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp]))
}
