package main

import (
	"flag"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/cbtflow/cbtflow/internal/config"

	"github.com/cbtflow/cbtflow/internal/units"
)

// settings selects the configuration settings (internal/config) a command
// uses; only those are listed in its help.
type settings uint

const (
	useTemporal   settings = 1 << iota // --temporal-address, --namespace
	useCatalog                         // --database-url
	useRepository                      // --repository
)

// settingFlags are the flags of each setting, as config.Config.Register
// names them.
var settingFlags = map[settings][]string{
	useTemporal:   {"temporal-address", "namespace"},
	useCatalog:    {"database-url"},
	useRepository: {"repository"},
}

// addConfigFlags defines on cmd the configuration flags (config.Config's,
// with their defaults from the environment) of the settings it uses. The
// others (the worker's --vcenters and --metrics-addr among them) are still
// accepted, so a script that passes them keeps working, but are not
// listed, and using one prints that the command ignores it.
func addConfigFlags(cmd *cobra.Command, cfg *config.Config, use settings) {
	gfs := flag.NewFlagSet(cmd.Name(), flag.ContinueOnError)
	cfg.Register(gfs)
	used := map[string]bool{}
	for s, names := range settingFlags {
		if use&s != 0 {
			for _, n := range names {
				used[n] = true
			}
		}
	}
	fs := cmd.Flags()
	gfs.VisitAll(func(f *flag.Flag) {
		fs.AddGoFlag(f)
		if f.Name == "database-url" {
			// The help shows the default, from the environment: a
			// password in CBTFLOW_DATABASE_URL must not show.
			fs.Lookup(f.Name).DefValue = config.RedactDatabaseURL(f.DefValue)
		}
		if !used[f.Name] {
			_ = fs.MarkHidden(f.Name)
			_ = fs.SetAnnotation(f.Name, ignoredFlag, []string{"true"})
		}
	})
}

// humanDefaults shows the defaults of duration flags in human units (24h,
// not 24h0m0s).
func humanDefaults(fs *pflag.FlagSet) {
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Value.Type() != "duration" {
			return
		}
		if d, err := time.ParseDuration(f.DefValue); err == nil {
			f.DefValue = units.Duration(d)
		}
	})
}

// ignoredFlag annotates a flag a command accepts but does not use.
const ignoredFlag = "cbtflow/ignored"

// warnIgnoredFlags says on stderr which of the given flags the command
// ignores.
func warnIgnoredFlags(cmd *cobra.Command) {
	cmd.Flags().Visit(func(f *pflag.Flag) {
		if _, ok := f.Annotations[ignoredFlag]; ok {
			fmt.Fprintf(cmd.ErrOrStderr(), "starter: %s--%s is ignored: %s does not use it\n", prefix(cmd), f.Name, cmd.CommandPath())
		}
	})
}

// profileFlag defines --profile, whose default is CBTFLOW_PROFILE.
func profileFlag(fs *pflag.FlagSet) *string {
	return fs.String("profile", config.Env("CBTFLOW_PROFILE", ""), profileUsage)
}

// profileUsage is the help of every --profile flag that names the profile
// a backup runs under.
const profileUsage = "vCenter profile `name` (CBTFLOW_PROFILE); empty: the worker's default (its CBTFLOW_PROFILE, or its only profile)"
