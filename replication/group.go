package replication

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"github.com/vblade-ha/vblade-ha/aoe"
)

// Group commit.
//
// Every Raft round costs about the same whatever it carries: a bolt
// transaction with two fdatasyncs on the leader, then the same on a follower,
// a network round trip, one apply. Proposing each write as it arrives puts
// many small rounds in flight at once; they queue behind each other on the
// disks and each pays the fixed cost. The committer keeps one write proposal
// in flight and puts every write that arrives meanwhile into the next one, a
// single Batch entry (or a few, proposed together, when large writes make it
// bigger than MaxBatchBytes: bolt and msgpack copy and grow buffers per
// entry, and very large entries cost more per byte than a few moderate ones).
//
// Initiators keep a window of commands outstanding and send the next ones
// only as answers come back, so the writes answered by one round return a
// moment after it ends. Proposing at once would split the window in two
// halves that take turns; instead, when a round ends, the committer waits
// (at most the linger time, and never longer than that round took) until as
// many writes are queued as were outstanding when it ended, and proposes
// them together. A single synchronous writer never waits: its next write is
// the one expected.

// Defaults for ReplicatorOptions.
const (
	DefaultMaxLinger = time.Millisecond
	DefaultMaxBatch  = 32 << 10 // bytes of encoded writes in one Batch entry
)

// committer gathers writes into Batch entries (see above).
type committer struct {
	p         *Replicator
	maxBytes  int
	maxLinger time.Duration

	// more is signalled (without blocking) whenever a write is queued, for
	// a proposer lingering for the rest of a window.
	more chan struct{}

	mu      sync.Mutex
	running bool // a proposer goroutine owns the pipeline
	// queue holds the writes waiting for the next round, in arrival order,
	// as the log entries they will travel in (each at most maxBytes).
	queue   []*group
	queued  int // writes in queue
	lastLen int // buffer length of the newest entry, to size the next

	proposals atomic.Uint64 // log entries proposed for writes
	writes    atomic.Uint64 // writes they carried
}

// pending is one queued write and where its outcome goes.
type pending struct {
	deadline time.Time // zero: none
	done     chan error
}

// batchHeaderLen is version, op, shelf, slot and count of a Batch entry.
const batchHeaderLen = headerLen + 2

func newCommitter(p *Replicator, maxLinger time.Duration, maxBytes int) *committer {
	if maxLinger == 0 {
		maxLinger = DefaultMaxLinger
	}
	if maxLinger < 0 {
		maxLinger = 0
	}
	if maxBytes <= 0 {
		maxBytes = DefaultMaxBatch
	}
	return &committer{p: p, maxBytes: maxBytes, maxLinger: maxLinger, more: make(chan struct{}, 1)}
}

// group is what one proposal carries.
type group struct {
	members []*pending
	// buf holds room for a Batch header, then the members' entries,
	// encoded as inside a Batch (length and bare entry each). Encoding at
	// enqueue copies the data at once: a caller that gives up may reuse its
	// buffer while its write still waits here.
	buf []byte
}

// submit replicates the validated entry e (never a Batch; the caller has
// checked the FSM, see Store.check) with whatever else is queued and returns
// its outcome: nil once committed and applied here, a *RejectedError, or an
// error wrapping aoe.ErrNoReply. what is as for propose.
func (c *committer) submit(ctx context.Context, e *Entry, what func() string) error {
	if err := ctx.Err(); err != nil {
		return noReply(what(), err)
	}
	w := &pending{done: make(chan error, 1)}
	w.deadline, _ = ctx.Deadline()
	c.mu.Lock()
	var g *group
	if n := len(c.queue); n > 0 {
		g = c.queue[n-1]
	}
	size := 4 + e.bareLen()
	if g == nil || len(g.members) == MaxBatch || len(g.buf)+size > batchHeaderLen+c.maxBytes {
		// A new entry, its buffer sized like the previous one so that
		// a window does not regrow it. (Not larger: Raft's log cache
		// keeps the buffer as long as the entry.)
		g = &group{buf: make([]byte, batchHeaderLen, max(c.lastLen, batchHeaderLen+size)+trailerLen)}
		c.queue = append(c.queue, g)
	}
	g.buf = appendMember(g.buf, e, EntryVersion)
	g.members = append(g.members, w)
	c.lastLen = len(g.buf)
	c.queued++
	var round []*group
	if !c.running {
		c.running = true
		round = c.takeLocked()
	}
	c.mu.Unlock()
	select {
	case c.more <- struct{}{}:
	default:
	}
	if round != nil {
		// In its own goroutine: a proposal may outlast this caller's
		// context, and the caller must be free to give up.
		go c.run(round)
	}
	select {
	case err := <-w.done:
		if err != nil {
			return fmt.Errorf("replication: %s: %w", what(), err)
		}
		return nil
	case <-ctx.Done():
		// The write may still commit: harmless, nothing was acknowledged
		// (see wait).
		return noReply(what(), ctx.Err())
	}
}

