package cluster_test

// TestClusterFailover: three `vblade node` processes in their own network
// namespaces on one bridge, formed into a cluster with vbladectl, under a
// verifying AoE workload from the root namespace:
//
//   - AoE target state (config string, mask list, reservation) set on leader 1
//     holds on leader 2;
//   - SIGKILL of the leader (VBHA_IT_KILLS times, default 3): the workload goes
//     on with zero mismatches and zero I/O errors; the stall (last completion
//     before the kill to the first after) is logged; the killed node restarts
//     and catches up;
//   - bad joins: an unreachable address and a refused port fail fast with a
//     message; a node whose export size differs is refused naming both sizes;
//   - a 4th node with a zero-filled image joins under load and receives the
//     full image: `cluster verify` finds equal checksums on all four;
//   - a planned `cluster transfer` (stall logged), `cluster leave`;
//   - no AoE response ever leaves a node while it is provably not the leader
//     (sniffers on every bridge port), and in mac_mode=node every response the
//     initiator sees comes from the MAC of the node that sent it; in
//     mac_mode=virtual from the target's virtual MAC.
//
// Both mac modes run (VBHA_IT_MODES=virtual,node). Needs root; skips loudly
// otherwise.

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/internal/clustertest"
	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

func TestClusterFailover(t *testing.T) {
	netlab.RequireRoot(t)
	clustertest.Build(t)
	modes := []string{"virtual", "node"}
	if m := os.Getenv("VBHA_IT_MODES"); m != "" {
		modes = strings.Split(m, ",")
	}
	kills := 3
	if k, err := strconv.Atoi(os.Getenv("VBHA_IT_KILLS")); err == nil && k > 0 {
		kills = k
	}
	for i, mode := range modes {
		t.Run(mode, func(t *testing.T) { runFailover(t, mode, 61+i, kills) })
	}
}

