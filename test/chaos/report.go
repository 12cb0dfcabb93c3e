package chaos

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Tally is what one scenario did and what its checks found.
type Tally struct {
	Scenario string
	// Runs is the backups started; Completed those that completed;
	// Failed those that failed as the scenario expects (a full
	// repository, a persistent read error).
	Runs, Completed, ExpectedFailures int
	// Verified counts restore points (backup × disk) restored and found
	// byte-identical to the disk at backup time; Committed is how many the
	// scenario committed.
	Verified, Committed int
	// LostChangeIDs: a completed backup's disk whose restore point is not
	// committed, or whose committed change ID is not the one the lab
	// stamped on the backup's snapshot.
	LostChangeIDs int
	// LeftoverSnapshots: cbtflow-* snapshots on any VM after the scenario.
	LeftoverSnapshots int
	// LeftoverProcesses: qemu-nbd or nbdkit (or any process of the stack
	// other than the worker and Temporal) alive after the scenario, or
	// after a killed worker.
	LeftoverProcesses int
	// LostKeptPoints (prunes): a restore point the retention policy keeps
	// that is gone from the catalog after the prune.
	LostKeptPoints int
	// LeftoverTempImages (prunes): merged images (.merging) left in the
	// repository after the prune.
	LeftoverTempImages int
	// Problems are every other failed check, in words.
	Problems []string
}

// OK reports whether the scenario kept every promise.
func (t *Tally) OK() bool {
	return t.Runs > 0 && t.Completed+t.ExpectedFailures == t.Runs && t.Verified == t.Committed && t.Committed > 0 &&
		t.LostChangeIDs == 0 && t.LeftoverSnapshots == 0 && t.LeftoverProcesses == 0 &&
		t.LostKeptPoints == 0 && t.LeftoverTempImages == 0 && len(t.Problems) == 0
}

// WriteTable writes the results table, one row per scenario and a total.
func WriteTable(w io.Writer, tallies []*Tally) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\truns\tcompleted\texpected failures\trestore points verified\tlost change IDs\tlost kept points\tleftover snapshots\tleftover temp images\tleftover processes\tresult\t")
	var sum Tally
	allOK := true
	for _, t := range tallies {
		result := "ok"
		if !t.OK() {
			result = "FAIL"
			allOK = false
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d/%d\t%d\t%d\t%d\t%d\t%d\t%s\t\n", t.Scenario, t.Runs, t.Completed, t.ExpectedFailures,
			t.Verified, t.Committed, t.LostChangeIDs, t.LostKeptPoints, t.LeftoverSnapshots, t.LeftoverTempImages, t.LeftoverProcesses, result)
		sum.Runs += t.Runs
		sum.Completed += t.Completed
		sum.ExpectedFailures += t.ExpectedFailures
		sum.Verified += t.Verified
		sum.Committed += t.Committed
		sum.LostChangeIDs += t.LostChangeIDs
		sum.LeftoverSnapshots += t.LeftoverSnapshots
		sum.LeftoverProcesses += t.LeftoverProcesses
		sum.LostKeptPoints += t.LostKeptPoints
		sum.LeftoverTempImages += t.LeftoverTempImages
	}
	result := "ok"
	if !allOK || len(tallies) == 0 {
		result = "FAIL"
	}
	fmt.Fprintf(tw, "total\t%d\t%d\t%d\t%d/%d\t%d\t%d\t%d\t%d\t%d\t%s\t\n", sum.Runs, sum.Completed, sum.ExpectedFailures,
		sum.Verified, sum.Committed, sum.LostChangeIDs, sum.LostKeptPoints, sum.LeftoverSnapshots, sum.LeftoverTempImages, sum.LeftoverProcesses, result)
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, t := range tallies {
		for _, p := range t.Problems {
			if _, err := fmt.Fprintf(w, "%s: %s\n", t.Scenario, strings.TrimSpace(p)); err != nil {
				return err
			}
		}
	}
	return nil
}
