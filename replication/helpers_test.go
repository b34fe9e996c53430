package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/vblade-ha/vblade-ha/aoe"
)

// memDisk is an in-memory aoe.Disk that models a page cache: writes land in
// live, Flush copies live to synced, Crash throws away what was not synced.
type memDisk struct {
	mu     sync.RWMutex
	live   []byte
	synced []byte
	reads  atomic.Int64
	// fail, when set, is consulted before every write and flush.
	fail atomic.Pointer[func(op string, off int64, n int) error]
}

func newMemDisk(size int64) *memDisk {
	return &memDisk{live: make([]byte, size), synced: make([]byte, size)}
}

func (d *memDisk) Size() int64 { return int64(len(d.live)) }

func (d *memDisk) injected(op string, off int64, n int) error {
	if f := d.fail.Load(); f != nil {
		return (*f)(op, off, n)
	}
	return nil
}

func (d *memDisk) setFail(f func(op string, off int64, n int) error) {
	if f == nil {
		d.fail.Store(nil)
		return
	}
	d.fail.Store(&f)
}

func (d *memDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	d.reads.Add(1)
	d.mu.RLock()
	defer d.mu.RUnlock()
	if off < 0 || off+int64(len(p)) > int64(len(d.live)) {
		return fmt.Errorf("memDisk: read %d at %d out of range", len(p), off)
	}
	copy(p, d.live[off:])
	return nil
}

func (d *memDisk) WriteAt(ctx context.Context, p []byte, off int64) error {
	if err := d.injected("write", off, len(p)); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(d.live)) {
		return fmt.Errorf("memDisk: write %d at %d out of range", len(p), off)
	}
	copy(d.live[off:], p)
	return nil
}

func (d *memDisk) Flush(ctx context.Context) error {
	if err := d.injected("flush", 0, 0); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	copy(d.synced, d.live)
	return nil
}

// Crash loses every write since the last Flush, as a power cut would.
func (d *memDisk) Crash() {
	d.mu.Lock()
	defer d.mu.Unlock()
	copy(d.live, d.synced)
}

func (d *memDisk) bytes() []byte {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return append([]byte(nil), d.live...)
}

// recordingSink is a StateSink + TargetSink that remembers the last state.
type recordingSink struct {
	mu      sync.Mutex
	states  map[TargetID]aoe.TargetState
	targets map[TargetID]int64
}

func newRecordingSink() *recordingSink {
	return &recordingSink{states: map[TargetID]aoe.TargetState{}, targets: map[TargetID]int64{}}
}

func (s *recordingSink) SetState(shelf uint16, slot uint8, st aoe.TargetState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.states[TargetID{shelf, slot}] = st
}

func (s *recordingSink) AddTarget(shelf uint16, slot uint8, size int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.targets[TargetID{shelf, slot}] = size
}

func (s *recordingSink) RemoveTarget(shelf uint16, slot uint8) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.targets, TargetID{shelf, slot})
	delete(s.states, TargetID{shelf, slot})
}

func (s *recordingSink) state(id TargetID) (aoe.TargetState, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.states[id]
	return st, ok
}

// eventually polls cond until it returns nil or the deadline passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached within %v: %v", what, timeout, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type clusterOptions struct {
	nodes             int
	targets           map[TargetID]int64
	snapshotThreshold uint64
	trailingLogs      uint64
	bolt              bool // raft-boltdb log/stable store and file snapshots in a temp dir
	chunk             int
}

type testNode struct {
	id    raft.ServerID
	addr  raft.ServerAddress
	dir   string
	disks map[TargetID]*memDisk

	logs   raft.LogStore
	stable raft.StableStore
	inner  raft.SnapshotStore
	bolt   *raftboltdb.BoltStore

	trans *raft.InmemTransport
	fsm   *FSM
	snaps *SnapshotStore
	raft  *raft.Raft
	rep   *Replicator
	sink  *recordingSink

	mu       sync.Mutex
	progress []TransferProgress
	fatals   []error
	running  *raft.Raft // the instance OnFatal stops
	halted   bool       // OnFatal finished shutting Raft down
}

func (n *testNode) transfers() []TransferProgress {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]TransferProgress(nil), n.progress...)
}

func (n *testNode) fatalErrs() []error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]error(nil), n.fatals...)
}

type testCluster struct {
	t     testing.TB
	opts  clusterOptions
	nodes []*testNode
}

func raftLogOutput() io.Writer {
	if os.Getenv("VBLADE_RAFT_LOG") != "" {
		return os.Stderr
	}
	return io.Discard
}

