package webui

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.temporal.io/sdk/client"

	"github.com/chromedp/chromedp"

	"github.com/cbtflow/cbtflow/lab"
	"github.com/cbtflow/cbtflow/testkit/stack"
	"github.com/cbtflow/cbtflow/testkit/stacktest"
	"github.com/cbtflow/cbtflow/workflows"
)

var updateDocImage = flag.Bool("update-doc-image", false,
	"copy the screenshot of the workflow list filtered by CbtflowVM to docs/images/webui-backups.png (for the README)")

// docImage is the README's screenshot, relative to this package.
const docImage = "../../docs/images/webui-backups.png"

func TestMain(m *testing.M) { stacktest.Main(m) }

const (
	// vm is the VM the test backs up from the Web UI, as the README's
	// example does; otherVM gets a backup of its own from the Temporal
	// client, which the CbtflowVM filter must hide.
	vm      = lab.SecondDiskVM
	otherVM = "DC0_H0_VM1"
)

// startForm is what the Start Workflow form holds.
type startForm struct {
	ID      string `json:"id"`
	Queue   string `json:"queue"`
	Type    string `json:"type"`
	VM      string `json:"vm"` // the input's only field
	Enabled bool   `json:"enabled"`
}

// workflowPage is what a workflow's page shows (statusJS).
type workflowPage struct {
	ID     string `json:"id"`
	Status string `json:"status"`
}

// progressAnswer is the part of the progress query's answer the test checks.
type progressAnswer struct {
	BackupID string          `json:"backup_id"`
	Phase    workflows.Phase `json:"phase"`
	Disks    []struct {
		Key   int32               `json:"key"`
		Phase workflows.DiskPhase `json:"phase"`
	} `json:"disks"`
}

// toastSeen is a notice the UI showed (toastWatchJS).
type toastSeen struct {
	Text string `json:"text"`
	Href string `json:"href"`
}

// row is one row of the Web UI's workflow list: column title to text.
type row map[string]string

