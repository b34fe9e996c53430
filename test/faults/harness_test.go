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
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vblade-ha/vblade-ha/internal/clustertest"
	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

const (
	shelf    = 1
	slotNo   = 0
	imgSize  = 8 << 20  // sparse image on the node's tmpfs
	fsSize   = 12 << 20 // the tmpfs holding it
	raftPort = clustertest.RaftPort
)

// ---------------------------------------------------------------- nodes

type cluster struct {
	*clustertest.Cluster
	logf func(format string, args ...any) // timeline log (also kept as an artefact)
}

// fsDir is the tmpfs mount point holding n's image; filler the file that
// fills it (disk-full fault).
func fsDir(n *clustertest.Node) string  { return filepath.Dir(n.Img) }
func filler(n *clustertest.Node) string { return filepath.Join(fsDir(n), "filler") }

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

// newCluster builds the LAN (size nodes, roots root ports) with every
// node's image on a tmpfs of its own and mutual TLS between the nodes (the
// default for new clusters, so the suite runs what operators run).
func newCluster(t *testing.T, size, subnet int, mode string, roots int, logf func(string, ...any)) *cluster {
	t.Helper()
	netlab.RequireRoot(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatalf("the fault suite needs nft (Debian package nftables: apt-get install -y nftables) for its partitions: %v", err)
	}
	dir := t.TempDir()
	for i := 1; i <= size; i++ {
		mountTmpfs(t, filepath.Join(dir, fmt.Sprintf("n%d-fs", i)), fsSize)
	}
	c := &cluster{logf: logf, Cluster: clustertest.New(t, clustertest.Options{
		Nodes: size, RootPorts: roots, Subnet: subnet, Dir: dir,
		StatusTimeout: 1500 * time.Millisecond, DumpLines: -1, // a failed run keeps the logs as artefacts
		Config: clustertest.Config{
			ClusterName: fmt.Sprintf("vbha-faults-%d", subnet), MACMode: mode, LogLevel: "info", TLS: true,
			Extra: "snapshot_interval = \"5s\"\nsnapshot_threshold = 2000\ntrailing_logs = 1000\n",
			Shelf: shelf, Slot: slotNo, Bufcnt: 16,
		},
	})}
	for _, n := range c.Nodes {
		c.WriteImage(n, filepath.Join(dir, n.ID+"-fs", "disk.img"), nil, imgSize)
		c.WriteConfig(n)
	}
	return c
}

// form starts every node, initialises the cluster on n1, joins the rest and
// waits until every node caught up.
func (c *cluster) form() {
	c.Form()
	if d, err := c.waitHealthy(60 * time.Second); err != nil {
		c.T.Fatalf("cluster of %d did not form: %v", len(c.Nodes), err)
	} else {
		c.logf("cluster of %d formed (%v to catch up)", len(c.Nodes), d.Round(time.Millisecond))
	}
}

// healthy reports whether every node runs, is in the cluster without a fatal
// error, one leader serves, and every follower applied at least upTo.
func (c *cluster) healthy(upTo uint64) (bool, string, uint64) {
	st := c.Statuses()
	var why []string
	var leader *clustertest.Status
	for _, n := range c.Nodes {
		s := st[n]
		switch {
		case !n.Running():
			why = append(why, n.ID+" not running")
		case s == nil:
			why = append(why, n.ID+" status unanswered")
		case !s.InCluster:
			why = append(why, n.ID+" not in cluster")
		case s.FatalError != "":
			why = append(why, n.ID+" fatal: "+s.FatalError)
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
		for _, n := range c.Nodes {
			if s := st[n]; s != nil && s.AppliedIndex < upTo {
				why = append(why, fmt.Sprintf("%s applied %d < %d", n.ID, s.AppliedIndex, upTo))
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
	out, err := c.LAN.Exec(ns, "nft", "delete", "table", family, table)
	if err != nil && !strings.Contains(string(out), "No such file") {
		return fmt.Errorf("nft delete table %s %s in %s: %v: %s", family, table, ns, err, out)
	}
	return nil
}

// isolateRaft drops the node's Raft traffic (TCP port raftPort both ways)
// to and from the given peers (all peers when nil), inside its namespace.
// AoE frames are untouched: a node cut off this way still hears the
// initiator, which is the lease's hardest case.
func (c *cluster) isolateRaft(n *clustertest.Node, peers []*clustertest.Node) error {
	match := ""
	if peers != nil {
		var ips []string
		for _, p := range peers {
			ips = append(ips, p.Host.IP().String())
		}
		set := "{ " + strings.Join(ips, ", ") + " }"
		match = "ip saddr " + set + " "
		rs := fmt.Sprintf(`table inet vbfaults {
  chain vbin { type filter hook input priority 0; policy accept; ip saddr %s drop; }
  chain vbout { type filter hook output priority 0; policy accept; ip daddr %s drop; }
}
`, set, set)
		_ = match
		return c.nft(n.NS, rs)
	}
	rs := fmt.Sprintf(`table inet vbfaults {
  chain vbin { type filter hook input priority 0; policy accept; tcp dport %d drop; tcp sport %d drop; }
  chain vbout { type filter hook output priority 0; policy accept; tcp dport %d drop; tcp sport %d drop; }
}
`, raftPort, raftPort, raftPort, raftPort)
	return c.nft(n.NS, rs)
}

func (c *cluster) healRaft(n *clustertest.Node) error { return c.nftDelete(n.NS, "inet", "vbfaults") }

// cutInitiators drops every frame between node n's bridge port and the given
// root ports, in the bridge namespace (the LAN's switch).
func (c *cluster) cutInitiators(n *clustertest.Node, roots []int) error {
	var rules []string
	for _, r := range roots {
		rules = append(rules,
			fmt.Sprintf(`iifname "p%d" oifname "r%d" drop`, n.Index, r),
			fmt.Sprintf(`iifname "r%d" oifname "p%d" drop`, r, n.Index))
	}
	rs := fmt.Sprintf("table bridge vbfaults {\n  chain vbfwd { type filter hook forward priority 0; policy accept; %s; }\n}\n", strings.Join(rules, "; "))
	return c.nft(c.LAN.BridgeNS, rs)
}

func (c *cluster) healInitiators() error { return c.nftDelete(c.LAN.BridgeNS, "bridge", "vbfaults") }

// ---------------------------------------------------------------- disks

// punchHoles deallocates [off, off+length) of n's image (content stays
// zero: the suite only punches pages no write ever touched), so a write
// there needs a new tmpfs page.
func punchHoles(n *clustertest.Node, off, length int64) error {
	f, err := os.OpenFile(n.Img, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// fill writes a filler file on n's tmpfs until it is full (bounded by the
// tmpfs size).
func fill(n *clustertest.Node) (int64, error) {
	f, err := os.OpenFile(filler(n), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
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
	return total, fmt.Errorf("tmpfs %s never filled after %d bytes", fsDir(n), total)
}

func unfill(n *clustertest.Node) error {
	err := os.Remove(filler(n))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// ---------------------------------------------------------------- logs

// copyLogs copies the node logs (netlab's log directory) into dir.
func (c *cluster) copyLogs(dir string) {
	files, _ := filepath.Glob(filepath.Join(c.LAN.LogDir(), "*"))
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
	files, _ := filepath.Glob(filepath.Join(c.LAN.LogDir(), "*vblade*.stderr"))
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
