package replication

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/vblade-ha/vblade-ha/aoe"
)

// gatedRaft applies proposals to an FSM in order, like a one-node cluster,
// but holds each one until the test releases it, so that the test decides
// what queues behind a proposal in flight.
type gatedRaft struct {
	fsm     *FSM
	release chan struct{} // one receive per proposal

	mu    sync.Mutex
	next  uint64
	cmds  [][]byte
	apply chan struct{} // signalled when a proposal arrives
}

func newGatedRaft(fsm *FSM, next uint64) *gatedRaft {
	return &gatedRaft{fsm: fsm, next: next, release: make(chan struct{}), apply: make(chan struct{}, 64)}
}

type appliedFuture struct {
	resp any
}

func (f appliedFuture) Error() error  { return nil }
func (f appliedFuture) Response() any { return f.resp }
func (f appliedFuture) Index() uint64 { return 0 }

func (r *gatedRaft) Apply(cmd []byte, _ time.Duration) raft.ApplyFuture {
	r.apply <- struct{}{}
	<-r.release
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cmds = append(r.cmds, append([]byte(nil), cmd...))
	resp := r.fsm.Apply(&raft.Log{Index: r.next, Type: raft.LogCommand, Data: cmd})
	r.next++
	return appliedFuture{resp: resp}
}

func (r *gatedRaft) Barrier(time.Duration) raft.Future { return appliedFuture{} }

func (r *gatedRaft) proposals() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.cmds...)
}

// waitQueued waits until n writes wait in rep's committer for the next round.
func waitQueued(t *testing.T, rep *Replicator, n int) {
	t.Helper()
	eventually(t, 5*time.Second, fmt.Sprintf("%d writes queued", n), func() error {
		rep.writes.mu.Lock()
		defer rep.writes.mu.Unlock()
		if got := rep.writes.queued; got != n {
			return fmt.Errorf("%d queued", got)
		}
		return nil
	})
}

// TestGroupCommit: writes that arrive while a proposal is in flight go out
// together as one Batch entry once it is answered, each caller gets its own
// outcome (a rejected write among them fails alone), and the image holds
// every applied write.
func TestGroupCommit(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 1 << 20, tB: 1 << 20})
	fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 1 << 20}) // tB never added: its writes are rejected
	gr := newGatedRaft(fx.fsm, fx.next)
	rep := NewReplicator(gr, fx.fsm, ReplicatorOptions{MaxLinger: 50 * time.Millisecond})
	sa, _ := rep.Store(tA)
	sb, _ := rep.Store(tB)
	ctx := context.Background()

	// The first write is proposed alone, at once.
	first := make(chan error, 1)
	go func() { first <- sa.WriteAt(ctx, pattern(1, 512), 0) }()
	<-gr.apply

	// Ten more arrive while it is in flight: eight adjacent ones (a
	// sequential writer's window), one elsewhere, one for a target that
	// does not exist.
	type result struct {
		i   int
		err error
	}
	results := make(chan result, 10)
	var started sync.WaitGroup
	for i := 0; i < 10; i++ {
		started.Add(1)
		go func() {
			started.Done()
			var err error
			switch {
			case i < 8:
				err = sa.WriteAtOnce(ctx, pattern(10+i, 1024), 4096+int64(i)*1024, aoe.RequestID{Src: aoe.MAC{2, 0, 0, 0, 0, 1}, Tag: uint32(i)})
			case i == 8:
				err = sa.WriteAt(ctx, pattern(99, 512), 1<<19)
			default:
				err = sb.WriteAt(ctx, pattern(98, 512), 0)
			}
			results <- result{i, err}
		}()
	}
	started.Wait()
	waitQueued(t, rep, 10)
	gr.release <- struct{}{} // the first proposal is answered
	if err := <-first; err != nil {
		t.Fatalf("first write: %v", err)
	}
	<-gr.apply
	gr.release <- struct{}{} // the batch
	for range 10 {
		r := <-results
		if r.i == 9 {
			if !errors.Is(r.err, ErrUnknownTarget) || errors.Is(r.err, aoe.ErrNoReply) {
				t.Errorf("write to a target never added: %v, want a rejection", r.err)
			}
			continue
		}
		if r.err != nil {
			t.Errorf("write %d: %v", r.i, r.err)
		}
	}

	cmds := gr.proposals()
	if len(cmds) != 2 {
		t.Fatalf("%d proposals, want 2 (one alone, one batch)", len(cmds))
	}
	single, err := DecodeEntry(cmds[0])
	if err != nil || single.Op != OpWrite || cmds[0][0] != entryVersionSingle {
		t.Fatalf("a write proposed alone must be a plain version %d Write: %+v (version %d), %v", entryVersionSingle, single, cmds[0][0], err)
	}
	batch, err := DecodeEntry(cmds[1])
	if err != nil || batch.Op != OpBatch || len(batch.Batch) != 10 {
		t.Fatalf("second proposal: %v %d entries, %v; want a batch of 10", batch.Op, len(batch.Batch), err)
	}
	if p, w := rep.WriteStats(); p != 2 || w != 11 {
		t.Errorf("WriteStats = %d proposals, %d writes; want 2, 11", p, w)
	}

	img := fx.disks[tA].bytes()
	want := func(what string, off int, data []byte) {
		if !bytes.Equal(img[off:off+len(data)], data) {
			t.Errorf("%s: image differs at %d", what, off)
		}
	}
	want("first write", 0, pattern(1, 512))
	for i := 0; i < 8; i++ {
		want("adjacent write", 4096+i*1024, pattern(10+i, 1024))
	}
	want("lone write", 1<<19, pattern(99, 512))
}

