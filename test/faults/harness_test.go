package faults

// Cluster harness of the fault suite: real `vblade node` processes in netlab
// namespaces, each with its image on a tmpfs of its own (so a disk can be
// filled), formed into a cluster with vbladectl, and the fault primitives the
// nemesis uses: signals by PID, nftables rules inside the namespaces, link
// state on the LAN's bridge.
//
// Network rule: every AoE socket this package opens is on a root port that
// netlab created for the run; Raft runs on the namespaces' 10.99.<subnet>.N
// addresses; every nft rule lives in a namespace of the run.

import (
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

	"golang.org/x/sys/unix"

	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

const (
	shelf    = 1
	slotNo   = 0
	imgSize  = 8 << 20  // sparse image on the node's tmpfs
	fsSize   = 12 << 20 // the tmpfs holding it
	raftPort = 7000
)

// ---------------------------------------------------------------- binaries

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
// (VBHA_BIN_DIR uses prebuilt ones).
func buildBinaries(t *testing.T) binaries {
	t.Helper()
	buildOnce.Do(func() {
		if d := os.Getenv("VBHA_BIN_DIR"); d != "" {
			buildRes = binaries{filepath.Join(d, "vblade"), filepath.Join(d, "vbladectl")}
			return
		}
		dir, err := os.MkdirTemp("", "vbha-faults-bin-")
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

// ---------------------------------------------------------------- nodes

type vnode struct {
	idx      int
	id       string
	host     *netlab.Host
	raftAddr string
	sock     string
	cfgPath  string
	dataDir  string
	fsDir    string // tmpfs mount point holding the image
	img      string
	filler   string // file that fills fsDir (disk-full fault)
	http     *http.Client

	mu     sync.Mutex
	cmd    *exec.Cmd
	paused bool
}

func (n *vnode) running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd != nil && !n.paused
}

type cluster struct {
	t      *testing.T
	lan    *netlab.LAN
	bins   binaries
	dir    string
	nodes  []*vnode
	mode   string
	subnet int
	tls    string                           // directory of `vbladectl cluster certs` output ("": no peer authentication)
	logf   func(format string, args ...any) // timeline log (also kept as an artefact)
}

// nodeStatus is the part of GET /v1/status the suite reads.
type nodeStatus struct {
	ID           string `json:"id"`
	InCluster    bool   `json:"in_cluster"`
	State        string `json:"state"`
	Suffrage     string `json:"suffrage"`
	Term         uint64 `json:"term"`
	CommitIndex  uint64 `json:"commit_index"`
	AppliedIndex uint64 `json:"applied_index"`
	LastLogIndex uint64 `json:"last_log_index"`
	LeaderID     string `json:"leader_id"`
	GateOpen     bool   `json:"gate_open"`
	FatalError   string `json:"fatal_error"`
}

// mountTmpfs mounts a tmpfs of size bytes on dir and registers its unmount.
// Called before netlab.New, so the unmount runs after the LAN killed the
// nodes (cleanups run last-registered first).
func mountTmpfs(t *testing.T, dir string, size int) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Fatalf("mount tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
}

func newCluster(t *testing.T, size, subnet int, mode string, roots int, logf func(string, ...any)) *cluster {
	t.Helper()
	netlab.RequireRoot(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatalf("the fault suite needs nft (Debian package nftables: apt-get install -y nftables) for its partitions: %v", err)
	}
	c := &cluster{t: t, bins: buildBinaries(t), dir: t.TempDir(), mode: mode, subnet: subnet, logf: logf}
	for i := 1; i <= size; i++ {
		mountTmpfs(t, filepath.Join(c.dir, fmt.Sprintf("n%d-fs", i)), fsSize)
	}
	c.lan = netlab.New(t, netlab.Options{Hosts: size, RootPorts: roots, Subnet: subnet})
	c.peerAuth(size)
	for i := 1; i <= size; i++ {
		h := c.lan.Host(i)
		n := &vnode{idx: i, id: fmt.Sprintf("n%d", i), host: h,
			raftAddr: fmt.Sprintf("%s:%d", h.IP(), raftPort),
			sock:     filepath.Join(c.dir, fmt.Sprintf("n%d.sock", i)),
			dataDir:  filepath.Join(c.dir, fmt.Sprintf("n%d.data", i)),
			fsDir:    filepath.Join(c.dir, fmt.Sprintf("n%d-fs", i)),
		}
		n.img = filepath.Join(n.fsDir, "disk.img")
		n.filler = filepath.Join(n.fsDir, "filler")
		sock := n.sock
		n.http = &http.Client{Timeout: 1500 * time.Millisecond, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", sock)
			}}}
		c.nodes = append(c.nodes, n)
		f, err := os.Create(n.img)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(imgSize); err != nil {
			t.Fatal(err)
		}
		f.Close()
		c.writeConfig(n)
	}
	return c
}

// peerAuth creates a CA, node certificates and a join token with `vbladectl
// cluster certs` when this tree has it (mTLS is the default for new
// clusters), so the suite runs the configuration operators run.
func (c *cluster) peerAuth(size int) {
	if out, err := exec.Command(c.bins.vbladectl, "cluster", "certs", "--help").CombinedOutput(); err != nil {
		c.logf("vbladectl has no `cluster certs` (%v: %s): nodes run without peer authentication", err, tail(string(out), 1))
		return
	}
	dir := filepath.Join(c.dir, "pki")
	var ids, hosts []string
	for i := 1; i <= size; i++ {
		ids = append(ids, fmt.Sprintf("n%d", i))
		hosts = append(hosts, c.lan.Host(i).IP().String())
	}
	out, err := exec.Command(c.bins.vbladectl, "cluster", "certs", "--dir", dir, "--nodes", strings.Join(ids, ","),
		"--hosts", strings.Join(hosts, ","), "--cluster", fmt.Sprintf("vbha-faults-%d", c.subnet)).CombinedOutput()
	if err != nil {
		c.t.Fatalf("vbladectl cluster certs: %v\n%s", err, out)
	}
	c.tls = dir
}

func (c *cluster) tlsLines(n *vnode) string {
	if c.tls == "" {
		return ""
	}
	dir := c.tls
	return fmt.Sprintf("tls_ca = %q\ntls_cert = %q\ntls_key = %q\njoin_token_file = %q\n",
		filepath.Join(dir, "ca.crt"), filepath.Join(dir, n.id+".crt"), filepath.Join(dir, n.id+".key"), filepath.Join(dir, "join-token"))
}

func (c *cluster) writeConfig(n *vnode) {
	n.cfgPath = filepath.Join(c.dir, n.id+".toml")
	cfg := fmt.Sprintf(`node_id = %q
data_dir = %q
raft_addr = %q
admin_socket = %q
mac_mode = %q
cluster_name = "vbha-faults-%d"
log_level = "info"
snapshot_interval = "5s"
snapshot_threshold = 2000
trailing_logs = 1000
%s
[[export]]
shelf = %d
slot = %d
netif = %q
path = %q
bufcnt = 16
`, n.id, n.dataDir, n.raftAddr, n.sock, c.mode, c.subnet, c.tlsLines(n), shelf, slotNo, n.host.If, n.img)
	if err := os.WriteFile(n.cfgPath, []byte(cfg), 0o600); err != nil {
		c.t.Fatal(err)
	}
}

// start runs `vblade node -c FILE` in n's namespace and waits for its admin
// socket (15 s).
func (c *cluster) start(n *vnode) error {
	cmd, err := c.lan.TryStart(n.host.NS, c.bins.vblade, "node", "-c", n.cfgPath)
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.cmd, n.paused = cmd, false
	n.mu.Unlock()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := c.status(n); err == nil {
			return nil
		}
		if ex, werr := c.lan.Exited(cmd); ex {
			_, se := c.lan.Output(cmd)
			n.mu.Lock()
			n.cmd = nil
			n.mu.Unlock()
			return fmt.Errorf("%s exited at start (%v): %s", n.id, werr, tail(se, 20))
		}
		if time.Now().After(deadline) {
			_, se := c.lan.Output(cmd)
			return fmt.Errorf("%s: admin socket %s never answered: %s", n.id, n.sock, tail(se, 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill stops n with sig (by PID; SIGKILL is a crash) and waits for it.
func (c *cluster) kill(n *vnode, sig syscall.Signal) {
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
	c.lan.Stop(cmd, sig)
}

// pause SIGSTOPs n (by PID); resume SIGCONTs it.
func (c *cluster) pause(n *vnode) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return errors.New("not running")
	}
	n.paused = true
	return n.cmd.Process.Signal(syscall.SIGSTOP)
}

func (c *cluster) resume(n *vnode) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil && n.paused {
		_ = n.cmd.Process.Signal(syscall.SIGCONT)
	}
	n.paused = false
}

// ctl runs `vbladectl cluster SUB --socket S ARGS...` in n's namespace.
func (c *cluster) ctl(n *vnode, sub string, args ...string) (string, error) {
	a := append([]string{c.bins.vbladectl, "cluster", sub, "--socket", n.sock}, args...)
	out, err := c.lan.Exec(n.host.NS, a...)
	return string(out), err
}

func (c *cluster) status(n *vnode) (*nodeStatus, error) {
	resp, err := n.http.Get("http://vblade/v1/status")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	var s nodeStatus
	return &s, json.NewDecoder(resp.Body).Decode(&s)
}

// statuses polls every running, unpaused node.
func (c *cluster) statuses() map[*vnode]*nodeStatus {
	out := map[*vnode]*nodeStatus{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range c.nodes {
		if !n.running() {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if s, err := c.status(n); err == nil {
				mu.Lock()
				out[n] = s
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

// leader returns the one running node that leads with its gate open, or nil.
func (c *cluster) leader() *vnode {
	var ls []*vnode
	for n, s := range c.statuses() {
		if s.State == "leader" && s.GateOpen {
			ls = append(ls, n)
		}
	}
	if len(ls) == 1 {
		return ls[0]
	}
	return nil
}

func (c *cluster) waitLeader(timeout time.Duration) *vnode {
	deadline := time.Now().Add(timeout)
	for {
		if l := c.leader(); l != nil {
			return l
		}
		if time.Now().After(deadline) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// healthy reports whether every node runs, is in the cluster without a fatal
// error, one leader serves, and every follower applied at least upTo.
func (c *cluster) healthy(upTo uint64) (bool, string, uint64) {
	st := c.statuses()
	var why []string
	var leader *nodeStatus
	for _, n := range c.nodes {
		s := st[n]
		switch {
		case !n.running():
			why = append(why, n.id+" not running")
		case s == nil:
			why = append(why, n.id+" status unanswered")
		case !s.InCluster:
			why = append(why, n.id+" not in cluster")
		case s.FatalError != "":
			why = append(why, n.id+" fatal: "+s.FatalError)
		case s.State == "leader" && s.GateOpen:
			if leader != nil {
				why = append(why, "two serving leaders")
			}
			leader = s
		}
	}
	if leader == nil {
		why = append(why, "no serving leader")
	} else {
		for _, n := range c.nodes {
			if s := st[n]; s != nil && s.AppliedIndex < upTo {
				why = append(why, fmt.Sprintf("%s applied %d < %d", n.id, s.AppliedIndex, upTo))
			}
		}
	}
	var commit uint64
	if leader != nil {
		commit = leader.CommitIndex
	}
	return len(why) == 0, strings.Join(why, "; "), commit
}

// waitHealthy waits until healthy() holds with every follower caught up to
// the leader's commit index as first seen. It returns how long it took, or an
// error naming what never recovered.
func (c *cluster) waitHealthy(timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	var target uint64
	why := ""
	for time.Since(start) < timeout {
		ok, w, commit := c.healthy(target)
		why = w
		if target == 0 && commit != 0 {
			target = commit
			ok, why, _ = c.healthy(target)
		}
		if ok && target != 0 {
			return time.Since(start), nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Since(start), fmt.Errorf("cluster not healthy after %v: %s", timeout, why)
}

// form starts every node, initialises the cluster on n1 and joins the rest.
func (c *cluster) form() {
	t := c.t
	for _, n := range c.nodes {
		if err := c.start(n); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := c.ctl(c.nodes[0], "init"); err != nil {
		t.Fatalf("vbladectl cluster init: %v\n%s", err, out)
	}
	if c.waitLeader(15*time.Second) == nil {
		t.Fatal("no leader 15 s after init")
	}
	for _, n := range c.nodes[1:] {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		out, err := runIn(ctx, c.lan, n.host.NS, c.bins.vbladectl, "cluster", "join", "--socket", n.sock, "--timeout", "60s", c.nodes[0].raftAddr)
		cancel()
		if err != nil {
			t.Fatalf("vbladectl cluster join on %s: %v\n%s", n.id, err, out)
		}
	}
	if d, err := c.waitHealthy(60 * time.Second); err != nil {
		t.Fatalf("cluster of %d did not form: %v", len(c.nodes), err)
	} else {
		c.logf("cluster of %d formed (%v to catch up)", len(c.nodes), d.Round(time.Millisecond))
	}
}

// runIn is netlab's Exec with a caller-chosen bound (join can take longer
// than Exec's 30 s when a full image travels).
func runIn(ctx context.Context, _ *netlab.LAN, ns string, args ...string) ([]byte, error) {
	a := append([]string{"ip", "netns", "exec", ns}, args...)
	return exec.CommandContext(ctx, a[0], a[1:]...).CombinedOutput()
}

// ---------------------------------------------------------------- packet filters

// nft loads a ruleset into namespace ns.
func (c *cluster) nft(ns, ruleset string) error {
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("nft in %s: %v: %s\n%s", ns, err, out, ruleset)
	}
	return nil
}

func (c *cluster) nftDelete(ns, family, table string) error {
	out, err := c.lan.Exec(ns, "nft", "delete", "table", family, table)
	if err != nil && !strings.Contains(string(out), "No such file") {
		return fmt.Errorf("nft delete table %s %s in %s: %v: %s", family, table, ns, err, out)
	}
	return nil
}

// isolateRaft drops the node's Raft traffic (TCP port raftPort both ways)
// to and from the given peers (all peers when nil), inside its namespace.
// AoE frames are untouched: a node cut off this way still hears the
// initiator, which is the lease's hardest case.
func (c *cluster) isolateRaft(n *vnode, peers []*vnode) error {
	match := ""
	if peers != nil {
		var ips []string
		for _, p := range peers {
			ips = append(ips, p.host.IP().String())
		}
		set := "{ " + strings.Join(ips, ", ") + " }"
		match = "ip saddr " + set + " "
		rs := fmt.Sprintf(`table inet vbfaults {
  chain vbin { type filter hook input priority 0; policy accept; ip saddr %s drop; }
  chain vbout { type filter hook output priority 0; policy accept; ip daddr %s drop; }
}
`, set, set)
		_ = match
		return c.nft(n.host.NS, rs)
	}
	rs := fmt.Sprintf(`table inet vbfaults {
  chain vbin { type filter hook input priority 0; policy accept; tcp dport %d drop; tcp sport %d drop; }
  chain vbout { type filter hook output priority 0; policy accept; tcp dport %d drop; tcp sport %d drop; }
}
`, raftPort, raftPort, raftPort, raftPort)
	return c.nft(n.host.NS, rs)
}

func (c *cluster) healRaft(n *vnode) error { return c.nftDelete(n.host.NS, "inet", "vbfaults") }

// cutInitiators drops every frame between node n's bridge port and the given
// root ports, in the bridge namespace (the LAN's switch).
func (c *cluster) cutInitiators(n *vnode, roots []int) error {
	var rules []string
	for _, r := range roots {
		rules = append(rules,
			fmt.Sprintf(`iifname "p%d" oifname "r%d" drop`, n.idx, r),
			fmt.Sprintf(`iifname "r%d" oifname "p%d" drop`, r, n.idx))
	}
	rs := fmt.Sprintf("table bridge vbfaults {\n  chain vbfwd { type filter hook forward priority 0; policy accept; %s; }\n}\n", strings.Join(rules, "; "))
	return c.nft(c.lan.BridgeNS, rs)
}

func (c *cluster) healInitiators() error { return c.nftDelete(c.lan.BridgeNS, "bridge", "vbfaults") }

// ---------------------------------------------------------------- disks

// punchHoles deallocates [off, off+length) of n's image (content stays
// zero: the suite only punches pages no write ever touched), so a write
// there needs a new tmpfs page.
func punchHoles(n *vnode, off, length int64) error {
	f, err := os.OpenFile(n.img, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// fill writes a filler file on n's tmpfs until it is full (bounded by the
// tmpfs size).
func fill(n *vnode) (int64, error) {
	f, err := os.OpenFile(n.filler, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = 0xfa
	}
	var total int64
	for i := 0; i < fsSize/len(buf)+2; i++ {
		m, err := f.Write(buf)
		total += int64(m)
		if errors.Is(err, syscall.ENOSPC) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
	return total, fmt.Errorf("tmpfs %s never filled after %d bytes", n.fsDir, total)
}

func unfill(n *vnode) error {
	err := os.Remove(n.filler)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// ---------------------------------------------------------------- logs

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// copyLogs copies the node logs (netlab's log directory) into dir.
func (c *cluster) copyLogs(dir string) {
	files, _ := filepath.Glob(filepath.Join(c.lan.LogDir(), "*"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil || len(b) == 0 {
			continue
		}
		_ = os.WriteFile(filepath.Join(dir, filepath.Base(f)), b, 0o644)
	}
}

// grepLogs returns node log lines (stderr) matching any of the words, at most
// max of them, prefixed with the file name.
func (c *cluster) grepLogs(max int, words ...string) []string {
	var out []string
	files, _ := filepath.Glob(filepath.Join(c.lan.LogDir(), "*vblade*.stderr"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		for _, l := range strings.Split(string(b), "\n") {
			for _, w := range words {
				if strings.Contains(l, w) {
					out = append(out, filepath.Base(f)+": "+l)
					break
				}
			}
			if len(out) >= max {
				return out
			}
		}
	}
	return out
}