func newTestCluster(t testing.TB, opts clusterOptions) *testCluster {
	t.Helper()
	if opts.nodes == 0 {
		opts.nodes = 3
	}
	if opts.targets == nil {
		opts.targets = map[TargetID]int64{{1, 0}: 256 << 10, {1, 1}: 64 << 10}
	}
	c := &testCluster{t: t, opts: opts}
	var servers []raft.Server
	for i := range opts.nodes {
		n := &testNode{
			id:    raft.ServerID(fmt.Sprintf("n%d", i)),
			addr:  raft.ServerAddress(fmt.Sprintf("addr%d", i)),
			disks: map[TargetID]*memDisk{},
		}
		for id, size := range opts.targets {
			n.disks[id] = newMemDisk(size)
		}
		if opts.bolt {
			n.dir = filepath.Join(t.TempDir(), string(n.id))
		}
		c.openStores(n)
		c.nodes = append(c.nodes, n)
		servers = append(servers, raft.Server{ID: n.id, Address: n.addr})
	}
	for _, n := range c.nodes {
		c.start(n)
	}
	if err := c.nodes[0].raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil {
		t.Fatalf("bootstrap: %v", err)
	}
	t.Cleanup(c.shutdown)
	for id, size := range opts.targets {
		c.retry("add target "+id.String(), func(l *testNode) error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			return l.rep.AddTarget(ctx, id, size)
		})
	}
	return c
}

func (c *testCluster) openStores(n *testNode) {
	if !c.opts.bolt {
		if n.logs == nil {
			st := raft.NewInmemStore()
			n.logs, n.stable, n.inner = st, st, raft.NewInmemSnapshotStore()
		}
		return
	}
	if err := os.MkdirAll(n.dir, 0o755); err != nil {
		c.t.Fatal(err)
	}
	b, err := raftboltdb.NewBoltStore(filepath.Join(n.dir, "raft.db"))
	if err != nil {
		c.t.Fatalf("open bolt: %v", err)
	}
	n.bolt, n.logs, n.stable = b, b, b
	fs, err := raft.NewFileSnapshotStore(n.dir, 2, raftLogOutput())
	if err != nil {
		c.t.Fatalf("open snapshots: %v", err)
	}
	n.inner = fs
}

// start builds a fresh FSM, snapshot store, transport and Raft over the
// node's stores and disks, as a process start would.
func (c *testCluster) start(n *testNode) {
	c.t.Helper()
	disks := map[TargetID]aoe.Disk{}
	for id, d := range n.disks {
		disks[id] = d
	}
	n.sink = newRecordingSink()
	n.fsm = NewFSM(FSMOptions{Disks: disks, Sink: n.sink, OnFatal: func(err error) {
		// What the node layer does: record, then stop Raft so that this
		// node neither serves nor becomes leader with a hole in its image.
		n.mu.Lock()
		n.fatals = append(n.fatals, err)
		r := n.running
		n.mu.Unlock()
		if r != nil {
			r.Shutdown().Error() // waits for Raft's goroutines to exit
			n.mu.Lock()
			n.halted = true
			n.mu.Unlock()
		}
	}})
	n.snaps = NewSnapshotStore(n.inner, n.fsm, SnapshotStoreOptions{ChunkSize: c.opts.chunk, Progress: func(p TransferProgress) {
		n.mu.Lock()
		n.progress = append(n.progress, p)
		n.mu.Unlock()
	}})
	_, n.trans = raft.NewInmemTransport(n.addr)
	for _, o := range c.nodes {
		if o == n || o.trans == nil {
			continue
		}
		n.trans.Connect(o.addr, o.trans)
		o.trans.Connect(n.addr, n.trans)
	}

	conf := raft.DefaultConfig()
	TuneConfig(conf)
	conf.LocalID = n.id
	conf.HeartbeatTimeout = 100 * time.Millisecond
	conf.ElectionTimeout = 100 * time.Millisecond
	conf.LeaderLeaseTimeout = 100 * time.Millisecond
	conf.CommitTimeout = 5 * time.Millisecond
	conf.LogOutput = raftLogOutput()
	if c.opts.snapshotThreshold > 0 {
		conf.SnapshotThreshold = c.opts.snapshotThreshold
		conf.SnapshotInterval = 20 * time.Millisecond
		conf.TrailingLogs = c.opts.trailingLogs
	}
	r, err := raft.NewRaft(conf, n.fsm, n.logs, n.stable, n.snaps, n.trans)
	if err != nil {
		c.t.Fatalf("start raft on %s: %v", n.id, err)
	}
	n.raft = r
	n.mu.Lock()
	n.running = r
	n.mu.Unlock()
	n.rep = NewReplicator(r, n.fsm, ReplicatorOptions{Timeout: 5 * time.Second})
}

func (c *testCluster) stop(n *testNode) {
	if n.raft == nil {
		return
	}
	if err := n.raft.Shutdown().Error(); err != nil {
		c.t.Errorf("shutdown %s: %v", n.id, err)
	}
	n.raft = nil
	for _, o := range c.nodes {
		if o != n && o.trans != nil {
			o.trans.Disconnect(n.addr)
		}
	}
	n.trans = nil
	if n.bolt != nil {
		n.bolt.Close()
		n.bolt = nil
	}
}