// TestWebUIBackup is the acceptance test of the Web UI as the README
// describes it: a backup started with the Start Workflow form (type Backup,
// task queue cbtflow, input {"vm": ...}) completes; the workflow list
// filtered by CbtflowVM shows it and hides another VM's backup; the BackupVM
// workflow's progress query, run in its Queries tab, answers its backup ID
// in phase completed (committed, its snapshot removed). Every step leaves a
// screenshot in STATE/webui (and in the test's artifacts: go test
// -artifacts -outputdir DIR keeps them).
func TestWebUIBackup(t *testing.T) {
	exe := chromiumPath(t) // first: without a browser, fail before starting anything
	s := stacktest.New(t, stack.Options{WebUI: true})
	ui := "http://" + s.UIAddr()
	shots := filepath.Join(s.Dir(), "webui")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	began := time.Now()
	lap := func(what string) { t.Logf("%-34s %6.1fs", what, time.Since(began).Seconds()) }

	waitHTTP(t, ui+"/", 2*time.Minute)
	b := newBrowser(t, exe, shots)
	t.Cleanup(func() { keepArtifacts(t, shots) })
	lap("stack, Web UI and chromium up")

	// Another VM's backup, started by the client, for the filter to hide.
	other, err := s.Client().ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID: "client-backup-" + otherVM, TaskQueue: workflows.TaskQueue,
	}, workflows.Backup, workflows.BackupInput{VM: otherVM})
	if err != nil {
		t.Fatal(err)
	}

	// 1. The Start Workflow form.
	id := "webui-backup-" + time.Now().UTC().Format("20060102T150405.000")
	input := fmt.Sprintf(`{"vm": %q}`, vm)
	b.must("open the workflow list", chromedp.Navigate(ui+"/namespaces/"+stack.Namespace+"/workflows"))
	waitJS(b, "the workflow list", rowsJS, stepTimeout, func(r []row) bool { return r != nil })
	b.shot("workflow-list")
	b.click("open the Start Workflow form", byXPath(`//main//a[normalize-space(.)="Start Workflow"]`))
	editor := `document.querySelector('main [contenteditable="true"][data-language="json"]')`
	b.must("fill in the Start Workflow form",
		chromedp.WaitVisible(chromedp.CSS(`[data-testid="workflowId"]`)),
		chromedp.SendKeys(chromedp.CSS(`[data-testid="workflowId"]`), id),
		chromedp.SendKeys(chromedp.CSS(`[data-testid="taskQueue"]`), workflows.TaskQueue),
		chromedp.SendKeys(chromedp.CSS(`[data-testid="workflowType"]`), "Backup"),
		chromedp.Focus(chromedp.CSS(`main [contenteditable="true"][data-language="json"]`)),
	)
	waitJS(b, "the input editor has the focus", `(() => { const ed = `+editor+`; return !!ed && ed.contains(document.activeElement); })()`,
		stepTimeout, func(focused bool) bool { return focused })
	b.must("type the input", insertText(input))
	// Leave the editor (the UI then formats the JSON, which makes the form
	// taller): the form holds what was typed, and its button is enabled.
	if _, err := eval[bool](b, `(document.activeElement && document.activeElement.blur(), true)`); err != nil {
		b.fatal(err)
	}
	waitJS(b, "the Start Workflow form filled in", `(() => {
		const v = (id) => (document.querySelector('[data-testid="' + id + '"]') || {}).value;
		const ed = `+editor+`;
		let input = null;
		try { input = JSON.parse(ed.textContent); } catch (e) {}
		const btn = document.querySelector('[data-testid="start-workflow-button"]');
		return {id: v("workflowId"), queue: v("taskQueue"), type: v("workflowType"),
			vm: input && Object.keys(input).length === 1 ? input.vm : null, enabled: !!btn && !btn.disabled};
	})()`, stepTimeout, func(f startForm) bool {
		return f.ID == id && f.Queue == workflows.TaskQueue && f.Type == "Backup" && f.VM == vm && f.Enabled
	})
	b.shot("start-workflow-form")
	// The UI answers with a toast, which goes after a few seconds: a
	// watcher set up before the click records it.
	if _, err := eval[bool](b, toastWatchJS); err != nil {
		b.fatal(err)
	}
	b.click("start the workflow", byTestID("start-workflow-button"))
	var toast toastSeen
	waitJS(b, "the UI says the workflow started", `window.__cbtflowToasts`, stepTimeout, func(ts []toastSeen) bool {
		i := slices.IndexFunc(ts, func(t toastSeen) bool { return strings.Contains(t.Text, "Workflow started successfully") })
		if i >= 0 {
			toast = ts[i]
		}
		return i >= 0
	})
	b.shot("workflow-started-toast")
	desc, err := s.Client().DescribeWorkflow(ctx, id, "")
	if err != nil {
		t.Fatalf("the UI says the workflow started, Temporal does not know %s: %v", id, err)
	}
	backupRun := desc.RawResponse.GetWorkflowExecutionInfo().GetExecution().GetRunId()
	if info := desc.RawResponse.GetWorkflowExecutionInfo(); info.GetType().GetName() != "Backup" || info.GetTaskQueue() != workflows.TaskQueue {
		t.Fatalf("the UI started %s as a %q on task queue %q, want Backup on %s", id, info.GetType().GetName(), info.GetTaskQueue(), workflows.TaskQueue)
	}
	// The notice links to the new run's page: follow it.
	if wantHref := strings.TrimPrefix(workflowURL(ui, id, backupRun), ui); toast.Href != wantHref {
		t.Fatalf("the UI's notice %q links to %q, want %q", toast.Text, toast.Href, wantHref)
	}
	b.must("open the started workflow", chromedp.Navigate(ui+toast.Href))
	waitJS(b, "the UI shows the started workflow", statusJS, stepTimeout, func(st workflowPage) bool { return st.ID == id })
	b.shot("backup-started")
	lap("backup started from the form")

	// 2. The backup completes: waited for with the client, then seen in the UI.
	var res workflows.BackupResult
	if err := s.Client().GetWorkflow(ctx, id, "").Get(ctx, &res); err != nil {
		b.postMortem()
		t.Fatalf("the backup started from the Web UI (%s): %v", id, err)
	}
	if res.VM != vm || res.BackupID == "" || res.Result == nil || res.Result.BackupID != res.BackupID ||
		!strings.HasPrefix(res.WorkflowID, "backup/") || res.RunID == "" || res.Skipped != "" {
		t.Fatalf("the backup started from the Web UI: result %+v, want a committed backup of %s by a BackupVM child", res, vm)
	}
	if err := other.Get(ctx, nil); err != nil {
		t.Fatalf("the client's backup of %s: %v", otherVM, err)
	}
	lap("backups completed")
	b.must("open the Backup workflow", chromedp.Navigate(workflowURL(ui, id, "")))
	waitJS(b, "the Backup workflow's page says Completed", statusJS, stepTimeout, func(st workflowPage) bool {
		return st.ID == id && st.Status == "Completed"
	})
	b.shot("backup-completed")

	// 3. The workflow list filtered by CbtflowVM.
	query := fmt.Sprintf(`CbtflowVM="%s"`, vm)
	listURL := ui + "/namespaces/" + stack.Namespace + "/workflows?query=" + url.QueryEscape(query)
	// Both carry CbtflowVM: the BackupVM child, and the Backup workflow
	// itself (since commit 575ab91).
	want := map[string]row{
		res.WorkflowID: {"Workflow ID": res.WorkflowID, "Type": "BackupVM", "Status": "Completed", "Run ID": res.RunID},
		id:             {"Workflow ID": id, "Type": "Backup", "Status": "Completed", "Run ID": backupRun},
	}
	listed := func(rows []row) bool {
		for wid, w := range want {
			if !slices.ContainsFunc(rows, func(r row) bool { return r["Workflow ID"] == wid && r["Status"] == w["Status"] }) {
				return false
			}
		}
		return true
	}
	var rows []row
	deadline := time.Now().Add(3 * time.Minute)
	for {
		// Visibility follows the workflows' ends closely, not at once: the
		// list is loaded again until it shows the backup.
		b.must("open the workflow list filtered by "+query, chromedp.Navigate(listURL))
		rows = waitJS(b, "the filtered workflow list", rowsJS, stepTimeout, func(r []row) bool { return r != nil })
		if listed(rows) || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	listShot := b.shot("workflows-filtered-by-CbtflowVM")
	t.Logf("the list filtered by %s: %v", query, rows)
	for wid, w := range want {
		i := slices.IndexFunc(rows, func(r row) bool { return r["Workflow ID"] == wid })
		if i < 0 {
			b.postMortem()
			t.Fatalf("the list filtered by %s does not show %s (%s); rows: %v", query, wid, w["Type"], rows)
		}
		for col, v := range w {
			if rows[i][col] != v {
				t.Errorf("the list filtered by %s: %s: %s is %q, want %q", query, wid, col, rows[i][col], v)
			}
		}
	}
	for _, r := range rows {
		if r["Workflow ID"] != id && r["Workflow ID"] != res.WorkflowID {
			t.Errorf("the list filtered by %s shows a workflow that is not the backup of %s: %v", query, vm, r)
		}
	}
	if filtered, err := eval[string](b, `document.querySelector("main").innerText`); err != nil || !strings.Contains(filtered, "CbtflowVM") {
		t.Errorf("the filtered list does not show its CbtflowVM filter (err %v)", err)
	}

	// 4. The BackupVM workflow's page, and its progress query.
	b.click("open the BackupVM workflow from the list", `document.querySelector(`+jsString(
		`tr[data-testid="workflows-summary-configurable-table-row"] a[href*=`+jsString("/"+url.PathEscape(res.WorkflowID)+"/")+`]`)+`)`)
	waitJS(b, "the BackupVM workflow's page says Completed", statusJS, stepTimeout, func(st workflowPage) bool {
		return st.ID == res.WorkflowID && st.Status == "Completed"
	})
	b.shot("backupvm-detail")
	b.click("open the Queries tab", byTestID("queries-tab"))
	b.click("open the query types", byTestID("query-select-button"))
	b.click("choose the progress query", byXPath(fmt.Sprintf(`//ul[@id="query-select-select"]/li[@role="option"][.//span[normalize-space(.)=%s]]`, jsString(workflows.QueryProgress))))
	waitJS(b, "the progress query chosen", `(document.querySelector('[data-testid="query-select"]') || {}).value`, stepTimeout,
		func(v string) bool { return v == workflows.QueryProgress })
	b.click("run the progress query", byXPath(`//main//button[normalize-space(.)="Run Query"]`))
	var answer progressAnswer
	waitJS(b, "the progress query's answer", `(() => {
		const r = document.querySelector('[data-testid="query-result"] [role="textbox"]');
		if (!r) return null;
		// The whole document from CodeMirror's view when it can be reached
		// (a long answer is drawn only in part), else the lines drawn.
		const v = r.cmView && r.cmView.view;
		const text = v && v.state ? v.state.doc.toString() : r.textContent;
		try { return JSON.parse(text); } catch (e) { return null; }
	})()`, stepTimeout, func(v *progressAnswer) bool {
		if v == nil {
			return false
		}
		answer = *v
		return true
	})
	b.shot("backupvm-progress-query")
	// A finished BackupVM answers its last phase: completed, that is
	// committed and its snapshot removed; both disks done.
	t.Logf("the progress query in the UI answers: %+v", answer)
	if answer.BackupID != res.BackupID || answer.Phase != workflows.PhaseCompleted {
		t.Errorf("the progress query in the UI answers backup %q in phase %q, want %q in phase %q", answer.BackupID, answer.Phase, res.BackupID, workflows.PhaseCompleted)
	}
	if len(answer.Disks) != 2 || answer.Disks[0].Key != 204 || answer.Disks[1].Key != 205 ||
		answer.Disks[0].Phase != workflows.DiskDone || answer.Disks[1].Phase != workflows.DiskDone {
		t.Errorf("the progress query in the UI answers disks %+v, want 204 and 205 %s", answer.Disks, workflows.DiskDone)
	}
	lap("list, detail page and query checked")

	if *updateDocImage {
		if err := copyFile(listShot, docImage); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", docImage)
	}
}

