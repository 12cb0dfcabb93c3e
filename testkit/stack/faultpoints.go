package stack

import (
	"debug/buildinfo"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cbtflow/cbtflow/internal/faultpoint"
)

// FaultPoints returns the gates of the stack's fault points; the worker
// holds at them only when the stack was started with Options.FaultPoints.
func (s *Stack) FaultPoints() faultpoint.Gates {
	return faultpoint.Gates{Dir: filepath.Join(s.dir, "faultpoints")}
}

// checkFaultPoints refuses a worker built without faultpoint.Tag: it
// would pass every fault point, and a test waiting at one would wait out
// its timeout instead of failing at once, naming the cause.
func checkFaultPoints(worker string) error {
	tagged, err := hasFaultPoints(worker)
	if err != nil {
		return fmt.Errorf("stack: Options.FaultPoints: %w", err)
	}
	if !tagged {
		return fmt.Errorf("stack: Options.FaultPoints: the worker %s was built without -tags %s, so it has no fault points (BuildBinaries builds it with them)", worker, faultpoint.Tag)
	}
	return nil
}

// hasFaultPoints reports whether the Go program at path was built with
// faultpoint.Tag, from the build settings the go command records in it.
func hasFaultPoints(path string) (bool, error) {
	bi, err := buildinfo.ReadFile(path)
	if err != nil {
		return false, err
	}
	for _, s := range bi.Settings {
		if s.Key == "-tags" && slices.Contains(strings.Split(s.Value, ","), faultpoint.Tag) {
			return true, nil
		}
	}
	return false, nil
}