// TestGroupCommitSingleWriterDoesNotWait: a synchronous writer is never held
// for a window that is not there; each write is its own plain entry.
func TestGroupCommitSingleWriterDoesNotWait(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 1 << 20})
	fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 1 << 20})
	gr := newGatedRaft(fx.fsm, fx.next)
	close(gr.release) // answer every proposal at once
	// A long linger: if a lone writer waited for it, 20 writes would take 20 s.
	rep := NewReplicator(gr, fx.fsm, ReplicatorOptions{MaxLinger: time.Second})
	s, _ := rep.Store(tA)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range 20 {
		if err := s.WriteAt(ctx, pattern(i, 512), int64(i)*512); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if p, w := rep.WriteStats(); p != 20 || w != 20 {
		t.Errorf("WriteStats = %d proposals, %d writes; want 20, 20", p, w)
	}
}

// TestGroupCommitCallerGivesUp: a caller whose context ends while its write
// waits behind a proposal returns ErrNoReply at once, and its buffer may be
// reused: if the write is proposed later (with a write whose caller still
// waits) it carries the bytes it was given.
func TestGroupCommitCallerGivesUp(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 1 << 20})
	fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 1 << 20})
	gr := newGatedRaft(fx.fsm, fx.next)
	rep := NewReplicator(gr, fx.fsm, ReplicatorOptions{MaxLinger: -1})
	s, _ := rep.Store(tA)

	first := make(chan error, 1)
	go func() { first <- s.WriteAt(context.Background(), pattern(1, 512), 0) }()
	<-gr.apply

	buf := pattern(2, 512)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := s.WriteAt(ctx, buf, 512); !errors.Is(err, aoe.ErrNoReply) {
		t.Fatalf("write whose context ended: %v, want ErrNoReply", err)
	}
	copy(buf, pattern(3, 512)) // the caller reuses its buffer
	// Another write queues behind it with no deadline, so the group (and
	// the abandoned write in it) is still proposed.
	live := make(chan error, 1)
	go func() { live <- s.WriteAt(context.Background(), pattern(4, 512), 1024) }()
	waitQueued(t, rep, 2)
	gr.release <- struct{}{}
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	<-gr.apply
	gr.release <- struct{}{}
	if err := <-live; err != nil {
		t.Fatal(err)
	}
	if n := len(gr.proposals()); n != 2 {
		t.Fatalf("%d proposals, want 2", n)
	}
	if got := fx.disks[tA].bytes()[512:1024]; !bytes.Equal(got, pattern(2, 512)) {
		t.Error("the queued write changed after its caller reused the buffer")
	}
}

