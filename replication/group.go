package replication

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"sync"
	"sync/atomic"
	"time"

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
// single Batch entry.
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
	DefaultMaxBatch  = 256 << 10 // bytes of encoded writes in one Batch entry
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
	running bool       // a proposer goroutine owns the pipeline
	queue   []*pending // waiting for the next proposal, in arrival order
	// buf holds the queued entries, encoded as inside a Batch (length and
	// bare entry each) after room for the Batch's header. Encoding at
	// enqueue copies the data at once: a caller that gives up may reuse its
	// buffer while its write still waits here.
	buf     []byte
	lastLen int // length of the last group's buffer

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
	buf     []byte // batch header room, then the members' encodings
}

// submit replicates the validated entry e (never a Batch) with whatever else
// is queued and returns its outcome: nil once committed and applied here, a
// *RejectedError, or an error wrapping aoe.ErrNoReply. what is as for propose.
func (c *committer) submit(ctx context.Context, e *Entry, what func() string) error {
	if err := ctx.Err(); err != nil {
		return noReply(what(), err)
	}
	if err := c.p.fsm.Err(); err != nil {
		return noReply(what(), err)
	}
	w := &pending{done: make(chan error, 1)}
	w.deadline, _ = ctx.Deadline()
	c.mu.Lock()
	if len(c.queue) == 0 {
		// A new buffer (the last one went to Raft with its proposal),
		// sized like the last group so that a window does not regrow it.
		c.buf = make([]byte, batchHeaderLen, max(c.lastLen, batchHeaderLen+4+e.bareLen())+trailerLen)
	}
	at := len(c.buf)
	c.buf = append(c.buf, 0, 0, 0, 0)
	c.buf = e.appendBare(c.buf, EntryVersion)
	binary.BigEndian.PutUint32(c.buf[at:], uint32(len(c.buf)-at-4))
	c.queue = append(c.queue, w)
	var g *group
	if !c.running {
		c.running = true
		g = c.takeLocked()
	}
	c.mu.Unlock()
	select {
	case c.more <- struct{}{}:
	default:
	}
	if g != nil {
		// In its own goroutine: a proposal may outlast this caller's
		// context, and the caller must be free to give up.
		go c.run(g)
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

// takeLocked removes the oldest queued writes, up to maxBytes of them (at
// least one), from the queue and returns them as a group. c.mu is held and
// the queue is not empty.
func (c *committer) takeLocked() *group {
	n, end := 0, batchHeaderLen
	for n < len(c.queue) && n < MaxBatch {
		l := 4 + int(binary.BigEndian.Uint32(c.buf[end:]))
		if n > 0 && end+l-batchHeaderLen > c.maxBytes {
			break
		}
		end += l
		n++
	}
	g := &group{members: c.queue[:n:n], buf: c.buf[:end]}
	c.lastLen = end
	if n == len(c.queue) {
		// Hand the whole buffer over; the next enqueue starts a new one.
		c.queue, c.buf = nil, nil
		return g
	}
	rest := make([]byte, batchHeaderLen, batchHeaderLen+len(c.buf)-end)
	c.buf = append(rest, c.buf[end:]...)
	c.queue = append([]*pending(nil), c.queue[n:]...)
	return g
}

// run proposes g, delivers the outcome to its members, then keeps the
// pipeline going with whatever queued meanwhile (lingering for the rest of
// the window, see above), and gives it up once nothing comes.
func (c *committer) run(g *group) {
	for {
		start := time.Now()
		c.propose(g)
		took := time.Since(start)
		c.mu.Lock()
		want := len(g.members) + len(c.queue)
		if len(c.queue) < want {
			end := time.Now().Add(min(c.maxLinger, took))
			for len(c.queue) < want {
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
		if len(c.queue) == 0 {
			c.running = false
			c.mu.Unlock()
			return
		}
		g = c.takeLocked()
		c.mu.Unlock()
	}
}

// propose turns g into one log entry (a plain entry when it holds one write,
// a Batch otherwise), waits for Raft, and sends each member its outcome.
// It waits for the future without a context: Raft answers every accepted
// proposal (commit, lost leadership, shutdown), and members that stop
// waiting earlier follow their own contexts.
func (c *committer) propose(g *group) {
	cmd := g.encode()
	if err := c.p.fsm.Err(); err != nil {
		g.fail(noReplyErr(err))
		return
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
			g.fail(noReplyErr(context.DeadlineExceeded))
			return
		}
	}
	c.proposals.Add(1)
	c.writes.Add(uint64(len(g.members)))
	f := c.p.raft.Apply(cmd, timeout)
	if err := f.Error(); err != nil {
		g.fail(noReplyErr(err))
		return
	}
	switch resp := f.Response().(type) {
	case nil:
		g.fail(nil)
	case *BatchError:
		for i, w := range g.members {
			var err error
			if i < len(resp.Errs) {
				err = resp.Errs[i]
			}
			w.done <- err
		}
	case *RejectedError:
		g.fail(resp)
	case error:
		// This node could not apply a committed entry (FatalError): the
		// other nodes did, the node must step down, and the initiators'
		// retransmissions go to the next leader.
		g.fail(noReplyErr(resp))
	default:
		g.fail(fmt.Errorf("unexpected FSM response %T", resp))
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
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// noReplyErr marks err as an outcome the initiator must not hear of.
func noReplyErr(err error) error { return fmt.Errorf("%w: %w", aoe.ErrNoReply, err) }

// fail sends every member the same outcome.
func (g *group) fail(err error) {
	for _, w := range g.members {
		w.done <- err
	}
}
