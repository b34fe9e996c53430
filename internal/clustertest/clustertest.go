// Package clustertest is the shared harness of the process-level tests
// (test/cluster, test/ops, test/faults, test/storm): real `vblade node`
// processes on a private internal/netlab LAN, driven by PID and through
// vbladectl, and polled through the node admin API.
//
// A Cluster is a netlab LAN plus one Node per node host. Each node has a
// TOML configuration written from Options.Config (Cluster.WriteConfig), an
// admin socket in the cluster's directory, and Raft on its namespace's
// 10.99.<Subnet>.N address (or on 127.0.0.1 in the root namespace, see
// Options.RootNamespace).
//
// Network rule: every interface a node or vbladectl uses is one netlab
// created for the test; nothing here touches the host's own links.
//
// Test-specific machinery (fault injection, workloads, sniffers, frame
// senders) stays in the test packages.
package clustertest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/internal/netlab"
	"github.com/vblade-ha/vblade-ha/node"
)

// RaftPort is the Raft port of every node in a host namespace.
const RaftPort = 7000

// ---------------------------------------------------------------- binaries

// Binaries are the paths of the vblade and vbladectl executables under test.
type Binaries struct{ Vblade, Vbladectl string }

var (
	buildOnce sync.Once
	buildRes  Binaries
	buildErr  error
)

// RepoRoot is the root of the source tree.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Build builds ./cmd/vblade and ./cmd/vbladectl into a temporary directory
// once per test binary ($VBHA_BIN_DIR points at prebuilt ones instead). It
// never uses bin/: another build may be replacing it while tests run.
func Build(tb testing.TB) Binaries {
	tb.Helper()
	buildOnce.Do(func() {
		if d := os.Getenv("VBHA_BIN_DIR"); d != "" {
			buildRes = Binaries{filepath.Join(d, "vblade"), filepath.Join(d, "vbladectl")}
			return
		}
		dir, err := os.MkdirTemp("", "vbha-test-bin-")
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", dir+string(os.PathSeparator), "./cmd/vblade", "./cmd/vbladectl")
		cmd.Dir = RepoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/vblade ./cmd/vbladectl: %v\n%s", err, out)
			return
		}
		buildRes = Binaries{filepath.Join(dir, "vblade"), filepath.Join(dir, "vbladectl")}
	})
	if buildErr != nil {
		tb.Fatal(buildErr)
	}
	return buildRes
}

// ---------------------------------------------------------------- options

// Config is what every node's TOML file says besides its own paths and
// addresses. Empty strings and zero numbers leave a key out (the node's
// default applies).
type Config struct {
	ClusterName string // cluster_name
	MACMode     string // mac_mode: virtual or node
	LogLevel    string // log_level
	// TLS gives every node a certificate, the CA and the join token
	// (node.GenerateCerts into <Dir>/pki, CA named after ClusterName);
	// false writes `insecure = true` (the private LAN is the boundary).
	TLS bool
	// Extra lines go verbatim before [[export]] (timeouts, snapshots...).
	Extra string
	// The one export: shelf.slot on the node's LAN interface, over Node.Img.
	Shelf, Slot int
	Bufcnt      int // bufcnt of the export (0: left out)
}

// Options configures a Cluster.
type Options struct {
	Nodes      int // nodes n1..nN
	ExtraHosts int // host namespaces after the nodes' (initiators), no node on them
	RootPorts  int // netlab root ports (initiators, sniffers)
	Subnet     int // netlab subnet: 10.99.<Subnet>.0/24
	// RootNamespace runs the nodes in the root namespace instead of host
	// namespaces: node i serves on root port i (so RootPorts must count
	// them, and the ports after them are free) and runs Raft on a free
	// 127.0.0.1 port.
	RootNamespace bool
	// Dir holds configs, sockets, data directories and default images;
	// "": t.TempDir().
	Dir string
	// ImageSize > 0: New creates a sparse image of that size for every node
	// (<Dir>/nI.img) and writes every node's configuration. 0: the caller
	// sets Node.Img (WriteImage) and calls WriteConfig.
	ImageSize int64
	Config    Config
	// StatusTimeout bounds one admin status request (0: 2 s).
	StatusTimeout time.Duration
	// LeaderPoll is how often WaitLeader polls (0: 50 ms).
	LeaderPoll time.Duration
	// DumpLines: on failure, the last DumpLines lines of every non-empty
	// log file are logged (0: 60; negative: no dump).
	DumpLines int
}

