package webui

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/input"
	"github.com/chromedp/chromedp"
)

// EnvChromium names the browser binary to use instead of Debian's chromium
// on the PATH.
const EnvChromium = "CBTFLOW_CHROMIUM"

// Viewport is the browser's window: the screenshots' size.
const (
	viewportWidth  = 1280
	viewportHeight = 800
)

// stepTimeout bounds one browser step (a page load, a click, a wait for an
// element): generous, the machine may be busy with other tests.
const stepTimeout = 2 * time.Minute

// chromiumPath finds the browser: $CBTFLOW_CHROMIUM, else chromium on the
// PATH. A missing browser fails the test: it never skips.
func chromiumPath(t testing.TB) string {
	t.Helper()
	if p := os.Getenv(EnvChromium); p != "" {
		if _, err := exec.LookPath(p); err != nil {
			t.Fatalf("%s=%s: %v", EnvChromium, p, err)
		}
		return p
	}
	p, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("Debian's chromium is required for the Web UI test (scripts/deps installs it: apt-get install chromium), or set %s: %v", EnvChromium, err)
	}
	return p
}

// waitHTTP waits until url answers 200, failing t after timeout.
func waitHTTP(t testing.TB, url string, timeout time.Duration) {
	t.Helper()
	hc := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		resp, err := hc.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			err = fmt.Errorf("%s", resp.Status)
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("the Web UI at %s does not answer after %s: %v", url, timeout, last)
}

// browser is one headless chromium with one tab, for one test. Every
// screenshot it takes goes to dir.
type browser struct {
	t   testing.TB
	ctx context.Context // the tab's context (no deadline: the browser lives as long as it)
	dir string
	n   int // screenshots taken, for their numbering

	mu  sync.Mutex
	log *os.File // chromium's output and chromedp's errors
}

// newBrowser starts chromium (exe) headless and stops it when t ends (the
// browser process and its children are killed and waited for on every way
// out).
func newBrowser(t testing.TB, exe, dir string) *browser {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "chromium.log"))
	if err != nil {
		t.Fatal(err)
	}
	b := &browser{t: t, dir: dir, log: logf}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe),
		chromedp.WindowSize(viewportWidth, viewportHeight),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("lang", "en-US"),
		chromedp.CombinedOutput(b),
	)
	actx, acancel := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithErrorf(b.logf), chromedp.WithLogf(b.logf))
	t.Cleanup(func() {
		cancel()  // closes the tab and the browser, and waits for it
		acancel() // kills what is left and waits for the allocator
		b.mu.Lock()
		b.log.Close()
		b.log = nil
		b.mu.Unlock()
	})
	b.ctx = ctx
	// The first run starts the browser, bound to ctx (no deadline here: a
	// deadline would stop the browser with it).
	start := make(chan error, 1)
	go func() { start <- chromedp.Do(ctx) }()
	select {
	case err = <-start:
	case <-time.After(stepTimeout):
		err = fmt.Errorf("no answer after %s", stepTimeout)
	}
	if err != nil {
		t.Fatalf("start %s (see %s): %v", exe, logf.Name(), err)
	}
	if err := b.run("set the viewport", chromedp.EmulateViewport(viewportWidth, viewportHeight)); err != nil {
		t.Fatal(err)
	}
	return b
}

// Write takes chromium's output for its log.
func (b *browser) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.log == nil {
		return len(p), nil
	}
	return b.log.Write(p)
}

func (b *browser) logf(format string, args ...any) {
	fmt.Fprintf(b, time.Now().Format(time.RFC3339Nano)+" "+format+"\n", args...)
}

// run runs actions with stepTimeout.
func (b *browser) run(what string, actions ...chromedp.Action[chromedp.Void]) error {
	ctx, cancel := context.WithTimeout(b.ctx, stepTimeout)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// must runs actions, failing the test (with a screenshot and the page's
// HTML) when one fails.
func (b *browser) must(what string, actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	if err := b.run(what, actions...); err != nil {
		b.fatal(err)
	}
}

// fatal saves what the page shows and fails the test.
func (b *browser) fatal(err error) {
	b.t.Helper()
	b.postMortem()
	b.t.Fatal(err)
}

// postMortem saves a screenshot, the page's URL and HTML, for a failure.
func (b *browser) postMortem() {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	if png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot()); err == nil {
		p := filepath.Join(b.dir, "failure.png")
		if os.WriteFile(p, png, 0o644) == nil {
			b.t.Logf("screenshot of the failure: %s", p)
		}
	}
	loc, _ := chromedp.Run(ctx, chromedp.Location())
	html, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.documentElement.outerHTML`))
	if err == nil {
		p := filepath.Join(b.dir, "failure.html")
		if os.WriteFile(p, []byte("<!-- "+loc+" -->\n"+html), 0o644) == nil {
			b.t.Logf("page at the failure (%s): %s", loc, p)
		}
	}
	if text, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`)); err == nil {
		if len(text) > 1500 {
			text = text[:1500] + "…"
		}
		b.t.Logf("the page's text at the failure:\n%s", text)
	}
}