// TestFSMBatchApply: a Batch applies its entries in order, joins adjacent
// writes without changing the result, skips retransmissions, and reports
// rejections entry by entry.
func TestFSMBatchApply(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 1 << 20})
	src := aoe.MAC{2, 0, 0, 0, 0, 7}
	fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 1 << 20})
	w := func(seed int, off int64, tag uint32) Entry {
		return Entry{Op: OpWrite, Target: tA, Offset: off, Data: pattern(seed, 1024), Request: aoe.RequestID{Src: src, Tag: tag}}
	}
	batch := Entry{Op: OpBatch, Batch: []Entry{
		w(1, 0, 1), w(2, 1024, 2), w(3, 2048, 3), // adjacent: one image write
		w(4, 1024, 4), // overlaps the run: must land after it
		{Op: OpWrite, Target: tB, Offset: 0, Data: pattern(5, 512)}, // unknown target
		w(2, 1024, 2), // retransmission of the second write: skipped
		{Op: OpSetState, Target: tA, State: aoe.TargetState{Config: []byte("x")}},
		w(6, 8192, 6),
	}}
	resps := fx.apply(t, batch)
	be, ok := resps[0].(*BatchError)
	if !ok {
		t.Fatalf("response %v (%T), want a *BatchError for the one rejected entry", resps[0], resps[0])
	}
	for i, err := range be.Errs {
		if (i == 4) != (err != nil) {
			t.Errorf("entry %d: %v", i, err)
		}
	}
	if !errors.Is(be.Errs[4], ErrUnknownTarget) {
		t.Errorf("entry 4: %v, want ErrUnknownTarget", be.Errs[4])
	}
	img := fx.disks[tA].bytes()
	for _, c := range []struct {
		off  int
		seed int
	}{{0, 1}, {1024, 4}, {2048, 3}, {8192, 6}} {
		if !bytes.Equal(img[c.off:c.off+1024], pattern(c.seed, 1024)) {
			t.Errorf("image at %d is not write %d's data", c.off, c.seed)
		}
	}
	if fx.fsm.DuplicateWrites() != 1 {
		t.Errorf("%d duplicates skipped, want 1", fx.fsm.DuplicateWrites())
	}
	if st, _ := fx.sink.state(tA); string(st.Config) != "x" {
		t.Errorf("state in the batch not applied: %q", st.Config)
	}
	if fx.fsm.AppliedIndex() != fx.next-1 {
		t.Errorf("applied index %d, want %d", fx.fsm.AppliedIndex(), fx.next-1)
	}
}

// TestGroupCommitSplitsLargeRounds: a round bigger than MaxBatchBytes travels
// as several entries, proposed together in order, and every write lands.
func TestGroupCommitSplitsLargeRounds(t *testing.T) {
	fx := newFSMFixture(t, map[TargetID]int64{tA: 1 << 20})
	fx.apply(t, Entry{Op: OpAddTarget, Target: tA, Size: 1 << 20})
	gr := newGatedRaft(fx.fsm, fx.next)
	rep := NewReplicator(gr, fx.fsm, ReplicatorOptions{MaxLinger: -1, MaxBatchBytes: 8 << 10})
	s, _ := rep.Store(tA)
	ctx := context.Background()

	first := make(chan error, 1)
	go func() { first <- s.WriteAt(ctx, pattern(1, 512), 0) }()
	<-gr.apply
	const n = 12 // 12 x 4 KiB: at most one 8 KiB entry's worth each time
	errs := make(chan error, n)
	for i := range n {
		go func() { errs <- s.WriteAt(ctx, pattern(100+i, 4096), int64(i+1)*4096) }()
	}
	waitQueued(t, rep, n)
	close(gr.release)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	// 4 KiB writes, 8 KiB per entry: one write per entry (two would
	// exceed it with their length fields and headers).
	if p, w := rep.WriteStats(); p != 1+n || w != 1+n {
		t.Errorf("WriteStats = %d proposals, %d writes; want %d, %d", p, w, 1+n, 1+n)
	}
	img := fx.disks[tA].bytes()
	for i := range n {
		off := (i + 1) * 4096
		if !bytes.Equal(img[off:off+4096], pattern(100+i, 4096)) {
			t.Errorf("write %d missing", i)
		}
	}
}
