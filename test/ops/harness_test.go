// Package ops tests the operator-facing behaviour of whole processes: the
// `make demo` script, and a planned stop (SIGTERM) of a leading `vblade node`
// with an initiator running.
//
// Network rule: every AoE socket these tests open (vblade nodes and the
// vbladectl initiator) is on an interface netlab or the demo script created
// in its own namespaces; Raft runs on those namespaces' addresses.
package ops

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

type binaries struct{ vblade, vbladectl string }

var (
	buildOnce sync.Once
	buildRes  binaries
	buildErr  error
)

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// buildBinaries builds ./cmd/vblade and ./cmd/vbladectl once per test binary
// into a temporary directory (VBHA_BIN_DIR points at prebuilt ones). The
// tests never use bin/: another build may be replacing it while they run.
func buildBinaries(t *testing.T) binaries {
	t.Helper()
	buildOnce.Do(func() {
		if d := os.Getenv("VBHA_BIN_DIR"); d != "" {
			buildRes = binaries{filepath.Join(d, "vblade"), filepath.Join(d, "vbladectl")}
			return
		}
		dir, err := os.MkdirTemp("", "vbha-ops-it-")
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", dir+string(os.PathSeparator), "./cmd/vblade", "./cmd/vbladectl")
		cmd.Dir = repoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/vblade ./cmd/vbladectl: %v\n%s", err, out)
			return
		}
		buildRes = binaries{filepath.Join(dir, "vblade"), filepath.Join(dir, "vbladectl")}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildRes
}

// vnode is one `vblade node` process in its namespace.
type vnode struct {
	id       string
	host     *netlab.Host
	raftAddr string
	sock     string
	cfgPath  string
	cmd      *exec.Cmd
	http     *http.Client
}

type cluster struct {
	t     *testing.T
	lan   *netlab.LAN
	bins  binaries
	dir   string
	nodes []*vnode
	ini   *netlab.Host // the initiator's namespace
}

// newCluster builds a LAN of n node hosts plus one initiator host and writes
// each node's configuration (one export, e1.0, over a sparse image).
func newCluster(t *testing.T, n int, subnet int, imgSize int64, extra string) *cluster {
	lan := netlab.New(t, netlab.Options{Hosts: n + 1, Subnet: subnet})
	c := &cluster{t: t, lan: lan, bins: buildBinaries(t), dir: t.TempDir(), ini: lan.Host(n + 1)}
	for i := 1; i <= n; i++ {
		h := lan.Host(i)
		v := &vnode{id: fmt.Sprintf("n%d", i), host: h, raftAddr: fmt.Sprintf("%s:7000", h.IP()),
			sock: filepath.Join(c.dir, fmt.Sprintf("n%d.sock", i))}
		sock := v.sock
		v.http = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", sock)
			}}}
		img := filepath.Join(c.dir, v.id+".img")
		f, err := os.Create(img)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(imgSize); err != nil {
			t.Fatal(err)
		}
		f.Close()
		v.cfgPath = filepath.Join(c.dir, v.id+".toml")
		// insecure: the node port is on a private bridge that lives as long
		// as the test; TLS is not what is under test here.
		cfg := fmt.Sprintf(`node_id = %q
data_dir = %q
raft_addr = %q
admin_socket = %q
cluster_name = "vbha-ops"
log_level = "info"
insecure = true
%s
[[export]]
shelf = 1
slot = 0
netif = %q
path = %q
`, v.id, filepath.Join(c.dir, v.id+".data"), v.raftAddr, v.sock, extra, h.If, img)
		if err := os.WriteFile(v.cfgPath, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		c.nodes = append(c.nodes, v)
	}
	t.Cleanup(func() {
		if t.Failed() {
			c.dumpLogs()
		}
	})
	return c
}