// shot saves a screenshot of the viewport as NN-name.png and returns its
// path.
func (b *browser) shot(name string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, stepTimeout)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		b.fatal(fmt.Errorf("screenshot %s: %w", name, err))
	}
	b.n++
	p := filepath.Join(b.dir, fmt.Sprintf("%02d-%s.png", b.n, name))
	if err := os.WriteFile(p, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	return p
}

// eval evaluates a JavaScript expression and decodes its value into T.
func eval[T any](b *browser, expr string) (T, error) {
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	return chromedp.Run(ctx, chromedp.Evaluate[T](expr))
}

// waitJS evaluates expr (JavaScript giving a JSON value) every 250 ms until
// ok accepts its value, and returns that value. It survives navigations and
// re-renders; it fails the test with the last value seen after timeout.
func waitJS[T any](b *browser, what, expr string, timeout time.Duration, ok func(T) bool) T {
	b.t.Helper()
	deadline := time.Now().Add(timeout)
	var last T
	var lastErr error
	for {
		v, err := eval[T](b, expr)
		if err == nil && ok(v) {
			return v
		}
		if err == nil {
			last, lastErr = v, nil
		} else {
			lastErr = err
		}
		if time.Now().After(deadline) {
			got, _ := json.Marshal(last)
			b.fatal(fmt.Errorf("%s: not after %s (last seen: %s; last error: %v)", what, timeout, got, lastErr))
		}
		select {
		case <-b.ctx.Done():
			b.t.Fatalf("%s: the browser is gone: %v", what, b.ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// target is where a click lands: the middle of an element, in the
// viewport.
type target struct {
	X        float64 `json:"x"`
	Y        float64 `json:"y"`
	W        float64 `json:"w"`
	H        float64 `json:"h"`
	Hit      bool    `json:"hit"` // the element (or a child) is what is at the point
	Disabled bool    `json:"disabled"`
}

// click clicks, with the mouse, the element that the JavaScript expression
// elem gives, once it is enabled, on top and has not moved for a poll: a
// click computed before the page settles (data loading, a field that grows
// when it loses the focus) lands beside its target.
func (b *browser) click(what, elem string) {
	b.t.Helper()
	expr := `(() => {
		const el = (` + elem + `);
		if (!el) return null;
		el.scrollIntoView({block: "center", inline: "center"});
		const r = el.getBoundingClientRect();
		if (r.width === 0 || r.height === 0) return null;
		const x = r.x + r.width / 2, y = r.y + r.height / 2;
		return {x, y, w: r.width, h: r.height, hit: el.contains(document.elementFromPoint(x, y)),
			disabled: el.disabled === true || el.getAttribute("aria-disabled") === "true"};
	})()`
	var prev *target
	at := waitJS(b, what+": wait until it can be clicked", expr, stepTimeout, func(tg *target) bool {
		steady := tg != nil && prev != nil && *tg == *prev
		prev = tg
		return steady && tg.Hit && !tg.Disabled
	})
	b.must(what, chromedp.MouseClickXY(at.X, at.Y))
}

// byTestID is JavaScript for the first element with that data-testid.
func byTestID(id string) string {
	return `document.querySelector('[data-testid=` + jsString(id) + `]')`
}

// byXPath is JavaScript for the first element an XPath expression finds.
func byXPath(xpath string) string {
	return `document.evaluate(` + jsString(xpath) + `, document, null, XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue`
}

// insertText types text at the focus as one input, the way an input method
// does: code editors (CodeMirror) take it as is, without the brackets and
// quotes they close by themselves when the keys are typed one by one.
func insertText(text string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		_, err := cdp.Call(ctx, t, input.InsertText, input.InsertTextParams{Text: text})
		return err
	})
}

// jsString quotes s for JavaScript source.
func jsString(s string) string {
	q, _ := json.Marshal(s)
	return string(q)
}

// copyFile copies src to dst (created or truncated).
func copyFile(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.WriteFile(dst, data, 0o644)
}
