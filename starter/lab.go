package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/lab/labapi"
)

func newLabCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "run the lab vCenter (simulated, with CBT) and write or read its disks",
	}
	cmd.AddCommand(newLabServeCmd(e), newLabWriteCmd(e), newLabReadCmd(e))
	return cmd
}

// serveInfo is the one line `lab serve` prints on stdout.
type serveInfo struct {
	URL        string `json:"url"`
	Thumbprint string `json:"thumbprint"`
}

// passwordFileName is where `lab serve` keeps a generated password in its
// dir.
const passwordFileName = "password"

func newLabServeCmd(e *env) *cobra.Command {
	var o labServeOptions
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "run the lab vCenter in the foreground; prints {\"url\",\"thumbprint\"} on stdout",
		Long: `Run the lab vCenter until SIGINT or SIGTERM. Prints one JSON line on stdout
once it accepts connections: {"url": SDK URL, "thumbprint": SHA-1 of its certificate}.`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return labServe(cmd.Context(), e, o)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&o.listen, "listen", "127.0.0.1:0", "loopback `address` to listen on (port 0 picks a free port)")
	fs.StringVar(&o.dir, "dir", "", "`directory` for disk images, certificate and generated password (default: a temporary directory removed on exit)")
	fs.StringVar(&o.user, "user", lab.DefaultUser, "login `user`")
	fs.StringVar(&o.passwordFile, "password-file", "", "`file` holding the login password (default: DIR/password, generated when missing)")
	fs.IntVar(&o.maxExtents, "max-extents", 0, "at most `N` extents per QueryChangedDiskAreas answer (0: no limit)")
	return cmd
}

type labServeOptions struct {
	listen, dir, user, passwordFile string
	maxExtents                      int
}

func labServe(ctx context.Context, e *env, o labServeOptions) error {
	listen, dir, user, passwordFile, maxExtents := &o.listen, &o.dir, &o.user, &o.passwordFile, &o.maxExtents
	labDir := *dir
	if labDir == "" {
		tmp, err := os.MkdirTemp("", "cbtflow-lab-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		labDir = tmp
	} else if err := os.MkdirAll(labDir, 0o700); err != nil {
		return err
	}
	password, pwFile, err := labPassword(labDir, *passwordFile)
	if err != nil {
		return err
	}
	e.log.Info("lab login", "user", *user, "password_file", pwFile)

	l, err := lab.Start(ctx, lab.Options{
		Listen:            *listen,
		Dir:               labDir,
		User:              *user,
		Password:          password,
		MaxExtentsPerPage: *maxExtents,
		Logger:            e.log,
	})
	if err != nil {
		return err
	}
	line, err := json.Marshal(serveInfo{URL: l.URL().String(), Thumbprint: l.Thumbprint()})
	if err == nil {
		_, err = fmt.Fprintf(e.stdout, "%s\n", line)
	}
	if err != nil {
		return errors.Join(err, l.Close())
	}
	<-ctx.Done()
	e.log.Info("lab shutting down", "reason", context.Cause(ctx))
	return l.Close()
}

// labPassword reads the password from file, or from DIR/password, which it
// generates when missing. It returns the password and the file it is in.
func labPassword(dir, file string) (string, string, error) {
	if file == "" {
		file = filepath.Join(dir, passwordFileName)
		if _, err := os.Stat(file); errors.Is(err, os.ErrNotExist) {
			pw, err := lab.RandomPassword()
			if err != nil {
				return "", "", err
			}
			if err := os.WriteFile(file, []byte(pw+"\n"), 0o600); err != nil {
				return "", "", fmt.Errorf("write password file: %w", err)
			}
		}
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", "", fmt.Errorf("password file: %w", err)
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" {
		return "", "", fmt.Errorf("password file %s is empty", file)
	}
	return pw, file, nil
}

// labTarget holds the flags that name a lab disk.
type labTarget struct {
	url, thumbprint, vm string
	disk                int
}

func (t *labTarget) register(fs *pflag.FlagSet, e *env) {
	fs.StringVar(&t.url, "lab", e.getenv("CBTFLOW_LAB_URL"), "the lab's `URL` as printed by `starter lab serve` (env CBTFLOW_LAB_URL)")
	fs.StringVar(&t.thumbprint, "thumbprint", e.getenv("CBTFLOW_LAB_THUMBPRINT"), "pin the lab's certificate `thumbprint` (env CBTFLOW_LAB_THUMBPRINT; optional on loopback)")
	fs.StringVar(&t.vm, "vm", "", "VM `name`")
	fs.IntVar(&t.disk, "disk", 0, "disk device `key` (e.g. 204)")
}

func (t *labTarget) check() error {
	switch {
	case t.url == "":
		return usageError{errors.New("no lab URL: give --lab or set CBTFLOW_LAB_URL")}
	case t.vm == "":
		return usageError{errors.New("no VM: give --vm")}
	case t.disk <= 0:
		return usageError{errors.New("no disk: give --disk KEY (a device key such as 204)")}
	}
	return nil
}

func (t *labTarget) client() *labapi.Client {
	return &labapi.Client{BaseURL: t.url, Thumbprint: t.thumbprint}
}

func newLabWriteCmd(e *env) *cobra.Command {
	var t labTarget
	var offset int64
	var from string
	cmd := &cobra.Command{
		Use:   "write --vm NAME --disk KEY --from FILE [--offset N]",
		Short: "write a file's bytes into a lab VM's disk",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return labWrite(cmd.Context(), e, t, offset, from)
		},
	}
	t.register(cmd.Flags(), e)
	cmd.Flags().Int64Var(&offset, "offset", 0, "byte `offset` in the disk")
	cmd.Flags().StringVar(&from, "from", "", "`file` whose bytes are written")
	return cmd
}

func labWrite(ctx context.Context, e *env, t labTarget, off int64, fromFile string) error {
	offset, from := &off, &fromFile
	if err := t.check(); err != nil {
		return err
	}
	if *from == "" {
		return usageError{errors.New("no input: give --from FILE")}
	}
	f, err := os.Open(*from)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	c := t.client()
	defer c.CloseIdleConnections()
	n, err := c.WriteDisk(ctx, t.vm, int32(t.disk), *offset, f, fi.Size())
	if err != nil {
		return err
	}
	e.log.Info("disk written", "vm", t.vm, "disk", t.disk, "offset", *offset, "bytes", n)
	return nil
}

func newLabReadCmd(e *env) *cobra.Command {
	var t labTarget
	var to string
	cmd := &cobra.Command{
		Use:   "read --vm NAME --disk KEY --to FILE",
		Short: "copy a lab VM's disk into a sparse raw file",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return labRead(cmd.Context(), e, t, to)
		},
	}
	t.register(cmd.Flags(), e)
	cmd.Flags().StringVar(&to, "to", "", "output `file`: a sparse raw image of the disk's capacity")
	return cmd
}

func labRead(ctx context.Context, e *env, t labTarget, toFile string) error {
	to := &toFile
	if err := t.check(); err != nil {
		return err
	}
	if *to == "" {
		return usageError{errors.New("no output: give --to FILE")}
	}
	c := t.client()
	defer c.CloseIdleConnections()
	// Ask before touching the output file, so a typo in --vm does not
	// truncate it.
	if _, err := c.Disk(ctx, t.vm, int32(t.disk)); err != nil {
		return err
	}
	f, err := os.OpenFile(*to, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	info, err := c.ReadDisk(ctx, t.vm, int32(t.disk), f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	e.log.Info("disk read", "vm", t.vm, "disk", t.disk, "capacity", info.Capacity, "file", *to)
	return nil
}