func (c *cluster) dumpLogs() {
	files, _ := filepath.Glob(filepath.Join(c.lan.LogDir(), "*"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		c.t.Logf("---- last lines of %s:\n%s", f, strings.Join(lines, "\n"))
	}
}

// start runs `vblade node` in v's namespace and waits for its admin socket.
func (c *cluster) start(v *vnode) {
	c.t.Helper()
	v.cmd = c.lan.Start(v.host.NS, c.bins.vblade, "node", "-c", v.cfgPath)
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := c.status(v); err == nil {
			return
		}
		if ex, werr := c.lan.Exited(v.cmd); ex {
			_, se := c.lan.Output(v.cmd)
			c.t.Fatalf("%s exited at start (%v):\n%s", v.id, werr, se)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: admin socket %s never answered", v.id, v.sock)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ctl runs `vbladectl cluster SUB --socket S ARGS...` in v's namespace.
func (c *cluster) ctl(v *vnode, sub string, args ...string) string {
	c.t.Helper()
	a := append([]string{c.bins.vbladectl, "cluster", sub, "--socket", v.sock}, args...)
	out, err := c.lan.Exec(v.host.NS, a...)
	if err != nil {
		c.t.Fatalf("vbladectl cluster %s %s on %s: %v\n%s", sub, strings.Join(args, " "), v.id, err, out)
	}
	return string(out)
}

// form starts every node, initialises the cluster on the first and joins
// the others, and returns the leader.
func (c *cluster) form() *vnode {
	c.t.Helper()
	for _, v := range c.nodes {
		c.start(v)
	}
	c.ctl(c.nodes[0], "init")
	for _, v := range c.nodes[1:] {
		c.ctl(v, "join", "--timeout", "60s", c.nodes[0].raftAddr)
	}
	return c.waitLeader(nil, 15*time.Second)
}

// nodeStatus is the part of the admin API's GET /v1/status the tests read.
type nodeStatus struct {
	ID           string `json:"id"`
	State        string `json:"state"`
	Term         uint64 `json:"term"`
	CommitIndex  uint64 `json:"commit_index"`
	AppliedIndex uint64 `json:"applied_index"`
	LeaderID     string `json:"leader_id"`
	GateOpen     bool   `json:"gate_open"`
}

func (c *cluster) status(v *vnode) (*nodeStatus, error) {
	resp, err := v.http.Get("http://vblade/v1/status")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	var s nodeStatus
	return &s, json.NewDecoder(resp.Body).Decode(&s)
}

func (c *cluster) running() []*vnode {
	var out []*vnode
	for _, v := range c.nodes {
		if v.cmd == nil {
			continue
		}
		if ex, _ := c.lan.Exited(v.cmd); !ex {
			out = append(out, v)
		}
	}
	return out
}

// waitLeader waits until exactly one running node other than not leads with
// its gate open (it answers the initiator).
func (c *cluster) waitLeader(not *vnode, timeout time.Duration) *vnode {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var leaders []*vnode
		for _, v := range c.running() {
			if v == not {
				continue
			}
			if s, err := c.status(v); err == nil && s.State == "leader" && s.GateOpen {
				leaders = append(leaders, v)
			}
		}
		if len(leaders) == 1 {
			return leaders[0]
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("no single serving leader after %v (%d candidates)", timeout, len(leaders))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// benchResult is the part of `vbladectl bench --json` the tests read.
type benchResult struct {
	Ops             int64    `json:"ops"`
	Reads           int64    `json:"reads"`
	Writes          int64    `json:"writes"`
	Errors          int64    `json:"errors"`
	FirstErrors     []string `json:"first_errors"`
	Verified        int64    `json:"verified"`
	Mismatches      int64    `json:"mismatches"`
	FirstMismatches []string `json:"first_mismatches"`
	Retransmits     uint64   `json:"retransmits"`
	StallMs         float64  `json:"longest_stall_ms"`
	StallStart      string   `json:"longest_stall_start"`
	StallEnd        string   `json:"longest_stall_end"`
}
