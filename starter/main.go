// Command starter is the CLI operators use to drive cbtflow: backups,
// restores, schedules, retention, and the lab vCenter for demos and tests.
//
// Run `starter --help` or `starter COMMAND --help` for the commands and
// their flags. Logs go to stderr; stdout carries only a command's result
// (and help, when asked for).
//
// The command tree is built by newRootCmd: each command has a constructor
// (newBackupCmd, newScheduleCmd, ...) in the file of its group, and
// newRootCmd adds them. To add a command, write its constructor in a file
// of its own and add one AddCommand line to newRootCmd. Exit codes and
// error messages need nothing more: a RunE error is a failure (exit 1)
// unless it is a usageError (2) or an exitError (its code); a bad command
// line cobra finds (unknown command or flag, bad flag value, wrong
// arguments) exits 2.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/cbtflow/cbtflow/internal/config"
	"github.com/spf13/cobra"
)

// env is what every command gets: where to print and log, and the
// process environment (for flag defaults).
type env struct {
	stdout io.Writer
	stderr io.Writer
	log    *slog.Logger
	getenv func(string) string
}

// version is the starter's release version, set at build time with
// -ldflags "-X main.version=v1.2.3"; the commit comes from the build info.
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// The first signal cancels ctx and lets the command say what goes on
	// (a backup keeps running in Temporal); a second one ends the starter
	// at once, as the default handling does.
	go func() {
		<-ctx.Done()
		stop()
	}()
	e := &env{
		stdout: os.Stdout,
		stderr: os.Stderr,
		log:    slog.New(slog.NewTextHandler(os.Stderr, nil)),
		getenv: os.Getenv,
	}
	code := execute(ctx, e, os.Args[1:])
	stop()
	os.Exit(code)
}