// ---------------------------------------------------------------- cluster

// Node is one `vblade node` process and its files.
type Node struct {
	Index    int    // 1-based
	ID       string // n<Index>
	NS       string // namespace ("" : root namespace)
	Netif    string // the export's interface (inside NS)
	Host     *netlab.Host
	RaftAddr string
	Sock     string // admin socket
	CfgPath  string
	DataDir  string
	Img      string

	http *http.Client

	mu     sync.Mutex
	cmd    *exec.Cmd
	paused bool
}

// Cmd is the node's running process (nil when stopped).
func (n *Node) Cmd() *exec.Cmd {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd
}

// Running reports whether n was started (and not stopped) and is not paused.
func (n *Node) Running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd != nil && !n.paused
}

// IDs lists the nodes' ids.
func IDs(ns []*Node) []string {
	var s []string
	for _, n := range ns {
		s = append(s, n.ID)
	}
	return s
}

// Cluster is a LAN with nodes on it.
type Cluster struct {
	T     testing.TB
	LAN   *netlab.LAN
	Bins  Binaries
	Dir   string
	Nodes []*Node
	TLS   string // certificate directory ("" without TLS)
	opts  Options
}

// New builds the LAN, the nodes' paths and addresses, the certificates
// (Config.TLS) and, with ImageSize, images and configurations. Nodes are
// not started. On failure the node logs are dumped (DumpLines).
func New(t testing.TB, o Options) *Cluster {
	t.Helper()
	netlab.RequireRoot(t)
	if o.StatusTimeout == 0 {
		o.StatusTimeout = 2 * time.Second
	}
	if o.LeaderPoll == 0 {
		o.LeaderPoll = 50 * time.Millisecond
	}
	if o.DumpLines == 0 {
		o.DumpLines = 60
	}
	c := &Cluster{T: t, Bins: Build(t), Dir: o.Dir, opts: o}
	if c.Dir == "" {
		c.Dir = t.TempDir()
	}
	hosts := o.Nodes + o.ExtraHosts
	if o.RootNamespace {
		hosts = o.ExtraHosts
	}
	c.LAN = netlab.New(t, netlab.Options{Hosts: hosts, RootPorts: o.RootPorts, Subnet: o.Subnet})
	for i := 1; i <= o.Nodes; i++ {
		n := &Node{Index: i, ID: fmt.Sprintf("n%d", i),
			Sock:    filepath.Join(c.Dir, fmt.Sprintf("n%d.sock", i)),
			CfgPath: filepath.Join(c.Dir, fmt.Sprintf("n%d.toml", i)),
			DataDir: filepath.Join(c.Dir, fmt.Sprintf("n%d.data", i)),
			Img:     filepath.Join(c.Dir, fmt.Sprintf("n%d.img", i)),
		}
		if o.RootNamespace {
			n.Netif = c.LAN.Root[i-1].Name
			n.RaftAddr = freeAddr(t)
		} else {
			n.Host = c.LAN.Host(i)
			n.NS, n.Netif = n.Host.NS, n.Host.If
			n.RaftAddr = fmt.Sprintf("%s:%d", n.Host.IP(), RaftPort)
		}
		sock := n.Sock
		n.http = &http.Client{Timeout: o.StatusTimeout, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", sock)
			}}}
		c.Nodes = append(c.Nodes, n)
	}
	if o.Config.TLS {
		c.makeCerts()
	}
	if o.ImageSize > 0 {
		for _, n := range c.Nodes {
			c.WriteImage(n, n.Img, nil, o.ImageSize)
			c.WriteConfig(n)
		}
	}
	if o.DumpLines > 0 {
		t.Cleanup(func() {
			if t.Failed() {
				c.DumpLogs(o.DumpLines)
			}
		})
	}
	return c
}

