package replication

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/vblade-ha/vblade-ha/aoe"
)

// model is what the test expects every image to hold: the acknowledged writes.
type model map[TargetID][]byte

func newModel(targets map[TargetID]int64) model {
	m := model{}
	for id, size := range targets {
		m[id] = make([]byte, size)
	}
	return m
}

// writeVia sends one write through n's Store and records it in m if acked.
func (m model) writeVia(t testing.TB, n *testNode, id TargetID, off int64, data []byte) error {
	t.Helper()
	s, err := n.rep.Store(id)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.WriteAt(ctx, data, off); err != nil {
		return err
	}
	copy(m[id][off:], data)
	return nil
}

// writeMany writes count distinct sector runs spread over target id through
// the current leader, retransmitting dropped writes as an initiator does.
func (m model) writeMany(t testing.TB, c *testCluster, id TargetID, seed, count int) {
	t.Helper()
	size := int64(len(m[id]))
	for i := range count {
		data := pattern(seed+i, 512*(1+i%4))
		off := (int64(seed+i) * 7 * 512) % (size - int64(len(data)))
		off -= off % SectorSize
		c.retry(fmt.Sprintf("write %d", i), func(l *testNode) error { return m.writeVia(t, l, id, off, data) })
	}
}

func (m model) check(t testing.TB, n *testNode) {
	t.Helper()
	for id, want := range m {
		if got := n.disks[id].bytes(); !bytes.Equal(got, want) {
			t.Fatalf("%v on %s does not hold every acknowledged write", id, n.id)
		}
	}
}

// readThrough reads the whole target through n's Store (the leader path).
func readThrough(t testing.TB, n *testNode, id TargetID) []byte {
	t.Helper()
	s, err := n.rep.Store(id)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, s.Size())
	if err := s.ReadAt(context.Background(), buf, 0); err != nil {
		t.Fatalf("read %v via %s: %v", id, n.id, err)
	}
	return buf
}

func TestClusterReplicatesWritesAndState(t *testing.T) {
	c := newTestCluster(t, clusterOptions{})
	m := newModel(c.opts.targets)
	m.writeMany(t, c, tA, 0, 50)
	m.writeMany(t, c, tB, 1000, 20)

	st := aoe.TargetState{Config: []byte("shared"), Masks: []aoe.MAC{{2, 0, 0, 0, 0, 1}}, Reservations: []aoe.MAC{{2, 0, 0, 0, 0, 2}}}
	var l *testNode
	c.retry("commit state and flush", func(n *testNode) error {
		l = n
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := n.rep.Commit(ctx, tA.Shelf, tA.Slot, st); err != nil {
			return err
		}
		s, _ := n.rep.Store(tA)
		if err := s.Flush(ctx); err != nil {
			return err
		}
		// Acked means applied on the leader: a read right after sees it.
		if !bytes.Equal(readThrough(t, n, tA), m[tA]) {
			t.Fatal("leader read does not return the acknowledged writes")
		}
		return nil
	})
	c.waitConverged(10*time.Second, l, c.nodes...)
	for _, n := range c.nodes {
		m.check(t, n)
		eventually(t, 5*time.Second, "state on "+string(n.id), func() error {
			if got, ok := n.sink.state(tA); !ok || !got.Equal(st) {
				return fmt.Errorf("state %+v", got)
			}
			return nil
		})
	}

	// A follower refuses to propose: the engine drops the command.
	for _, n := range c.nodes {
		if n == l {
			continue
		}
		if n.raft.State() == raft.Leader {
			continue // leadership moved meanwhile
		}
		err := m.writeVia(t, n, tA, 0, pattern(1, 512))
		if !errors.Is(err, aoe.ErrNoReply) || !errors.Is(err, raft.ErrNotLeader) {
			t.Fatalf("write via follower %s: %v, want ErrNoReply wrapping ErrNotLeader", n.id, err)
		}
	}
}

func TestLeaderFailoverKeepsAckedWrites(t *testing.T) {
	c := newTestCluster(t, clusterOptions{})
	m := newModel(c.opts.targets)
	for round := range 2 {
		m.writeMany(t, c, tA, round*100, 60)
		l := c.leader()
		c.stop(l) // the leader dies right after its last ack
		c.retry("barrier and read on the new leader", func(nl *testNode) error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := nl.rep.Barrier(ctx); err != nil {
				return err
			}
			if !bytes.Equal(readThrough(t, nl, tA), m[tA]) {
				t.Fatalf("round %d: new leader %s lost acknowledged writes", round, nl.id)
			}
			return nil
		})
		m.writeMany(t, c, tA, round*100+50, 10)
		c.restart(l) // the old leader returns and catches up from the log
		c.waitConverged(10*time.Second, c.leader(), c.running()...)
	}
}