// restart stops n if needed and starts it again over the same stores and
// disks (reopening bolt from its files).
func (c *testCluster) restart(n *testNode) {
	c.stop(n)
	c.openStores(n)
	c.start(n)
}

func (c *testCluster) shutdown() {
	for _, n := range c.nodes {
		c.stop(n)
	}
}

// leader waits for exactly one running node to lead and returns it.
func (c *testCluster) leader() *testNode {
	c.t.Helper()
	var l *testNode
	eventually(c.t, 10*time.Second, "leader election", func() error {
		l = nil
		for _, n := range c.nodes {
			if n.raft != nil && n.raft.State() == raft.Leader {
				if l != nil {
					return fmt.Errorf("two leaders: %s and %s", l.id, n.id)
				}
				l = n
			}
		}
		if l == nil {
			return fmt.Errorf("no leader")
		}
		return nil
	})
	return l
}

func (c *testCluster) running() []*testNode {
	var out []*testNode
	for _, n := range c.nodes {
		if n.raft != nil {
			out = append(out, n)
		}
	}
	return out
}

// addNode starts a node that is not in the cluster yet, with garbage in its
// images (a joining node's files hold whatever they held before).
func (c *testCluster) addNode() *testNode {
	c.t.Helper()
	i := len(c.nodes)
	n := &testNode{
		id:    raft.ServerID(fmt.Sprintf("n%d", i)),
		addr:  raft.ServerAddress(fmt.Sprintf("addr%d", i)),
		disks: map[TargetID]*memDisk{},
	}
	for id, size := range c.opts.targets {
		n.disks[id] = newMemDisk(size)
		copy(n.disks[id].live, pattern(i*1000, int(size)))
	}
	if c.opts.bolt {
		n.dir = filepath.Join(c.t.TempDir(), string(n.id))
	}
	c.openStores(n)
	c.nodes = append(c.nodes, n)
	c.start(n)
	return n
}

// follower returns a running node that does not lead.
func (c *testCluster) follower() *testNode {
	l := c.leader()
	for _, n := range c.nodes {
		if n != l && n.raft != nil {
			return n
		}
	}
	c.t.Fatal("no follower")
	return nil
}

// isolate cuts n off from every other node (or reconnects it).
func (c *testCluster) isolate(n *testNode, cut bool) {
	for _, o := range c.nodes {
		if o == n || o.trans == nil {
			continue
		}
		if cut {
			o.trans.Disconnect(n.addr)
			n.trans.Disconnect(o.addr)
		} else {
			o.trans.Connect(n.addr, n.trans)
			n.trans.Connect(o.addr, o.trans)
		}
	}
}

// commit replicates a target state through the current leader.
func (c *testCluster) commit(id TargetID, st aoe.TargetState) {
	c.t.Helper()
	c.retry("commit state of "+id.String(), func(l *testNode) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return l.rep.Commit(ctx, id.Shelf, id.Slot, st)
	})
}

// retry runs op against the current leader until it succeeds, retrying
// what an initiator would retransmit (errors wrapping aoe.ErrNoReply: the
// leader changed or timed out) until the deadline.
func (c *testCluster) retry(what string, op func(l *testNode) error) {
	c.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := op(c.leader())
		if err == nil {
			return
		}
		if !errors.Is(err, aoe.ErrNoReply) || time.Now().After(deadline) {
			c.t.Fatalf("%s: %v", what, err)
		}
	}
}

// waitConverged waits until every given node's images equal want's.
func (c *testCluster) waitConverged(timeout time.Duration, want *testNode, nodes ...*testNode) {
	c.t.Helper()
	ctx := context.Background()
	eventually(c.t, timeout, "images converge", func() error {
		for id := range c.opts.targets {
			ws, err := ImageChecksum(ctx, want.disks[id])
			if err != nil {
				return err
			}
			for _, n := range nodes {
				if n == want {
					continue
				}
				// A restarted node replays the log over an image that may
				// already hold the final bytes: equal images prove nothing
				// until it has applied as far as want.
				if n.fsm.AppliedIndex() < want.fsm.AppliedIndex() {
					return fmt.Errorf("%s has applied %d of %d", n.id, n.fsm.AppliedIndex(), want.fsm.AppliedIndex())
				}
				s, err := ImageChecksum(ctx, n.disks[id])
				if err != nil {
					return err
				}
				if s != ws {
					return fmt.Errorf("%v on %s differs from %s (applied %d vs %d)", id, n.id, want.id,
						n.fsm.AppliedIndex(), want.fsm.AppliedIndex())
				}
			}
		}
		return nil
	})
}

// pattern returns n bytes derived from seed, so every write is distinct.
func pattern(seed, n int) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}
