package restore

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"

	"github.com/cbtflow/cbtflow/internal/qemu"
)

// The stages of a restore, in Progress.Stage.
const (
	// StageVerifying: the chain's images are read back and compared with
	// the SHA-256 recorded at commit (Done of Total bytes of the images).
	StageVerifying = "verifying"
	// StageWriting: qemu-img converts the chain into the target (Done of
	// Total bytes of the disk; Done follows qemu-img's own progress, the
	// share of the disk's data written, so a sparse disk advances by its
	// data, not by its holes).
	StageWriting = "writing"
)

// Progress is where a restore stands, as Options.Progress is told.
type Progress struct {
	Stage string
	Done  int64
	Total int64
}

// ErrNotFound is wrapped by errors about a restore point (or a disk of
// one) that the catalog does not have, or has but not committed.
var ErrNotFound = errors.New("no such restore point")

// ErrRefused is wrapped by errors about a target a restore may not write
// (see CheckTarget), and about options that make no restore (a format
// other than raw and qcow2).
var ErrRefused = errors.New("restore target refused")

// kindError is an error whose message is msg and which is kind for
// errors.Is: the messages stay as operators know them, and callers (the
// worker's activity) tell bad input from failures that may heal.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string        { return e.msg }
func (e *kindError) Is(target error) bool { return target == e.kind }

func notFound(format string, a ...any) error {
	return &kindError{kind: ErrNotFound, msg: fmt.Sprintf(format, a...)}
}

func refused(format string, a ...any) error {
	return &kindError{kind: ErrRefused, msg: fmt.Sprintf(format, a...)}
}

// report calls o.Progress, when set.
func (o Options) report(stage string, done, total int64) {
	if o.Progress != nil {
		o.Progress(Progress{Stage: stage, Done: done, Total: total})
	}
}

// convert runs the qemu-img convert co. With o.Progress set it runs it
// with -p and reports qemu-img's progress as bytes of the disk's size
// (StageWriting); without, it is qemu.Convert.
func convert(ctx context.Context, co qemu.ConvertOptions, size int64, o Options) error {
	if o.Progress == nil {
		return qemu.Convert(ctx, co)
	}
	args := qemu.ConvertArgs(co)
	args = append([]string{args[0], "-p"}, args[1:]...)
	cmd := exec.CommandContext(ctx, qemu.QemuImg, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("qemu: qemu-img convert: %w", err)
	}
	o.report(StageWriting, 0, size)
	sc := bufio.NewScanner(out)
	sc.Split(splitLines)
	for sc.Scan() {
		if pct, ok := parsePercent(sc.Text()); ok && ctx.Err() == nil {
			o.report(StageWriting, int64(pct/100*float64(size)), size)
		}
	}
	_, _ = io.Copy(io.Discard, out)
	err = cmd.Wait()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			return fmt.Errorf("qemu: qemu-img convert %s: %w", strings.Join(args[2:], " "), err)
		}
		return fmt.Errorf("qemu: qemu-img convert %s: %w: %s", strings.Join(args[2:], " "), err, msg)
	}
	o.report(StageWriting, size, size)
	return nil
}

// splitLines splits qemu-img's progress output, whose lines end in \r
// (redrawn in place on a terminal) and the last in \n.
func splitLines(data []byte, atEOF bool) (advance int, token []byte, err error) {
	if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// parsePercent reads one progress line of qemu-img -p: "    (42.00/100%)".
func parsePercent(line string) (float64, bool) {
	line = strings.TrimSpace(line)
	num, ok := strings.CutPrefix(line, "(")
	if !ok {
		return 0, false
	}
	num, _, ok = strings.Cut(num, "/100%)")
	if !ok {
		return 0, false
	}
	pct, err := strconv.ParseFloat(num, 64)
	if err != nil || pct < 0 || pct > 100 {
		return 0, false
	}
	return pct, true
}
