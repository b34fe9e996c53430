package cluster_test

// Harness of the cluster integration test: real `vblade node` processes in
// netlab namespaces, vbladectl for every operator action, the node admin API
// (HTTP on the unix socket) for cheap status polling, a verifying in-process
// AoE workload on a root port, and sniffers that attribute every AoE
// response to the node that sent it.
//
// Network rule: every AoE socket this file opens is on an interface netlab
// created for this test (the root port, or a bridge port inside the LAN's
// bridge namespace). Raft runs on the namespaces' 10.99.<subnet>.N addresses.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdlayher/packet"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/internal/clustertest"
	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

const (
	shelf   = 1
	slotNo  = 0
	imgSize = 16 << 20
	blockSz = 1024 // one AoE frame at MTU 1500: every workload op is one command
)

// ---------------------------------------------------------------- cluster

type cluster struct {
	*clustertest.Cluster
	mode    string
	initial []byte // the image content every founding node starts with
}

// newCluster builds a LAN of four node hosts and a root port; images and
// configurations are written per node by the test (writeImage, writeConfig).
func newCluster(t *testing.T, mode string, subnet int) *cluster {
	c := &cluster{mode: mode, Cluster: clustertest.New(t, clustertest.Options{
		Nodes: 4, RootPorts: 1, Subnet: subnet,
		Config: clustertest.Config{ClusterName: "vbha-it", MACMode: mode, LogLevel: "info",
			Shelf: shelf, Slot: slotNo, Bufcnt: 16},
	})}
	c.initial = make([]byte, imgSize)
	r := rand.New(rand.NewPCG(uint64(subnet), 42))
	for i := 0; i < len(c.initial); i += 8 {
		binary.LittleEndian.PutUint64(c.initial[i:], r.Uint64())
	}
	return c
}

// writeConfig writes n's configuration with its data in dataDir.
func (c *cluster) writeConfig(n *clustertest.Node, dataDir string) {
	n.DataDir = dataDir
	c.WriteConfig(n)
}

// clusterStatus is what `vbladectl cluster status --json` prints.
type clusterStatus struct {
	InCluster   bool   `json:"in_cluster"`
	Leader      string `json:"leader"`
	Term        uint64 `json:"term"`
	CommitIndex uint64 `json:"commit_index"`
	Nodes       []struct {
		ID           string `json:"id"`
		Address      string `json:"address"`
		Role         string `json:"role"`
		Suffrage     string `json:"suffrage"`
		AppliedIndex uint64 `json:"applied_index"`
		Lag          uint64 `json:"lag"`
	} `json:"nodes"`
	Targets []struct {
		Target string `json:"target"`
		Node   string `json:"node"`
		MAC    string `json:"mac"`
	} `json:"targets"`
}

func (c *cluster) clusterStatus(n *clustertest.Node) clusterStatus {
	c.T.Helper()
	out := c.MustCtl(n, "status", "--json")
	var s clusterStatus
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		c.T.Fatalf("cluster status --json on %s: %v\n%s", n.ID, err, out)
	}
	return s
}

// ---------------------------------------------------------------- workload

// workload keeps `workers` single-frame commands in flight against the
// target. Worker w owns the blocks b with b%workers == w, so the last
// acknowledged write of every block is known exactly; every read is checked
// against it (or, after a write that failed, against either candidate).
type workload struct {
	c       *aoe.Client
	rem     aoe.Remote
	initial []byte
	nblocks int
	workers int

	acked   []uint64 // generation last acknowledged per block (0: initial content)
	pending []uint64 // generation of a write that failed (unknown outcome), 0 if none

	pause sync.RWMutex

	mu    sync.Mutex
	times []int64 // completion times (UnixNano)
	mism  []string
	errs  []string

	ops, reads, writes, nerr, nmism atomic.Int64
	cancel                          context.CancelFunc
	done                            chan struct{}
}