// Node returns node i (1-based).
func (c *Cluster) Node(i int) *Node { return c.Nodes[i-1] }

func freeAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func (c *Cluster) makeCerts() {
	dir := filepath.Join(c.Dir, "pki")
	var ids, hosts []string
	for _, n := range c.Nodes {
		h, _, _ := net.SplitHostPort(n.RaftAddr)
		ids, hosts = append(ids, n.ID), append(hosts, h)
	}
	if _, err := node.GenerateCerts(node.CertsOptions{Dir: dir, Cluster: c.opts.Config.ClusterName, Nodes: ids, Hosts: hosts}); err != nil {
		c.T.Fatalf("certificates: %v", err)
	}
	c.TLS = dir
}

// WriteImage sets n's image to path (relative: in Dir) and creates it with
// content, or (content nil) as a sparse file of size bytes.
func (c *Cluster) WriteImage(n *Node, path string, content []byte, size int64) {
	c.T.Helper()
	if !filepath.IsAbs(path) {
		path = filepath.Join(c.Dir, path)
	}
	n.Img = path
	if content != nil {
		if err := os.WriteFile(path, content, 0o600); err != nil {
			c.T.Fatal(err)
		}
		return
	}
	f, err := os.Create(path)
	if err != nil {
		c.T.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		c.T.Fatal(err)
	}
}

// WriteConfig writes n's TOML file (CfgPath) from its paths and addresses
// and Options.Config.
func (c *Cluster) WriteConfig(n *Node) {
	c.T.Helper()
	k := c.opts.Config
	var b strings.Builder
	fmt.Fprintf(&b, "node_id = %q\ndata_dir = %q\nraft_addr = %q\nadmin_socket = %q\n", n.ID, n.DataDir, n.RaftAddr, n.Sock)
	if k.MACMode != "" {
		fmt.Fprintf(&b, "mac_mode = %q\n", k.MACMode)
	}
	if k.ClusterName != "" {
		fmt.Fprintf(&b, "cluster_name = %q\n", k.ClusterName)
	}
	if k.LogLevel != "" {
		fmt.Fprintf(&b, "log_level = %q\n", k.LogLevel)
	}
	if c.TLS != "" {
		fmt.Fprintf(&b, "tls_ca = %q\ntls_cert = %q\ntls_key = %q\njoin_token_file = %q\n",
			filepath.Join(c.TLS, node.CAFile), filepath.Join(c.TLS, n.ID+".crt"), filepath.Join(c.TLS, n.ID+".key"),
			filepath.Join(c.TLS, node.JoinTokenFile))
	} else {
		b.WriteString("# The test LAN (namespaces on a private bridge) is the security boundary.\ninsecure = true\n")
	}
	b.WriteString(k.Extra)
	fmt.Fprintf(&b, "\n[[export]]\nshelf = %d\nslot = %d\nnetif = %q\npath = %q\n", k.Shelf, k.Slot, n.Netif, n.Img)
	if k.Bufcnt != 0 {
		fmt.Fprintf(&b, "bufcnt = %d\n", k.Bufcnt)
	}
	if err := os.WriteFile(n.CfgPath, []byte(b.String()), 0o600); err != nil {
		c.T.Fatal(err)
	}
}

// ---------------------------------------------------------------- processes

