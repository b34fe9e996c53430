package replication

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
	"github.com/vblade-ha/vblade-ha/aoe"
)

// Raft is the part of *raft.Raft the leader-side stores use (an interface so
// that error handling can be tested without a cluster).
type Raft interface {
	Apply(cmd []byte, timeout time.Duration) raft.ApplyFuture
	Barrier(timeout time.Duration) raft.Future
}

var _ Raft = (*raft.Raft)(nil)

// DefaultTimeout bounds a proposal whose context has no deadline.
const DefaultTimeout = 10 * time.Second

// ReplicatorOptions configures NewReplicator.
type ReplicatorOptions struct {
	// Timeout bounds a proposal whose context has no deadline
	// (DefaultTimeout when zero).
	Timeout time.Duration
	// MaxLinger bounds how long a finished write proposal waits for the
	// rest of the initiators' window before the next one is proposed
	// (DefaultMaxLinger when zero, no waiting when negative; see group.go).
	MaxLinger time.Duration
	// MaxBatchBytes bounds the encoded writes in one Batch entry
	// (DefaultMaxBatch when zero).
	MaxBatchBytes int
}

// Replicator proposes entries on the leader and waits until they are
// committed and applied. It implements aoe.StateStore, and hands out one Store
// (an aoe.Disk) per target.
type Replicator struct {
	raft    Raft
	fsm     *FSM
	timeout time.Duration
	writes  *committer
}

var _ aoe.StateStore = (*Replicator)(nil)

// NewReplicator returns a Replicator proposing through r to the cluster whose
// local FSM is fsm.
func NewReplicator(r Raft, fsm *FSM, opts ReplicatorOptions) *Replicator {
	t := opts.Timeout
	if t <= 0 {
		t = DefaultTimeout
	}
	p := &Replicator{raft: r, fsm: fsm, timeout: t}
	p.writes = newCommitter(p, opts.MaxLinger, opts.MaxBatchBytes)
	return p
}

func noReply(what string, err error) error {
	return fmt.Errorf("replication: %s: %w: %w", what, aoe.ErrNoReply, err)
}

// timeoutFor turns ctx's deadline into the timeout raft.Apply wants.
func (p *Replicator) timeoutFor(ctx context.Context) (time.Duration, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	d, ok := ctx.Deadline()
	if !ok {
		return p.timeout, nil
	}
	t := time.Until(d)
	if t <= 0 {
		return 0, context.DeadlineExceeded
	}
	return t, nil
}