// takeLocked empties the queue and returns its entries, the next round.
// c.mu is held.
func (c *committer) takeLocked() []*group {
	round := c.queue
	c.queue, c.queued = nil, 0
	return round
}

// run proposes a round, delivers the outcomes, then keeps the pipeline going
// with whatever queued meanwhile (lingering for the rest of the window, see
// above), and gives it up once nothing comes.
func (c *committer) run(round []*group) {
	for {
		start := time.Now()
		c.propose(round)
		took := time.Since(start)
		c.mu.Lock()
		want := c.queued
		for _, g := range round {
			want += len(g.members)
		}
		if c.queued < want {
			end := time.Now().Add(min(c.maxLinger, took))
			for c.queued < want {
				left := time.Until(end)
				if left <= 0 {
					break
				}
				c.mu.Unlock()
				t := time.NewTimer(left)
				select {
				case <-c.more:
				case <-t.C:
				}
				t.Stop()
				c.mu.Lock()
			}
		}
		if c.queued == 0 {
			c.running = false
			c.mu.Unlock()
			return
		}
		round = c.takeLocked()
		c.mu.Unlock()
	}
}

// propose hands the round's entries to Raft together (one after the other,
// without waiting, so the leader stores and sends them as one batch), waits
// for each, and sends each member its outcome. It waits for the futures
// without a context: Raft answers every accepted proposal (commit, lost
// leadership, shutdown), and members that stop waiting earlier follow their
// own contexts.
func (c *committer) propose(round []*group) {
	futures := make([]raft.ApplyFuture, len(round))
	for i, g := range round {
		futures[i] = c.apply(g)
	}
	for i, g := range round {
		if futures[i] != nil {
			g.deliver(futures[i])
		}
	}
}

// apply proposes g as one log entry (a plain entry when it holds one write,
// a Batch otherwise). It returns nil, having told the members, if g is not
// proposed.
func (c *committer) apply(g *group) raft.ApplyFuture {
	cmd := g.encode()
	if err := c.p.fsm.Err(); err != nil {
		g.fail(noReplyErr(err))
		return nil
	}
	timeout := c.p.timeout
	var latest time.Time
	for _, w := range g.members {
		if w.deadline.IsZero() {
			latest = time.Time{}
			break
		}
		if w.deadline.After(latest) {
			latest = w.deadline
		}
	}
	if !latest.IsZero() {
		timeout = time.Until(latest)
		if timeout <= 0 {
			// Every member gave up: nobody waits for this entry.
			g.fail(noReplyErr(context.DeadlineExceeded))
			return nil
		}
	}
	c.proposals.Add(1)
	c.writes.Add(uint64(len(g.members)))
	return c.p.raft.Apply(cmd, timeout)
}

// deliver waits for f, g's entry, and sends each member its outcome.
func (g *group) deliver(f raft.ApplyFuture) {
	if err := f.Error(); err != nil {
		g.fail(noReplyErr(err))
		return
	}
	resp := f.Response()
	be, ok := resp.(*BatchError)
	if !ok {
		g.fail(outcome(resp))
		return
	}
	for i, w := range g.members {
		var err error
		if i < len(be.Errs) {
			err = be.Errs[i]
		}
		w.done <- err
	}
}

// encode finishes g's log entry in place: a plain version-2 entry (the bare
// encoding right after its length, preceded by the version byte) for a group
// of one, a Batch otherwise; then the checksum.
func (g *group) encode() []byte {
	var b []byte
	if len(g.members) == 1 {
		b = g.buf[batchHeaderLen+3:]
		b[0] = entryVersionSingle
	} else {
		b = g.buf
		b[0] = EntryVersion
		b[1] = byte(OpBatch)
		b[2], b[3], b[4] = 0, 0, 0
		binary.BigEndian.PutUint16(b[headerLen:], uint16(len(g.members)))
	}
	return appendChecksum(b, 0)
}

// noReplyErr marks err as an outcome the initiator must not hear of.
func noReplyErr(err error) error { return fmt.Errorf("%w: %w", aoe.ErrNoReply, err) }

// fail sends every member the same outcome.
func (g *group) fail(err error) {
	for _, w := range g.members {
		w.done <- err
	}
}