func newWorkload(c *aoe.Client, rem aoe.Remote, initial []byte, span int) *workload {
	nb := span / blockSz
	return &workload{c: c, rem: rem, initial: initial, nblocks: nb, workers: 8,
		acked: make([]uint64, nb), pending: make([]uint64, nb), done: make(chan struct{})}
}

func blockContent(b []byte, block int, gen uint64) {
	binary.LittleEndian.PutUint64(b[0:], uint64(block))
	binary.LittleEndian.PutUint64(b[8:], gen)
	copy(b[16:24], "vbha-it!")
	r := rand.New(rand.NewPCG(uint64(block), gen))
	for i := 24; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
}

func (w *workload) expected(block int, gen uint64, b []byte) {
	if gen == 0 {
		copy(b, w.initial[block*blockSz:(block+1)*blockSz])
		return
	}
	blockContent(b, block, gen)
}

func describe(b []byte) string {
	if bytes.Equal(b[16:24], []byte("vbha-it!")) {
		return fmt.Sprintf("block %d gen %d", binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint64(b[8:]))
	}
	return fmt.Sprintf("not a workload block (% x...)", b[:16])
}

// check compares a read of block with what it must hold.
func (w *workload) check(block int, got []byte) bool {
	exp := make([]byte, blockSz)
	w.expected(block, w.acked[block], exp)
	if bytes.Equal(got, exp) {
		return true
	}
	if p := w.pending[block]; p != 0 {
		w.expected(block, p, exp)
		if bytes.Equal(got, exp) {
			w.acked[block], w.pending[block] = p, 0
			return true
		}
	}
	w.nmism.Add(1)
	w.mu.Lock()
	if len(w.mism) < 10 {
		w.mism = append(w.mism, fmt.Sprintf("block %d: want gen %d (pending %d), read %s", block, w.acked[block], w.pending[block], describe(got)))
	}
	w.mu.Unlock()
	return false
}

func (w *workload) fail(err error) {
	w.nerr.Add(1)
	w.mu.Lock()
	if len(w.errs) < 10 {
		w.errs = append(w.errs, time.Now().Format("15:04:05.000")+" "+err.Error())
	}
	w.mu.Unlock()
}

func (w *workload) start(limit time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	w.cancel = cancel
	var wg sync.WaitGroup
	for k := 0; k < w.workers; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(k), 7))
			buf := make([]byte, blockSz)
			gen := uint64(k) << 40
			for ctx.Err() == nil && w.ops.Load() < 5_000_000 {
				block := r.IntN(w.nblocks/w.workers)*w.workers + k
				w.pause.RLock()
				octx, ocancel := context.WithTimeout(ctx, 60*time.Second)
				var err error
				write := r.IntN(2) == 0
				if write {
					gen++
					blockContent(buf, block, gen)
					err = w.c.WriteAt(octx, w.rem, buf, uint64(block*blockSz/512))
				} else {
					err = w.c.ReadAt(octx, w.rem, buf, uint64(block*blockSz/512))
				}
				ocancel()
				w.pause.RUnlock()
				if ctx.Err() != nil {
					// Stopping: an interrupted command is no I/O error, but
					// an interrupted write may or may not have landed.
					if write && err != nil {
						w.pending[block] = gen
					} else if write {
						w.acked[block], w.pending[block] = gen, 0
					}
					return
				}
				if err != nil {
					w.fail(err)
					if write {
						w.pending[block] = gen
					}
					continue
				}
				now := time.Now().UnixNano()
				w.mu.Lock()
				w.times = append(w.times, now)
				w.mu.Unlock()
				w.ops.Add(1)
				if write {
					w.writes.Add(1)
					w.acked[block], w.pending[block] = gen, 0
				} else {
					w.reads.Add(1)
					w.check(block, buf)
				}
			}
		}()
	}
	go func() { wg.Wait(); close(w.done) }()
}