// workflowURL is the Web UI's page of a workflow (its newest run when run
// is empty).
func workflowURL(ui, id, run string) string {
	u := ui + "/namespaces/" + stack.Namespace + "/workflows/" + url.PathEscape(id)
	if run != "" {
		u += "/" + url.PathEscape(run) + "/history"
	}
	return u
}

// statusJS reads a workflow page: the ID in its heading and the status badge
// before it.
const statusJS = `(() => {
	const h = document.querySelector('[data-testid="workflow-id-heading"]');
	if (!h) return {id: "", status: ""};
	const header = h.closest("header");
	const statuses = ["Running", "Completed", "Failed", "Canceled", "Terminated", "TimedOut", "Timed Out", "ContinuedAsNew", "Continued As New"];
	let status = "";
	for (const el of (header ? header.querySelectorAll("span") : [])) {
		const t = el.textContent.trim();
		if (statuses.includes(t) && el.offsetParent !== null) { status = t; break; }
	}
	// The heading's first span is the ID (a hidden "Click to copy" follows).
	return {id: (h.querySelector("span") || h).textContent.trim(), status};
})()`

// toastWatchJS records, in window.__cbtflowToasts, the text (and link) of
// every element the page adds from now on with a short text: the UI's
// notices go after a few seconds, too fast for polling on a busy machine.
const toastWatchJS = `(() => {
	window.__cbtflowToasts = [];
	const seen = new Set();
	new MutationObserver((muts) => {
		for (const m of muts) {
			for (const n of m.addedNodes) {
				const el = n.nodeType === Node.ELEMENT_NODE ? n : n.parentElement;
				if (!el) continue;
				const text = el.textContent.trim().replace(/\s+/g, " ");
				if (!text || text.length > 200 || seen.has(text)) continue;
				seen.add(text);
				const a = el.querySelector("a[href]") || el.closest("a[href]");
				window.__cbtflowToasts.push({text, href: a ? a.getAttribute("href") : ""});
			}
		}
	}).observe(document.body, {subtree: true, childList: true, characterData: true});
	return true;
})()`

