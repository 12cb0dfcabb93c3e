package config

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// VersionString is what a binary's --version prints after its name: the
// version (set at link time; "dev" without, then the module's version
// when it was installed as one), the commit it was built from (and
// whether the tree had changes), and the Go version and platform.
func VersionString(version string) string {
	v, commit, modified := version, "unknown", false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				commit = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	if len(commit) > 12 {
		commit = commit[:12]
	}
	if modified {
		commit += ", modified"
	}
	return fmt.Sprintf("%s (commit %s) %s %s/%s", v, commit, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