func TestFollowerCatchesUpWithFullImage(t *testing.T) {
	c := newTestCluster(t, clusterOptions{snapshotThreshold: 16, trailingLogs: 4, chunk: 16 << 10})
	m := newModel(c.opts.targets)
	m.writeMany(t, c, tA, 0, 10)
	l := c.leader()
	c.waitConverged(10*time.Second, l, c.nodes...)

	f := c.follower()
	// Cut f off in both directions; the other two keep a quorum.
	c.isolate(f, true)
	fLast, _ := f.logs.LastIndex()
	m.writeMany(t, c, tA, 500, 150)
	m.writeMany(t, c, tB, 900, 30)
	eventually(t, 10*time.Second, "leader compacts past the follower", func() error {
		first, _ := c.leader().logs.FirstIndex()
		if first <= fLast+1 {
			return fmt.Errorf("leader log starts at %d, follower has up to %d", first, fLast)
		}
		return nil
	})

	// Reconnect while writes continue: the follower must get the image.
	c.isolate(f, false)
	m.writeMany(t, c, tA, 2000, 40)
	c.waitConverged(15*time.Second, c.leader(), c.nodes...)
	m.check(t, f)

	var done *TransferProgress
	for _, p := range f.transfers() {
		if p.Direction == Receiving && p.Done {
			done = &p
		}
	}
	if done == nil || done.Err != nil || done.Bytes != done.Total || done.Total < c.opts.targets[tA]+c.opts.targets[tB] {
		t.Fatalf("follower progress: %+v, want a completed full-image transfer", done)
	}
	for _, n := range c.nodes {
		if n.fsm.streams.Load() != 0 {
			t.Errorf("%s still holds compaction after the transfer", n.id)
		}
	}
}

func TestRestartReplaysOverImage(t *testing.T) {
	c := newTestCluster(t, clusterOptions{bolt: true})
	m := newModel(c.opts.targets)
	st := aoe.TargetState{Config: []byte("before snapshot")}
	c.commit(tB, st)
	m.writeMany(t, c, tA, 0, 40)
	c.waitConverged(10*time.Second, c.leader(), c.nodes...)
	for _, n := range c.nodes {
		if err := n.raft.Snapshot().Error(); err != nil {
			t.Fatalf("snapshot on %s: %v", n.id, err)
		}
	}
	// After the snapshot: more writes and a state change that live only in
	// the bolt log and in unsynced image pages.
	m.writeMany(t, c, tA, 300, 40)
	st2 := aoe.TargetState{Config: []byte("after snapshot"), Masks: []aoe.MAC{{4, 4, 4, 4, 4, 4}}}
	c.commit(tB, st2)
	c.waitConverged(10*time.Second, c.leader(), c.nodes...)

	// Power cut on every node: unsynced image writes are lost.
	for _, n := range c.nodes {
		c.stop(n)
		for _, d := range n.disks {
			d.Crash()
		}
	}
	if bytes.Equal(c.nodes[0].disks[tA].bytes(), m[tA]) {
		t.Fatal("test is vacuous: the crash lost nothing")
	}
	for _, n := range c.nodes {
		c.openStores(n)
		c.start(n)
	}
	c.retry("barrier after restart", func(l *testNode) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return l.rep.Barrier(ctx)
	})
	c.waitConverged(10*time.Second, c.leader(), c.nodes...)
	for _, n := range c.nodes {
		m.check(t, n)
		eventually(t, 5*time.Second, "state replayed on "+string(n.id), func() error {
			if got, _ := n.sink.state(tB); !got.Equal(st2) {
				return fmt.Errorf("state %q", got.Config)
			}
			return nil
		})
	}
}