func (w *workload) stop() {
	w.cancel()
	<-w.done
}

// Pause waits for in-flight commands and holds new ones.
func (w *workload) Pause()  { w.pause.Lock() }
func (w *workload) Resume() { w.pause.Unlock() }

func (w *workload) completionsSince(t time.Time) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for i := len(w.times) - 1; i >= 0 && w.times[i] > t.UnixNano(); i-- {
		n++
	}
	return n
}

// stallAround is the longest gap between two consecutive completions from
// the last one before t up to 10 s after t: the workload's view of a
// failover that began at t (answers already on the wire when the leader died
// may land just after t, so the first gap after t is not enough).
func (w *workload) stallAround(t time.Time) time.Duration {
	w.mu.Lock()
	ts := slices.Clone(w.times)
	w.mu.Unlock()
	slices.Sort(ts)
	i := sort.Search(len(ts), func(i int) bool { return ts[i] > t.UnixNano() })
	if i == 0 || i == len(ts) {
		return -1
	}
	end := t.Add(10 * time.Second).UnixNano()
	var best int64
	for j := i; j < len(ts) && ts[j-1] <= end; j++ {
		best = max(best, ts[j]-ts[j-1])
	}
	return time.Duration(best)
}

// waitProgress waits until n commands completed after t.
func (w *workload) waitProgress(t time.Time, n int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if w.completionsSince(t) >= n {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// verifyAll reads every block once (workload stopped) and checks it.
func (w *workload) verifyAll(ctx context.Context) error {
	buf := make([]byte, 64*blockSz)
	for b := 0; b < w.nblocks; b += 64 {
		n := min(64, w.nblocks-b)
		if err := w.c.ReadAt(ctx, w.rem, buf[:n*blockSz], uint64(b*blockSz/512)); err != nil {
			return err
		}
		for i := 0; i < n; i++ {
			w.check(b+i, buf[i*blockSz:(i+1)*blockSz])
		}
	}
	return nil
}

// ---------------------------------------------------------------- sniffers and status polling

type rsp struct {
	at    time.Time
	node  int // bridge port it came in on (0: seen at the initiator)
	src   aoe.MAC
	cmd   aoe.Command
	isErr bool
}

type poll struct {
	at    time.Time // when the answer arrived (the state held before that)
	sent  time.Time
	node  int
	state string
	term  uint64
	gate  bool
}

type observer struct {
	mu    sync.Mutex
	rsps  []rsp
	polls []poll
	conns []*packet.Conn
	stopc chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
	rerrs []string
}

// observe opens an AoE response sniffer on the initiator's root port and on
// every host's bridge port (inside the bridge namespace: a frame a host sends
// arrives there as received), and polls every running node's status.
func observe(t *testing.T, c *cluster) *observer {
	o := &observer{stopc: make(chan struct{})}
	filter, err := aoe.ResponseFilter()
	if err != nil {
		t.Fatal(err)
	}
	open := func(ns, ifname string, node int) {
		var conn *packet.Conn
		fn := func() error {
			var err error
			conn, err = sniffer(ifname, filter)
			return err
		}
		if ns == "" {
			err = fn()
		} else {
			err = netlab.InNS(ns, fn)
		}
		if err != nil {
			t.Fatalf("sniffer on %s: %v", ifname, err)
		}
		o.conns = append(o.conns, conn)
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			b := make([]byte, 9216)
			for {
				n, _, err := conn.ReadFrom(b)
				if err != nil {
					select {
					case <-o.stopc:
					default:
						o.mu.Lock()
						o.rerrs = append(o.rerrs, fmt.Sprintf("%s: %v", ifname, err))
						o.mu.Unlock()
					}
					return
				}
				var h aoe.Header
				if h.Unmarshal(b[:n]) != nil {
					continue
				}
				o.mu.Lock()
				o.rsps = append(o.rsps, rsp{at: time.Now(), node: node, src: h.Src, cmd: h.Command, isErr: h.IsError()})
				o.mu.Unlock()
			}
		}()
	}
	open("", c.LAN.Root[0].Name, 0)
	for i := 1; i <= 4; i++ {
		open(c.LAN.BridgeNS, fmt.Sprintf("p%d", i), i)
	}
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		tk := time.NewTicker(40 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-o.stopc:
				return
			case <-tk.C:
			}
			for i := 1; i <= 4; i++ {
				n := c.Node(i)
				sent := time.Now()
				s, err := c.Status(n)
				if err != nil {
					continue
				}
				o.mu.Lock()
				o.polls = append(o.polls, poll{at: time.Now(), sent: sent, node: i, state: s.State, term: s.Term, gate: s.GateOpen})
				o.mu.Unlock()
			}
		}
	}()
	return o
}

