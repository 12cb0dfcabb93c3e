package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/lab/labapi"
)

func init() {
	commands["lab"] = command{
		summary: "run the lab vCenter (simulated, with CBT) and write or read its disks",
		run: func(ctx context.Context, e *env, args []string) error {
			return dispatch(ctx, e, "starter lab", map[string]command{
				"serve": {"run the lab vCenter in the foreground; prints {\"url\",\"thumbprint\"} on stdout", labServe},
				"write": {"write a file's bytes into a lab VM's disk", labWrite},
				"read":  {"copy a lab VM's disk into a sparse raw file", labRead},
			}, args)
		},
	}
}

// serveInfo is the one line `lab serve` prints on stdout.
type serveInfo struct {
	URL        string `json:"url"`
	Thumbprint string `json:"thumbprint"`
}

// passwordFileName is where `lab serve` keeps a generated password in its
// dir.
const passwordFileName = "password"

func labServe(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "lab serve")
	listen := fs.String("listen", "127.0.0.1:0", "loopback `address` to listen on (port 0 picks a free port)")
	dir := fs.String("dir", "", "`directory` for disk images, certificate and generated password (default: a temporary directory removed on exit)")
	user := fs.String("user", lab.DefaultUser, "login `user`")
	passwordFile := fs.String("password-file", "", "`file` holding the login password (default: DIR/password, generated when missing)")
	maxExtents := fs.Int("max-extents", 0, "at most `N` extents per QueryChangedDiskAreas answer (0: no limit)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: starter lab serve [flags]\n\nRuns the lab vCenter until SIGINT or SIGTERM. Prints one JSON line on stdout\nonce it accepts connections: {\"url\": SDK URL, \"thumbprint\": SHA-1 of its certificate}.\n\nflags:")
		fs.PrintDefaults()
	}
	if err := parse(fs, args); err != nil {
		return err
	}

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

func (t *labTarget) register(fs *flag.FlagSet, e *env) {
	fs.StringVar(&t.url, "lab", e.getenv("CBTFLOW_LAB_URL"), "the lab's `URL` as printed by `starter lab serve` (env CBTFLOW_LAB_URL)")
	fs.StringVar(&t.thumbprint, "thumbprint", e.getenv("CBTFLOW_LAB_THUMBPRINT"), "pin the lab's certificate `thumbprint` (env CBTFLOW_LAB_THUMBPRINT; optional on loopback)")
	fs.StringVar(&t.vm, "vm", "", "VM `name`")
	fs.IntVar(&t.disk, "disk", 0, "disk device `key` (e.g. 204)")
}

func (t *labTarget) check() error {
	switch {
	case t.url == "":
		return errors.New("no lab URL: give --lab or set CBTFLOW_LAB_URL")
	case t.vm == "":
		return errors.New("no VM: give --vm")
	case t.disk <= 0:
		return errors.New("no disk: give --disk KEY (a device key such as 204)")
	}
	return nil
}

func (t *labTarget) client() *labapi.Client {
	return &labapi.Client{BaseURL: t.url, Thumbprint: t.thumbprint}
}

func labWrite(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "lab write")
	var t labTarget
	t.register(fs, e)
	offset := fs.Int64("offset", 0, "byte `offset` in the disk")
	from := fs.String("from", "", "`file` whose bytes are written")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := t.check(); err != nil {
		return err
	}
	if *from == "" {
		return errors.New("no input: give --from FILE")
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

func labRead(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "lab read")
	var t labTarget
	t.register(fs, e)
	to := fs.String("to", "", "output `file`: a sparse raw image of the disk's capacity")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := t.check(); err != nil {
		return err
	}
	if *to == "" {
		return errors.New("no output: give --to FILE")
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