// newRootCmd builds the command tree. Add a command here, one line each,
// with its constructor in a file of its own (e.g. root.AddCommand(
// newStatusCmd(e)) with newStatusCmd in status.go).
func newRootCmd(e *env) *cobra.Command {
	root := &cobra.Command{
		Use:   "starter",
		Short: "drive cbtflow: back up vSphere VMs into QCOW2 through Temporal",
		Long: `starter drives cbtflow: it starts backups and prunes in Temporal, lists and
restores restore points from the catalog, and manages schedules and
retention policies.

Every command reads its settings from the environment (TEMPORAL_ADDRESS,
TEMPORAL_NAMESPACE, CBTFLOW_DATABASE_URL, CBTFLOW_REPOSITORY,
CBTFLOW_PROFILE) or from a flag of the same meaning; the defaults point at
the make dev stack. Logs go to stderr, results to stdout.

Exit codes: 0 success, 1 failure, 2 bad usage; backup adds 3 (a backup of
the VM is already running) and 4 (interrupted while the backup goes on).`,
		Version:       config.VersionString(version),
		Args:          cobra.ArbitraryArgs,
		RunE:          groupRun,
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	root.SetVersionTemplate("{{.Name}} {{.Version}}\n")
	// A command that groups others shows only "starter schedule [command]"
	// in its usage, not a line of its own.
	root.SetUsageTemplate(strings.Replace(root.UsageTemplate(), "{{if .Runnable}}", "{{if and .Runnable (not .HasAvailableSubCommands)}}", 1))
	root.SetFlagErrorFunc(flagError)
	root.SetOut(e.stdout)
	root.SetErr(e.stderr)

	root.AddCommand(newBackupCmd(e))
	root.AddCommand(newListCmd(e))
	root.AddCommand(newRestoreCmd(e))
	root.AddCommand(newScheduleCmd(e))
	root.AddCommand(newRetentionCmd(e))
	root.AddCommand(newPruneCmd(e))
	root.AddCommand(newRepoCmd(e))
	root.AddCommand(newSetupCmd(e))
	root.AddCommand(newSweepCmd(e))
	root.AddCommand(newLabCmd(e))
	root.AddCommand(newStatusCmd(e))
	root.AddCommand(newWatchCmd(e))
	root.AddCommand(newCancelCmd(e))
	root.AddCommand(newVerifyCmd(e))
	root.AddCommand(newExportCmd(e))
	// Commands added by other files go above this line.

	// help and completion (bash, zsh, fish, powershell) are cobra's.
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	finishTree(root)
	return root
}

// execute runs the command line args and returns the exit code, having
// printed the error (if any) as "starter: ..." on e.stderr.
func execute(ctx context.Context, e *env, args []string) int {
	cmd, err := runCommand(ctx, e, args)
	return report(e, cmd, err)
}

// runCommand runs args through the command tree and returns the command
// that ran (or failed to parse) and its error.
func runCommand(ctx context.Context, e *env, args []string) (*cobra.Command, error) {
	root := newRootCmd(e)
	root.SetArgs(goStyleFlags(root, args))
	return root.ExecuteContextC(ctx)
}

// goStyleFlags returns args with long flags written with one dash, as
// the flag package took them before the starter used cobra (-wait,
// -status committed, -help), given their two, so that scripts of older
// releases keep working. A word is a flag of the command named so far
// (the root, then each subcommand word). Never nil (nil would make cobra
// read os.Args).
func goStyleFlags(root *cobra.Command, args []string) []string {
	out := make([]string, 0, len(args))
	cmd := root
	root.InitDefaultVersionFlag()
	cmd.InitDefaultHelpFlag()
	for i, a := range args {
		if a == "--" {
			return append(out, args[i:]...)
		}
		switch {
		case len(a) > 2 && a[0] == '-' && a[1] != '-':
			name, _, _ := strings.Cut(a[1:], "=")
			if len(name) > 1 && cmd.Flags().Lookup(name) != nil {
				a = "-" + a
			}
		case a != "" && a[0] != '-':
			for _, sub := range cmd.Commands() {
				if sub.Name() == a || sub.HasAlias(a) {
					cmd = sub
					cmd.InitDefaultHelpFlag()
					break
				}
			}
		}
		out = append(out, a)
	}
	return out
}

// report prints err and returns the exit code it calls for.
func report(e *env, cmd *cobra.Command, err error) int {
	if err == nil {
		return 0
	}
	code := exitCode(err)
	var exit exitError
	if errors.As(err, &exit) && exit.quiet {
		return code
	}
	var ran ranError
	if errors.As(err, &ran) {
		err = ran.err
	}
	fmt.Fprintln(e.stderr, "starter:", err)
	if code == 2 && cmd != nil {
		fmt.Fprintf(e.stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
	}
	return code
}

// exitCode is the exit code of err: a command's own error says it (a
// usageError 2, an exitError its code, anything else 1); an error cobra
// found before running a command is a bad command line (2).
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ran ranError
	if !errors.As(err, &ran) {
		return 2
	}
	var usage usageError
	var exit exitError
	switch {
	case errors.As(ran.err, &usage):
		return 2
	case errors.As(ran.err, &exit):
		return exit.code
	}
	return 1
}

// ranError marks an error a command's RunE returned, to tell it from the
// command-line errors cobra finds itself.
type ranError struct{ err error }

func (r ranError) Error() string { return r.err.Error() }
func (r ranError) Unwrap() error { return r.err }

// finishTree makes every command of the tree behave alike: its RunE's
// errors are marked as the command's own (exitCode), a configuration flag
// it ignores is named on stderr (addConfigFlags), durations show in human
// units in its help, and a group (a
// command with subcommands and no action of its own) refuses a missing
// or unknown subcommand as a usage error instead of printing help.
func finishTree(c *cobra.Command) {
	c.SilenceErrors, c.SilenceUsage = true, true
	humanDefaults(c.Flags())
	if c.HasSubCommands() && c.Run == nil && c.RunE == nil {
		c.Args = cobra.ArbitraryArgs
		c.RunE = groupRun
	}
	if run := c.RunE; run != nil {
		c.RunE = func(cmd *cobra.Command, args []string) error {
			warnIgnoredFlags(cmd)
			if err := run(cmd, args); err != nil {
				return ranError{err}
			}
			return nil
		}
	}
	for _, sub := range c.Commands() {
		finishTree(sub)
	}
}

// groupRun is the action of a command that only groups others (and of
// the root): without a subcommand it prints its usage on stderr (exit 2);
// "help" prints its help; anything else is an unknown command.
func groupRun(cmd *cobra.Command, args []string) error {
	switch {
	case len(args) == 0:
		fmt.Fprint(cmd.ErrOrStderr(), cmd.UsageString())
		return usageError{fmt.Errorf("%sno command given: give one of the commands above", prefix(cmd))}
	case args[0] == "help":
		return cmd.Help()
	}
	return unknownCommand(cmd, args[0])
}

func unknownCommand(cmd *cobra.Command, name string) error {
	msg := fmt.Sprintf("unknown command %q for %q", name, cmd.CommandPath())
	if cmd.SuggestionsMinimumDistance <= 0 {
		cmd.SuggestionsMinimumDistance = 2
	}
	if s := cmd.SuggestionsFor(name); len(s) > 0 {
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return usageError{errors.New(msg)}
}

// flagError makes a flag cobra could not parse a usage error. On a group,
// a word before the bad flag is the real mistake: "starter bakup --wait"
// is an unknown command, not an unknown flag of starter.
func flagError(cmd *cobra.Command, err error) error {
	if cmd.HasSubCommands() {
		if a := cmd.Flags().Args(); len(a) > 0 {
			return unknownCommand(cmd, a[0])
		}
	}
	return usageError{fmt.Errorf("%s%w", prefix(cmd), err)}
}

// exactArgs accepts exactly n positional arguments; else the usage error
// says what to give.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError{fmt.Errorf("%sgive %s, got %s", prefix(cmd), what, argCount(args))}
		}
		return nil
	}
}

// minArgs accepts at least n positional arguments.
func minArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < n {
			return usageError{fmt.Errorf("%sgive %s, got %s", prefix(cmd), what, argCount(args))}
		}
		return nil
	}
}

// maxArgs accepts at most n positional arguments.
func maxArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) > n {
			return usageError{fmt.Errorf("%sat most %s, got %s", prefix(cmd), what, argCount(args))}
		}
		return nil
	}
}

// prefix is "backup: " or "schedule add: " for messages of a command
// (main prints them after "starter: "), and nothing for the root.
func prefix(cmd *cobra.Command) string {
	if !cmd.HasParent() {
		return ""
	}
	_, p, _ := strings.Cut(cmd.CommandPath(), " ")
	return p + ": "
}

func argCount(args []string) string {
	switch len(args) {
	case 0:
		return "none"
	case 1:
		return fmt.Sprintf("1 (%q)", args[0])
	}
	return fmt.Sprintf("%d (%s)", len(args), strings.Join(quoteAll(args), " "))
}

func quoteAll(s []string) []string {
	q := make([]string, len(s))
	for i, v := range s {
		q[i] = fmt.Sprintf("%q", v)
	}
	return q
}
