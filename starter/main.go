// Command starter is the CLI operators use to drive cbtflow: backups,
// restores, schedules, and the lab vCenter for demos and tests.
//
//	starter lab serve|write|read ...
//
// Run `starter help` or `starter COMMAND -h` for the flags. Logs go to
// stderr; stdout carries only a command's result.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// env is what every command gets: where to print and log, and the
// process environment (for flag defaults).
type env struct {
	stdout io.Writer
	stderr io.Writer
	log    *slog.Logger
	getenv func(string) string
}

// command is one subcommand (or group of subcommands).
type command struct {
	summary string
	run     func(ctx context.Context, e *env, args []string) error
}

// commands is filled by the files of the command groups.
var commands = map[string]command{}

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
	err := run(ctx, e, os.Args[1:])
	stop()
	var exit exitError
	var usage usageError
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp), errors.Is(err, errUsage):
		os.Exit(2)
	case errors.As(err, &usage):
		fmt.Fprintln(os.Stderr, "starter:", usage.err)
		os.Exit(2)
	case errors.As(err, &exit):
		if !exit.quiet {
			fmt.Fprintln(os.Stderr, "starter:", exit.err)
		}
		os.Exit(exit.code)
	default:
		fmt.Fprintln(os.Stderr, "starter:", err)
		os.Exit(1)
	}
}

// errUsage reports a command line without a command; the usage was printed.
var errUsage = errors.New("usage")

func run(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		printCommands(e.stderr, "starter", commands)
		if len(args) == 0 {
			return errUsage
		}
		return nil
	}
	c, ok := commands[args[0]]
	if !ok {
		printCommands(e.stderr, "starter", commands)
		return fmt.Errorf("unknown command %q", args[0])
	}
	return c.run(ctx, e, args[1:])
}

// dispatch runs the subcommand named by args[0] among subs.
func dispatch(ctx context.Context, e *env, prefix string, subs map[string]command, args []string) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		printCommands(e.stderr, prefix, subs)
		if len(args) == 0 {
			return errUsage
		}
		return nil
	}
	c, ok := subs[args[0]]
	if !ok {
		printCommands(e.stderr, prefix, subs)
		return fmt.Errorf("unknown command %q", prefix+" "+args[0])
	}
	return c.run(ctx, e, args[1:])
}

func printCommands(w io.Writer, prefix string, cmds map[string]command) {
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(w, "usage: %s COMMAND [flags]\n\ncommands:\n", prefix)
	for _, n := range names {
		fmt.Fprintf(w, "  %-9s %s\n", n, cmds[n].summary)
	}
}

// newFlags returns a flag set that reports errors instead of exiting.
func newFlags(e *env, name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	return fs
}

// parse parses args and refuses positional arguments.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%s: unexpected argument %q", fs.Name(), fs.Arg(0))
	}
	return nil
}