func TestFollowerDiskFullStopsAndRecovers(t *testing.T) {
	c := newTestCluster(t, clusterOptions{})
	m := newModel(c.opts.targets)
	m.writeMany(t, c, tA, 0, 10)
	c.waitConverged(10*time.Second, c.leader(), c.nodes...)

	f := c.follower()
	f.disks[tA].setFail(func(op string, off int64, n int) error {
		if op == "write" {
			return &fsPathError{op: op, err: syscall.ENOSPC}
		}
		return nil
	})
	// The cluster keeps acknowledging writes with the other two nodes.
	m.writeMany(t, c, tA, 100, 30)
	var fe *FatalError
	eventually(t, 5*time.Second, "follower records the full disk", func() error {
		if err := f.fsm.Err(); !errors.As(err, &fe) {
			return fmt.Errorf("FSM error %v", err)
		}
		return nil
	})
	if !errors.Is(fe, syscall.ENOSPC) || fe.Target != tA {
		t.Fatalf("fatal error %v, want ENOSPC on %v", fe, tA)
	}
	eventually(t, 5*time.Second, "OnFatal", func() error {
		if len(f.fatalErrs()) != 1 {
			return fmt.Errorf("%d OnFatal calls", len(f.fatalErrs()))
		}
		return nil
	})
	if stuck := f.fsm.AppliedIndex(); stuck >= fe.Index {
		t.Fatalf("applied index %d reached the failed entry %d", stuck, fe.Index)
	}
	if _, err := f.fsm.Snapshot(); !errors.Is(err, fe) {
		t.Fatalf("snapshot on a stopped FSM: %v (it would record an index past the hole)", err)
	}
	// OnFatal shut Raft down (the node layer's job): f is out of the cluster
	// and the other two keep serving. The operator frees space and restarts
	// it; it replays the log from its last snapshot.
	eventually(t, 5*time.Second, "raft stopped on the failed node", func() error {
		f.mu.Lock()
		defer f.mu.Unlock()
		if !f.halted {
			return fmt.Errorf("OnFatal has not shut Raft down yet")
		}
		return nil
	})
	m.writeMany(t, c, tA, 200, 10)
	f.disks[tA].setFail(nil)
	c.restart(f)
	c.waitConverged(10*time.Second, c.leader(), c.nodes...)
	m.check(t, f)
	if err := f.fsm.Err(); err != nil {
		t.Fatalf("after restart: %v", err)
	}
}

func TestMismatchedImageSizeStopsNode(t *testing.T) {
	// Node n2 was given a smaller image than the cluster exports.
	c := &testCluster{t: t, opts: clusterOptions{nodes: 3, targets: map[TargetID]int64{tA: 64 << 10}}}
	var servers []raft.Server
	for i := range 3 {
		n := &testNode{id: raft.ServerID(fmt.Sprintf("n%d", i)), addr: raft.ServerAddress(fmt.Sprintf("addr%d", i)),
			disks: map[TargetID]*memDisk{tA: newMemDisk(64 << 10)}}
		if i == 2 {
			n.disks[tA] = newMemDisk(32 << 10)
		}
		c.openStores(n)
		c.nodes = append(c.nodes, n)
		servers = append(servers, raft.Server{ID: n.id, Address: n.addr})
	}
	for _, n := range c.nodes {
		c.start(n)
	}
	t.Cleanup(c.shutdown)
	if err := c.nodes[0].raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil {
		t.Fatal(err)
	}
	// If the mismatched node leads, it drops the request (its FSM stops and
	// OnFatal shuts it down) and the retransmission reaches the next leader.
	c.retry("add target", func(l *testNode) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return l.rep.AddTarget(ctx, tA, 64<<10)
	})
	bad := c.nodes[2]
	eventually(t, 5*time.Second, "mismatched node stops", func() error {
		var fe *FatalError
		if !errors.As(bad.fsm.Err(), &fe) {
			return fmt.Errorf("FSM error %v", bad.fsm.Err())
		}
		return nil
	})
	t.Logf("operator sees: %v", bad.fsm.Err())
}

func TestJoinReceivesFullImage(t *testing.T) {
	c := newTestCluster(t, clusterOptions{chunk: 32 << 10})
	m := newModel(c.opts.targets)
	m.writeMany(t, c, tA, 0, 30)
	n := c.addNode()
	// The log alone would replay 30 writes over n's garbage; the join must
	// ship the image. Writes keep coming while n joins.
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			// Retransmit until acknowledged, as an initiator does (no
			// t.Fatal here: this is not the test goroutine).
			deadline := time.Now().Add(15 * time.Second)
			for acked := false; !acked; {
				if time.Now().After(deadline) {
					t.Errorf("write %d during join never acknowledged", i)
					return
				}
				for _, l := range c.running() {
					if l.raft.State() != raft.Leader {
						continue
					}
					err := m.writeVia(t, l, tB, int64(i%64)*512, pattern(5000+i, 512))
					if err != nil && !errors.Is(err, aoe.ErrNoReply) {
						t.Errorf("write during join: %v", err)
						return
					}
					acked = err == nil
				}
				if !acked {
					time.Sleep(time.Millisecond) // back off while there is no leader
				}
			}
		}
	}()
	c.retry("join", func(l *testNode) error {
		if err := ForceImageTransfer(l.raft); err != nil {
			return fmt.Errorf("%w: %w", aoe.ErrNoReply, err) // retry: another stream may be open
		}
		return l.raft.AddVoter(n.id, n.addr, 0, 5*time.Second).Error()
	})
	eventually(t, 10*time.Second, "joined node installs an image", func() error {
		for _, p := range n.transfers() {
			if p.Direction == Receiving && p.Done && p.Err == nil {
				return nil
			}
		}
		return fmt.Errorf("no completed transfer yet")
	})
	close(stop)
	<-done
	c.waitConverged(15*time.Second, c.leader(), c.running()...)
	m.check(t, n)
}