// rowsJS reads the workflow list: every row as column title to text, [] for
// an empty list, null while the list is loading.
const rowsJS = `(() => {
	const table = document.querySelector("main table");
	const rows = document.querySelectorAll('tr[data-testid="workflows-summary-configurable-table-row"]');
	if (!table) return null;
	if (rows.length === 0) {
		return /No Workflows/i.test(document.querySelector("main").innerText) ? [] : null;
	}
	const titles = Array.from(table.querySelectorAll('th[data-testid^="workflows-summary-table-header-cell-"]'))
		.map(th => th.getAttribute("data-testid").slice("workflows-summary-table-header-cell-".length));
	return Array.from(rows).map(r => {
		const cells = r.querySelectorAll('td[data-testid="workflows-summary-table-body-cell"]');
		const o = {};
		titles.forEach((t, i) => { o[t] = cells[i] ? cells[i].textContent.trim() : ""; });
		return o;
	});
})()`

// keepArtifacts copies the screenshots, pages and logs of the browser to
// the test's artifact folder (kept with go test -artifacts).
func keepArtifacts(t *testing.T, dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	out := t.ArtifactDir()
	for _, e := range entries {
		if e.Type().IsRegular() {
			_ = copyFile(filepath.Join(dir, e.Name()), filepath.Join(out, e.Name()))
		}
	}
}
