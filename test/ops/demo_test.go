package ops

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/internal/clustertest"
	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

// lockedBuffer collects the demo's output while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// demoExit is closed (c) when the demo has exited, with its Wait error.
type demoExit struct {
	c   chan struct{}
	err error
}

// startDemo runs ops/demo/demo.sh with the test's binaries and a namespace
// prefix of its own. The script gets its own process group so that the
// test's signals reach only the script (as a Ctrl-C reaches the shell).
func startDemo(t *testing.T, ns string) (*exec.Cmd, *lockedBuffer, *demoExit) {
	t.Helper()
	netlab.RequireRoot(t)
	bins := clustertest.Build(t)
	out := &lockedBuffer{}
	cmd := exec.Command("bash", filepath.Join(clustertest.RepoRoot(), "ops", "demo", "demo.sh"))
	cmd.Env = append(os.Environ(), "DEMO_BIN="+filepath.Dir(bins.Vblade), "DEMO_NS="+ns)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := &demoExit{c: make(chan struct{})}
	go func() { done.err = cmd.Wait(); close(done.c) }()
	t.Cleanup(func() {
		// A demo that outlived its test is killed by PID; its own trap
		// cannot run then, so the namespaces are checked (and removed) below.
		select {
		case <-done.c:
		default:
			_ = cmd.Process.Kill()
			<-done.c
		}
		for _, n := range demoNamespaces(t, ns) {
			t.Errorf("namespace %s left behind; removing it", n)
			_ = exec.Command("ip", "netns", "del", n).Run()
		}
	})
	return cmd, out, done
}

func demoNamespaces(t *testing.T, prefix string) []string {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatalf("ip netns list: %v", err)
	}
	var left []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], prefix+"-") {
			left = append(left, f[0])
		}
	}
	return left
}

// processesUsing lists the PIDs whose command line mentions dir (the demo's
// run directory is in every node's and the workload's arguments).
func processesUsing(dir string) []string {
	var pids []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(dir)) {
			pids = append(pids, filepath.Base(filepath.Dir(p)))
		}
	}
	return pids
}

var runDirRe = regexp.MustCompile(`node configs in (\S+)`)

// TestDemo runs `make demo`'s script end to end: it must pass within the two
// minutes the README promises and say what the operator is told it says.
func TestDemo(t *testing.T) {
	ns := fmt.Sprintf("vbdt-%d", os.Getpid())
	start := time.Now()
	_, out, done := startDemo(t, ns)
	var err error
	select {
	case <-done.c:
		err = done.err
	case <-time.After(2 * time.Minute):
		t.Fatalf("demo still running after 2 minutes:\n%s", out)
	}
	took := time.Since(start)
	text := out.String()
	t.Logf("demo took %v; output:\n%s", took.Round(100*time.Millisecond), text)
	if err != nil {
		t.Fatalf("demo failed: %v", err)
	}
	for _, re := range []string{
		`cluster formed: leader is n[1-3]`,
		`workload running`,
		`SIGKILL the leader n[1-3]`,
		`new leader: n[1-3] \(elected \d+ ms after the kill\)`,
		`workload: \d+ ops, \d+ reads verified, 0 errors, 0 mismatches`,
		`longest stall the initiator saw: \d+ ms`,
		`leader: n[1-3]  term: \d+`, // cluster status table
		`e1\.0 .* n[1-3] `,
		`demo passed`,
		`all clean: no namespaces, no processes left`,
	} {
		if !regexp.MustCompile(re).MatchString(text) {
			t.Errorf("demo output lacks %q", re)
		}
	}
	if m := runDirRe.FindStringSubmatch(text); m == nil {
		t.Error("demo did not say where its files are")
	} else if _, err := os.Stat(m[1]); err == nil {
		t.Errorf("demo left its run directory %s behind", m[1])
	}
}

// TestDemoInterrupted sends SIGINT (Ctrl-C) while the workload runs: the
// demo must stop its processes, remove its namespaces, and exit 130.
func TestDemoInterrupted(t *testing.T) {
	ns := fmt.Sprintf("vbdi-%d", os.Getpid())
	cmd, out, done := startDemo(t, ns)
	deadline := time.Now().Add(90 * time.Second)
	for !strings.Contains(out.String(), "workload running") {
		select {
		case <-done.c:
			t.Fatalf("demo ended (%v) before the workload ran:\n%s", done.err, out)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("demo never got its workload running:\n%s", out)
		}
	}
	m := runDirRe.FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("demo did not say where its files are:\n%s", out)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	var err error
	select {
	case <-done.c:
		err = done.err
	case <-time.After(60 * time.Second):
		t.Fatalf("demo did not stop within 60 s of SIGINT:\n%s", out)
	}
	text := out.String()
	t.Logf("output:\n%s", text)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 130 {
		t.Errorf("demo exited with %v after SIGINT, want status 130", err)
	}
	if !strings.Contains(text, "all clean") {
		t.Error("demo did not report a clean teardown")
	}
	if left := demoNamespaces(t, ns); len(left) > 0 {
		t.Errorf("namespaces left after SIGINT: %v", left)
	}
	if pids := processesUsing(m[1]); len(pids) > 0 {
		t.Errorf("processes of the demo still running after SIGINT: %v", pids)
	}
	// The run directory is kept after an interruption, for its logs.
	_ = os.RemoveAll(m[1])
}