// Start runs `vblade node -c CFG` in n's namespace and waits (15 s) for its
// admin socket to answer.
func (c *Cluster) Start(n *Node) error {
	cmd, err := c.LAN.TryStart(n.NS, c.Bins.Vblade, "node", "-c", n.CfgPath)
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.cmd, n.paused = cmd, false
	n.mu.Unlock()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := c.Status(n); err == nil {
			return nil
		}
		if ex, werr := c.LAN.Exited(cmd); ex {
			_, se := c.LAN.Output(cmd)
			n.mu.Lock()
			n.cmd = nil
			n.mu.Unlock()
			return fmt.Errorf("%s exited at start (%v):\n%s", n.ID, werr, Tail(se, 40))
		}
		if time.Now().After(deadline) {
			_, se := c.LAN.Output(cmd)
			return fmt.Errorf("%s: admin socket %s never answered:\n%s", n.ID, n.Sock, Tail(se, 40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// MustStart is Start that fails the test on error.
func (c *Cluster) MustStart(n *Node) {
	c.T.Helper()
	if err := c.Start(n); err != nil {
		c.T.Fatal(err)
	}
}

// Stop sends sig to n by PID (SIGKILL: a crash; SIGTERM: a planned stop;
// a paused node is continued first) and waits for it to exit (after 3 s
// it is killed).
func (c *Cluster) Stop(n *Node, sig syscall.Signal) {
	n.mu.Lock()
	cmd, paused := n.cmd, n.paused
	n.cmd, n.paused = nil, false
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	if paused {
		_ = cmd.Process.Signal(syscall.SIGCONT)
	}
	c.LAN.Stop(cmd, sig)
}

// Pause SIGSTOPs n by PID; Resume SIGCONTs it.
func (c *Cluster) Pause(n *Node) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return errors.New("not running")
	}
	n.paused = true
	return n.cmd.Process.Signal(syscall.SIGSTOP)
}

// Resume continues a paused node (no-op otherwise).
func (c *Cluster) Resume(n *Node) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil && n.paused {
		_ = n.cmd.Process.Signal(syscall.SIGCONT)
	}
	n.paused = false
}

// Running lists the running, unpaused nodes.
func (c *Cluster) Running() []*Node {
	var out []*Node
	for _, n := range c.Nodes {
		if n.Running() {
			out = append(out, n)
		}
	}
	return out
}

// ---------------------------------------------------------------- vbladectl

// Ctl runs `vbladectl cluster SUB --socket SOCK ARGS...` in n's namespace
// (bounded by netlab's 30 s).
func (c *Cluster) Ctl(n *Node, sub string, args ...string) (string, error) {
	a := append([]string{c.Bins.Vbladectl, "cluster", sub, "--socket", n.Sock}, args...)
	out, err := c.LAN.Exec(n.NS, a...)
	return string(out), err
}

// CtlTimeout is Ctl with a bound of the caller's choosing.
func (c *Cluster) CtlTimeout(n *Node, timeout time.Duration, sub string, args ...string) (string, error) {
	a := append([]string{c.Bins.Vbladectl, "cluster", sub, "--socket", n.Sock}, args...)
	if n.NS != "" {
		a = append([]string{"ip", "netns", "exec", n.NS}, a...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, a[0], a[1:]...).CombinedOutput()
	return string(out), err
}

// MustCtl is Ctl that fails the test on error.
func (c *Cluster) MustCtl(n *Node, sub string, args ...string) string {
	c.T.Helper()
	out, err := c.Ctl(n, sub, args...)
	if err != nil {
		c.T.Fatalf("vbladectl cluster %s %s on %s: %v\n%s", sub, strings.Join(args, " "), n.ID, err, out)
	}
	return out
}

// Form starts every node, initialises the cluster on n1, waits (15 s) for
// it to lead, and joins the others through n1 (`join --timeout 60s`, each
// bounded by 90 s: a join may move a whole image).
func (c *Cluster) Form() {
	c.T.Helper()
	for _, n := range c.Nodes {
		c.MustStart(n)
	}
	c.MustCtl(c.Nodes[0], "init")
	if _, err := c.FindLeader(nil, 15*time.Second); err != nil {
		c.T.Fatalf("after init: %v", err)
	}
	for _, n := range c.Nodes[1:] {
		if out, err := c.CtlTimeout(n, 90*time.Second, "join", "--timeout", "60s", c.Nodes[0].RaftAddr); err != nil {
			c.T.Fatalf("vbladectl cluster join on %s: %v\n%s", n.ID, err, out)
		}
	}
}

// ---------------------------------------------------------------- status

// Status is a node's GET /v1/status, as the admin API defines it.
type Status struct {
	node.NodeStatus
}

func (s *Status) Serving() bool { return s.State == "leader" && s.GateOpen }

// Status asks n's admin socket (bounded by Options.StatusTimeout).
func (c *Cluster) Status(n *Node) (*Status, error) {
	resp, err := n.http.Get("http://vblade/v1/status")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	var s Status
	return &s, json.NewDecoder(resp.Body).Decode(&s)
}

// Statuses polls every running, unpaused node at once; nodes that do not
// answer are left out.
func (c *Cluster) Statuses() map[*Node]*Status { return c.statuses(nil) }

// statuses is Statuses without not (nil: every node).
func (c *Cluster) statuses(not *Node) map[*Node]*Status {
	out := map[*Node]*Status{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range c.Running() {
		if n == not {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if s, err := c.Status(n); err == nil {
				mu.Lock()
				out[n] = s
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

// servingLeaders lists the running nodes other than not that serve.
func (c *Cluster) servingLeaders(not *Node) []*Node {
	var ls []*Node
	for n, s := range c.statuses(not) {
		if s.Serving() {
			ls = append(ls, n)
		}
	}
	return ls
}

// Leader returns the one running node that leads with its gate open, or nil
// (none, or more than one).
func (c *Cluster) Leader() *Node {
	if ls := c.servingLeaders(nil); len(ls) == 1 {
		return ls[0]
	}
	return nil
}

// FindLeader waits until exactly one running node other than not leads
// with its gate open, polling every Options.LeaderPoll.
func (c *Cluster) FindLeader(not *Node, timeout time.Duration) (*Node, error) {
	deadline := time.Now().Add(timeout)
	for {
		ls := c.servingLeaders(not)
		if len(ls) == 1 {
			return ls[0], nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no single serving leader after %v (candidates %v)", timeout, IDs(ls))
		}
		time.Sleep(c.opts.LeaderPoll)
	}
}

// WaitLeader is FindLeader that fails the test on timeout.
func (c *Cluster) WaitLeader(not *Node, timeout time.Duration) *Node {
	c.T.Helper()
	l, err := c.FindLeader(not, timeout)
	if err != nil {
		c.T.Fatal(err)
	}
	return l
}

// WaitCaughtUp waits until n is in the cluster, without a fatal error, and
// applied the leader's commit index as sampled when the wait started. It
// returns n's lag behind the leader's commit index at that moment and how
// long it took; it fails the test on timeout.
func (c *Cluster) WaitCaughtUp(n *Node, timeout time.Duration) (lag uint64, took time.Duration) {
	c.T.Helper()
	start := time.Now()
	l := c.WaitLeader(nil, 15*time.Second)
	ls, err := c.Status(l)
	if err != nil {
		c.T.Fatal(err)
	}
	want := ls.CommitIndex
	for {
		s, err := c.Status(n)
		if err == nil && s.InCluster && s.AppliedIndex >= want && s.FatalError == "" {
			ls2, _ := c.Status(l)
			if ls2 != nil && ls2.CommitIndex > s.AppliedIndex {
				lag = ls2.CommitIndex - s.AppliedIndex
			}
			return lag, time.Since(start)
		}
		if time.Since(start) > timeout {
			c.T.Fatalf("%s did not catch up within %v: status %+v err %v (leader %s commit %d)", n.ID, timeout, s, err, l.ID, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ---------------------------------------------------------------- logs

// Tail is the last n lines of s.
func Tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// DumpLogs logs the last lines of every non-empty file in the LAN's log
// directory (every process started on it).
func (c *Cluster) DumpLogs(lines int) {
	files, _ := filepath.Glob(filepath.Join(c.LAN.LogDir(), "*"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if len(bytes.TrimSpace(b)) == 0 {
			continue
		}
		c.T.Logf("---- last lines of %s:\n%s", f, Tail(string(b), lines))
	}
}