// wait waits for f, giving up when ctx ends. Giving up does not cancel the
// proposal: it may still commit, which is harmless because nothing was
// acknowledged: the initiator retransmits, and the FSM skips the copy of an
// identified write it already applied (see DESIGN.md, "Retransmitted writes").
func wait(ctx context.Context, f raft.Future) error {
	if ctx.Done() == nil {
		return f.Error()
	}
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// propose replicates e and returns once it is committed and applied on this
// node. Every failure whose outcome is unknown (not leader, leadership lost,
// enqueue timeout, deadline, this node's FSM stopped) wraps aoe.ErrNoReply so
// the command is dropped unanswered; a *RejectedError is returned as is.
// what describes the command for error messages; it is called only on failure,
// so the write path formats nothing when all goes well.
func (p *Replicator) propose(ctx context.Context, e *Entry, what func() string) error {
	if err := p.fsm.Err(); err != nil {
		return noReply(what(), err)
	}
	cmd, err := e.MarshalBinary()
	if err != nil {
		return fmt.Errorf("replication: %s: %w", what(), err)
	}
	timeout, err := p.timeoutFor(ctx)
	if err != nil {
		return noReply(what(), err)
	}
	f := p.raft.Apply(cmd, timeout)
	if err := wait(ctx, f); err != nil {
		return noReply(what(), err)
	}
	if err := outcome(f.Response()); err != nil {
		return fmt.Errorf("replication: %s: %w", what(), err)
	}
	return nil
}

// outcome turns the FSM's response to one (non-Batch) entry into what its
// proposer returns: nil, the *RejectedError, or an error wrapping
// aoe.ErrNoReply.
func outcome(resp any) error {
	switch resp := resp.(type) {
	case nil:
		return nil
	case *RejectedError:
		return resp
	case error:
		// This node could not apply a committed entry (FatalError): the
		// other nodes did, the node must step down, and the initiator's
		// retransmission goes to the next leader.
		return noReplyErr(resp)
	default:
		return fmt.Errorf("unexpected FSM response %T", resp)
	}
}

// Commit implements aoe.StateStore: it replicates the target's new state and
// returns once it is committed and applied.
func (p *Replicator) Commit(ctx context.Context, shelf uint16, slot uint8, s aoe.TargetState) error {
	id := TargetID{Shelf: shelf, Slot: slot}
	return p.propose(ctx, &Entry{Op: OpSetState, Target: id, State: s}, func() string { return "commit state of " + id.String() })
}

// AddTarget adds a target of size bytes to the replicated set. Every node must
// have a local image of that size (a node without one stops with a
// FatalError naming the fix). Adding an existing target with the same size
// succeeds and changes nothing.
func (p *Replicator) AddTarget(ctx context.Context, id TargetID, size int64) error {
	return p.propose(ctx, &Entry{Op: OpAddTarget, Target: id, Size: size}, func() string { return "add target " + id.String() })
}

// RemoveTarget removes a target from the replicated set (the local images stay).
func (p *Replicator) RemoveTarget(ctx context.Context, id TargetID, size int64) error {
	return p.propose(ctx, &Entry{Op: OpRemoveTarget, Target: id, Size: size}, func() string { return "remove target " + id.String() })
}

// Barrier returns once every entry committed before it is applied on this
// node (call it after gaining leadership, before opening the gates).
func (p *Replicator) Barrier(ctx context.Context) error {
	if err := p.fsm.Err(); err != nil {
		return noReply("barrier", err)
	}
	timeout, err := p.timeoutFor(ctx)
	if err != nil {
		return noReply("barrier", err)
	}
	if err := wait(ctx, p.raft.Barrier(timeout)); err != nil {
		return noReply("barrier", err)
	}
	return nil
}

// ErrNoLocalImage is returned by Replicator.Store for a target this node has
// no image for.
var ErrNoLocalImage = errors.New("no local image for target")

// WriteStats reports how many log entries were proposed for writes on this
// node and how many writes they carried (group commit: see group.go).
func (p *Replicator) WriteStats() (proposals, writes uint64) {
	return p.writes.proposals.Load(), p.writes.writes.Load()
}

// Store returns the replicated aoe.Disk for id.
func (p *Replicator) Store(id TargetID) (*Store, error) {
	d := p.fsm.Disk(id)
	if d == nil {
		return nil, fmt.Errorf("replication: store for %v: %w", id, ErrNoLocalImage)
	}
	return &Store{rep: p, id: id, disk: d, size: d.Size()}, nil
}

// Store is one target's replicated disk on the leader. Reads come from the
// local image; a write returns nil only once it is committed on a quorum and
// applied here. The node must only let the engine use it while this node
// leads (the gate); the Store itself does not check leadership for reads.
type Store struct {
	rep  *Replicator
	id   TargetID
	disk aoe.Disk
	size int64
}

var (
	_ aoe.Disk        = (*Store)(nil)
	_ aoe.DedupWriter = (*Store)(nil)
)

// Size implements aoe.Disk.
func (s *Store) Size() int64 { return s.size }

// ID is the target this store serves.
func (s *Store) ID() TargetID { return s.id }

func (s *Store) check(op string, n int, off int64) error {
	if off < 0 || off+int64(n) > s.size {
		return fmt.Errorf("replication: %s %d bytes at %d on %v: beyond the %d-byte image", op, n, off, s.id, s.size)
	}
	if err := s.rep.fsm.Err(); err != nil {
		// The local image stopped at a hole: it must not be served.
		return noReply(op+" on "+s.id.String(), err)
	}
	return nil
}

// ReadAt implements aoe.Disk from the local image.
func (s *Store) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := s.check("read", len(p), off); err != nil {
		return err
	}
	if err := s.disk.ReadAt(ctx, p, off); err != nil {
		return fmt.Errorf("replication: read %d bytes at %d from %v: %w", len(p), off, s.id, err)
	}
	return nil
}

// WriteAt implements aoe.Disk: a Write entry (alone, or in a Batch with
// writes that arrived at the same time), acknowledged after commit and apply.
// p is copied at once, so the caller may reuse it when WriteAt returns, even
// with an error.
func (s *Store) WriteAt(ctx context.Context, p []byte, off int64) error {
	return s.WriteAtOnce(ctx, p, off, aoe.RequestID{})
}

// WriteAtOnce implements aoe.DedupWriter: WriteAt with the request's identity
// in the log entry. Every node's FSM skips the entry if it is the
// retransmission of an identified write it applied within the last
// DedupWindow identified writes to this target (same source, tag, offset,
// length and data), and the copy is acknowledged like the original, on this
// leader or on the next one. A zero id.Src means no identity: WriteAt.
func (s *Store) WriteAtOnce(ctx context.Context, p []byte, off int64, id aoe.RequestID) error {
	what := func() string {
		if id.Src == (aoe.MAC{}) {
			return fmt.Sprintf("write %d bytes at %d to %v", len(p), off, s.id)
		}
		return fmt.Sprintf("write %d bytes at %d to %v (from %v tag %#x)", len(p), off, s.id, id.Src, id.Tag)
	}
	if err := s.check("write", len(p), off); err != nil {
		return err
	}
	e := Entry{Op: OpWrite, Target: s.id, Offset: off, Data: p, Request: id}
	if err := e.validate(); err != nil {
		return fmt.Errorf("replication: %s: %w", what(), err)
	}
	return s.rep.writes.submit(ctx, &e, what)
}

// Flush implements aoe.Disk. In a cluster it is a Raft barrier: it returns
// once every earlier entry is committed (durable in a quorum of logs) and
// applied here, and it proves this node still leads.
func (s *Store) Flush(ctx context.Context) error {
	return s.rep.Barrier(ctx)
}