func runFailover(t *testing.T, mode string, subnet, kills int) {
	c := newCluster(t, mode, subnet)
	n1, n2, n3, n4 := c.Node(1), c.Node(2), c.Node(3), c.Node(4)
	for _, n := range []*clustertest.Node{n1, n2, n3} {
		c.WriteImage(n, n.ID+".img", c.initial, 0)
		c.writeConfig(n, fmt.Sprintf("%s/%s.data", c.Dir, n.ID))
		c.MustStart(n)
	}

	// A node not yet in a cluster says so and exits 0.
	if out, err := c.Ctl(n1, "status", "--json"); err != nil {
		t.Errorf("cluster status on a node before init: %v\n%s", err, out)
	}
	c.MustCtl(n1, "init")
	c.WaitLeader(nil, 15*time.Second)
	for _, n := range []*clustertest.Node{n2, n3} {
		out := c.MustCtl(n, "join", n1.RaftAddr)
		t.Logf("join %s: %s", n.ID, strings.TrimSpace(lastLine(out)))
		c.WaitCaughtUp(n, 60*time.Second)
	}
	cs := c.clusterStatus(n2)
	if len(cs.Nodes) != 3 || cs.Leader == "" {
		t.Fatalf("cluster status after forming: %+v", cs)
	}
	t.Logf("cluster formed: leader %s, %d nodes", cs.Leader, len(cs.Nodes))

	// Initiator on the root port.
	obs := observe(t, c)
	defer obs.stop()
	cl, err := aoe.NewClient(c.LAN.Root[0].Name, aoe.ClientOptions{Follow: true, RequestTimeout: -1, MaxRTO: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx := context.Background()
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	var infos []aoe.TargetInfo
	for dctx.Err() == nil && len(infos) == 0 {
		infos, _ = cl.Discover(dctx, 500*time.Millisecond)
	}
	dcancel()
	if len(infos) != 1 {
		t.Fatalf("discovery found %d answers, want exactly 1 (only the leader answers): %+v", len(infos), infos)
	}
	rem := aoe.Remote{Shelf: shelf, Slot: slotNo, MAC: infos[0].MAC, MaxSectors: 2, Window: 16}
	virtMAC := infos[0].MAC
	t.Logf("target e%d.%d answers from %s", shelf, slotNo, virtMAC)

	// Target state through AoE on leader 1.
	leader1 := c.WaitLeader(nil, 5*time.Second)
	me := cl.MAC()
	cfgStr := []byte("vbha-it " + mode)
	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	if _, err := cl.QueryConfig(sctx, rem, aoe.ConfigForceSet, cfgStr); err != nil {
		t.Fatalf("set config string on %s: %v", leader1.ID, err)
	}
	if _, err := cl.MaskList(sctx, rem, aoe.MaskEdit, []aoe.Directive{{Command: aoe.DirAdd, MAC: me}}); err != nil {
		t.Fatalf("mask list add on %s: %v", leader1.ID, err)
	}
	if _, err := cl.Reserve(sctx, rem, aoe.ReserveSet, []aoe.MAC{me}); err != nil {
		t.Fatalf("reserve on %s: %v", leader1.ID, err)
	}
	scancel()
	t.Logf("config string, mask list and reservation set through AoE on leader %s", leader1.ID)

	w := newWorkload(cl, rem, c.initial, 4<<20)
	w.start(150 * time.Second)
	defer w.stop()
	if !w.waitProgress(time.Now(), 200, 15*time.Second) {
		t.Fatalf("workload makes no progress: %d ops, errors %v", w.ops.Load(), w.errs)
	}

	var killStalls []time.Duration
	killOne := func(k int) {
		l := c.WaitLeader(nil, 15*time.Second)
		time.Sleep(500 * time.Millisecond)
		tk := time.Now()
		c.Stop(l, syscall.SIGKILL)
		if !w.waitProgress(tk, 100, 30*time.Second) {
			t.Fatalf("kill %d: workload did not resume within 30 s after SIGKILL of %s (errors %v)", k, l.ID, w.errs)
		}
		st := w.stallAround(tk)
		nl := c.WaitLeader(l, 15*time.Second)
		killStalls = append(killStalls, st)
		t.Logf("kill %d: SIGKILL leader %s -> new leader %s, workload stall %v", k, l.ID, nl.ID, st.Round(time.Millisecond))
		if k == 1 {
			checkState(t, cl, rem, cfgStr, me)
		}
		c.MustStart(l)
		lag, took := c.WaitCaughtUp(l, 60*time.Second)
		t.Logf("kill %d: %s restarted and caught up in %v (lag %d after)", k, l.ID, took.Round(time.Millisecond), lag)
	}

	killOne(1)

	// Bad joins, with n4 running an image of the wrong size.
	c.WriteImage(n4, "n4-small.img", nil, imgSize/2)
	c.writeConfig(n4, c.Dir+"/n4-bad.data")
	c.MustStart(n4)
	for _, bad := range []string{fmt.Sprintf("%s:7000", ipWithLast(n1.RaftAddr, 77)), fmt.Sprintf("%s:7999", n2.Host.IP())} {
		t0 := time.Now()
		out, err := c.Ctl(n4, "join", bad)
		took := time.Since(t0)
		switch {
		case err == nil:
			t.Errorf("join %s succeeded: %s", bad, out)
		case took > 15*time.Second:
			t.Errorf("join %s took %v to fail (want a fast error): %s", bad, took, out)
		case !strings.Contains(out, bad):
			t.Errorf("join %s: the error does not name the address: %s", bad, out)
		}
		t.Logf("join %s failed after %v: %s", bad, took.Round(time.Millisecond), strings.TrimSpace(out))
	}
	out, err := c.Ctl(n4, "join", n2.RaftAddr)
	if err == nil {
		t.Errorf("join of a node with a %d-byte export succeeded: %s", imgSize/2, out)
	} else if !sizesNamed(out, imgSize, imgSize/2) {
		t.Errorf("size mismatch refusal does not name both sizes (%d and %d): %s", imgSize, imgSize/2, out)
	}
	t.Logf("join with mismatched size refused: %s", strings.TrimSpace(out))
	if cs := c.clusterStatus(n1); len(cs.Nodes) != 3 {
		t.Errorf("after refused joins the cluster has %d members, want 3: %+v", len(cs.Nodes), cs.Nodes)
	}
	c.Stop(n4, syscall.SIGTERM)

	// n4 for real: zero-filled image of the right size, joining under load.
	c.WriteImage(n4, "n4.img", nil, imgSize)
	c.writeConfig(n4, c.Dir+"/n4.data")
	c.MustStart(n4)
	tj := time.Now()
	out = c.MustCtl(n4, "join", n3.RaftAddr)
	t.Logf("join n4 via %s: %s", n3.ID, strings.TrimSpace(lastLine(out)))
	lag, _ := c.WaitCaughtUp(n4, 90*time.Second)
	s4, _ := c.Status(n4)
	t.Logf("n4 caught up %v after join (lag %d), suffrage %s, transfer %+v", time.Since(tj).Round(time.Millisecond), lag, s4.Suffrage, s4.Transfer)
	verify := func() {
		w.Pause()
		defer w.Resume()
		out, err := c.Ctl(n4, "verify")
		if err != nil {
			t.Errorf("cluster verify: %v\n%s", err, out)
			return
		}
		t.Logf("cluster verify:\n%s", strings.TrimSpace(out))
	}
	verify()

	// Planned transfer to n4.
	l := c.WaitLeader(nil, 10*time.Second)
	time.Sleep(500 * time.Millisecond)
	tt := time.Now()
	out = c.MustCtl(l, "transfer", "--to", "n4")
	if !w.waitProgress(tt, 100, 30*time.Second) {
		t.Fatalf("workload did not resume after transfer")
	}
	trStall := w.stallAround(tt)
	nl := c.WaitLeader(nil, 10*time.Second)
	t.Logf("transfer %s -> %s (asked n4): stall %v; %s", l.ID, nl.ID, trStall.Round(time.Millisecond), strings.TrimSpace(lastLine(out)))
	if nl != n4 {
		t.Errorf("transfer --to n4: leader is %s", nl.ID)
	}

	// A follower leaves.
	var leaver *clustertest.Node
	for _, n := range []*clustertest.Node{n2, n3, n1} {
		if n != nl && n.Running() {
			leaver = n
			break
		}
	}
	out = c.MustCtl(leaver, "leave")
	t.Logf("leave %s: %s", leaver.ID, strings.TrimSpace(lastLine(out)))
	cs = c.clusterStatus(nl)
	for _, m := range cs.Nodes {
		if m.ID == leaver.ID {
			t.Errorf("%s still a member after leave: %+v", leaver.ID, cs.Nodes)
		}
	}
	if len(cs.Nodes) != 3 {
		t.Errorf("after leave: %d members, want 3: %+v", len(cs.Nodes), cs.Nodes)
	}
	c.Stop(leaver, syscall.SIGTERM)

	for k := 2; k <= kills; k++ {
		killOne(k)
	}

	checkState(t, cl, rem, cfgStr, me)
	verify()

	w.stop()
	vctx, vcancel := context.WithTimeout(ctx, 60*time.Second)
	if err := w.verifyAll(vctx); err != nil {
		t.Errorf("final read-back: %v", err)
	}
	vcancel()
	med, mx := stats(killStalls)
	t.Logf("RESULT mode=%s ops=%d reads=%d writes=%d errors=%d mismatches=%d kill-stalls=%v median=%v max=%v transfer-stall=%v client=%+v",
		mode, w.ops.Load(), w.reads.Load(), w.writes.Load(), w.nerr.Load(), w.nmism.Load(), roundAll(killStalls),
		med.Round(time.Millisecond), mx.Round(time.Millisecond), trStall.Round(time.Millisecond), cl.Stats())
	if w.nerr.Load() != 0 {
		t.Errorf("%d I/O errors; first: %v", w.nerr.Load(), w.errs)
	}
	if w.nmism.Load() != 0 {
		t.Errorf("%d mismatches; first: %v", w.nmism.Load(), w.mism)
	}

	// Who answered.
	obs.stop()
	// Leaderships seen after the observer started: one per kill and one for
	// the transfer are planned; more are false elections (heartbeats that
	// came late, e.g. on an overloaded host), each a stall for the initiator.
	terms := obs.leaderTerms()
	t.Logf("serving leaders seen per term: %v (%d; planned %d: %d kills + 1 transfer, plus the first)", terms, len(terms), kills+2, kills)
	if v := obs.violations(50 * time.Millisecond); len(v) > 0 {
		t.Errorf("%d AoE responses from nodes that were not leader; first: %s", len(v), strings.Join(v[:min(5, len(v))], "\n"))
	}
	hostMAC := map[aoe.MAC]int{}
	for i := 1; i <= 4; i++ {
		hostMAC[macOf(c.Node(i).Host.MAC)] = i
	}
	bad, perNode := 0, map[int]int{}
	for _, r := range obs.responses() {
		perNode[r.node]++
		if r.node == 0 {
			ok := false
			switch mode {
			case "node":
				_, ok = hostMAC[r.src]
			default:
				ok = r.src == virtMAC
			}
			if !ok {
				bad++
				if bad <= 5 {
					t.Errorf("initiator saw a response from %s (mode %s)", r.src, mode)
				}
			}
			continue
		}
		if mode == "node" && hostMAC[r.src] != r.node {
			bad++
			if bad <= 5 {
				t.Errorf("n%d sent a response with source MAC %s, not its own", r.node, r.src)
			}
		}
		if mode == "virtual" && r.src != virtMAC {
			bad++
			if bad <= 5 {
				t.Errorf("n%d sent a response from %s, not the virtual MAC %s", r.node, r.src, virtMAC)
			}
		}
	}
	t.Logf("AoE responses seen per bridge port (0: at the initiator): %v; bad source MACs: %d; sniffer errors: %v", perNode, bad, obs.rerrs)
	if perNode[0] == 0 || len(perNode) < 3 {
		t.Errorf("the sniffers saw too little to judge who answered: %v", perNode)
	}
}

// checkState reads config string, mask list and reservation through AoE.
func checkState(t *testing.T, cl *aoe.Client, rem aoe.Remote, cfg []byte, me aoe.MAC) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	m, err := cl.QueryConfig(ctx, rem, aoe.ConfigRead, nil)
	if err != nil || string(m.Config) != string(cfg) {
		t.Errorf("config string after failover: %q, %v (want %q)", m.Config, err, cfg)
	}
	macs, err := cl.MaskList(ctx, rem, aoe.MaskRead, nil)
	if err != nil || len(macs) != 1 || macs[0] != me {
		t.Errorf("mask list after failover: %v, %v (want [%s])", macs, err, me)
	}
	res, err := cl.Reserve(ctx, rem, aoe.ReserveRead, nil)
	if err != nil || len(res) != 1 || res[0] != me {
		t.Errorf("reservation after failover: %v, %v (want [%s])", res, err, me)
	}
	if !t.Failed() {
		t.Logf("config string %q, mask list and reservation held across failover", cfg)
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

func ipWithLast(addr string, last int) string {
	host := addr[:strings.LastIndexByte(addr, ':')]
	return host[:strings.LastIndexByte(host, '.')+1] + strconv.Itoa(last)
}

// sizesNamed reports whether msg names both sizes (in bytes, or in MiB).
func sizesNamed(msg string, a, b int64) bool {
	has := func(n int64) bool {
		return strings.Contains(msg, strconv.FormatInt(n, 10)) ||
			regexp.MustCompile(fmt.Sprintf(`\b%d(\.0+)? ?MiB`, n>>20)).MatchString(msg)
	}
	return has(a) && has(b)
}

func roundAll(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	return out
}
