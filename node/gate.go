package node

import (
	"sync/atomic"
	"time"
)

// leaderGate decides whether this node may answer AoE commands: it must be
// the Raft leader, have applied everything committed before it took office
// (the Barrier), and hold a valid lease.
//
// The lease is what keeps a deposed leader quiet. It is renewed by
// raft.VerifyLeader, which succeeds only once a quorum has acknowledged a
// heartbeat sent after the call started; the lease then runs for Lease from
// that start. Every follower in that quorum reset its election timer after
// the start, and hashicorp/raft followers refuse to vote while they still
// have a leader, so no other node can win an election before
// start + HeartbeatTimeout. With Lease < HeartbeatTimeout (we use half) the
// old leader's gate has closed before any new leader can open its own, even
// if the old one is partitioned and never hears that it lost. Only the rate
// of the two clocks matters (monotonic time), not their offset.
type leaderGate struct {
	base       time.Time    // monotonic origin
	leaseUntil atomic.Int64 // nanoseconds since base; 0 = no lease
	open       atomic.Bool  // leader and caught up
}

func newLeaderGate() *leaderGate { return &leaderGate{base: time.Now()} }

// Open implements aoe.Gate.
func (g *leaderGate) Open() bool {
	return g.open.Load() && int64(time.Since(g.base)) < g.leaseUntil.Load()
}

// renew extends the lease to start+lease, where start was taken before the
// quorum confirmation began.
func (g *leaderGate) renew(start time.Time, lease time.Duration) {
	until := int64(start.Sub(g.base) + lease)
	for {
		cur := g.leaseUntil.Load()
		if until <= cur || g.leaseUntil.CompareAndSwap(cur, until) {
			return
		}
	}
}

// setOpen opens or closes the gate; closing also drops the lease so that a
// later open needs a fresh confirmation.
func (g *leaderGate) setOpen(on bool) {
	g.open.Store(on)
	if !on {
		g.leaseUntil.Store(0)
	}
}