func (o *observer) stop() {
	o.once.Do(func() {
		close(o.stopc)
		for _, c := range o.conns {
			c.Close()
		}
		o.wg.Wait()
	})
}

// sniffer opens a raw socket for every protocol (ETH_P_ALL) on ifname with
// the AoE response filter, ignoring frames the interface sends. ETH_P_ALL
// because on a bridge port a socket bound to the AoE ethertype sees nothing:
// the bridge consumes the frame before protocol handlers run.
func sniffer(ifname string, filter []bpf.RawInstruction) (*packet.Conn, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, err
	}
	pc, err := packet.Listen(ifi, packet.Raw, unix.ETH_P_ALL, &packet.Config{Filter: filter})
	if err != nil {
		return nil, err
	}
	rc, err := pc.SyscallConn()
	if err == nil {
		err = rc.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1)
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20)
		})
	}
	if err != nil {
		pc.Close()
		return nil, err
	}
	return pc, nil
}

// violations lists responses sent by a node while it was provably not the
// leader: a status poll answered before the frame (by a margin) and the next
// poll after it both say "not leader" in the same term. A node cannot lead
// in between without starting a new term.
func (o *observer) violations(margin time.Duration) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	by := map[int][]poll{}
	for _, p := range o.polls {
		by[p.node] = append(by[p.node], p)
	}
	var out []string
	for _, r := range o.rsps {
		if r.node == 0 {
			continue
		}
		ps := by[r.node]
		i := sort.Search(len(ps), func(i int) bool { return ps[i].at.After(r.at.Add(-margin)) })
		if i == 0 || i >= len(ps) {
			continue
		}
		before := ps[i-1]
		var after *poll
		for j := i; j < len(ps); j++ {
			if ps[j].sent.After(r.at) {
				after = &ps[j]
				break
			}
		}
		if after == nil {
			continue
		}
		if before.state != "leader" && after.state != "leader" && before.term == after.term {
			out = append(out, fmt.Sprintf("n%d sent an AoE response (cmd %d, src %s) at %s while %s in term %d (polls at %s and %s)",
				r.node, r.cmd, r.src, r.at.Format("15:04:05.000"), before.state, before.term,
				before.at.Format("15:04:05.000"), after.at.Format("15:04:05.000")))
		}
	}
	return out
}

// leaderTerms lists the terms in which the polls saw a serving leader, and who.
func (o *observer) leaderTerms() map[uint64]int {
	o.mu.Lock()
	defer o.mu.Unlock()
	m := map[uint64]int{}
	for _, p := range o.polls {
		if p.state == "leader" && p.gate {
			m[p.term] = p.node
		}
	}
	return m
}

// responses returns a copy of what the sniffers saw.
func (o *observer) responses() []rsp {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.rsps)
}

// ---------------------------------------------------------------- small helpers

func stats(ds []time.Duration) (median, maxd time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2], s[len(s)-1]
}

func macOf(hw net.HardwareAddr) aoe.MAC {
	var m aoe.MAC
	copy(m[:], hw)
	return m
}
