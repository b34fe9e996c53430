package aoe

import (
	"context"
	"errors"
)

// Disk is everything the engine knows about a target's backing store: a local
// file or block device in standalone mode, the Raft-replicated store in cluster
// mode. Offsets and lengths are in bytes; the engine only issues whole 512-byte
// sectors inside [0, Size()).
//
// Implementations must be safe for concurrent use: the engine runs many
// commands at once. A method may block (a replicated write waits for a quorum);
// the context carries the command's deadline.
type Disk interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64) error
	// Flush makes every write that completed before the call durable.
	Flush(ctx context.Context) error
	// Size is the exported size in bytes (a multiple of 512).
	Size() int64
}

// RequestID names one request as its initiator sent it: the source MAC of
// the frame and the AoE tag. An initiator that keeps the tag when it
// retransmits (our Client does; the Linux driver does not) sends every copy
// of a request with the same RequestID.
type RequestID struct {
	Src MAC
	Tag uint32
}

// DedupWriter is optionally implemented by a Disk that can recognise the
// retransmission of a write it already applied. A write with the same
// RequestID, offset, length and data as one applied recently is acknowledged
// (nil) without being applied again, so a copy that arrives after later
// writes to the same blocks cannot roll them back. What "recently" means is
// the implementation's window (the replicated store keeps the last few
// thousand writes per target); outside it, or with a zero Src, WriteAtOnce is
// WriteAt. The engine asserts the interface once, when the Target is built.
type DedupWriter interface {
	WriteAtOnce(ctx context.Context, p []byte, off int64, id RequestID) error
}

// ErrNoReply, returned (possibly wrapped) by a Disk, a StateStore or a Gate
// check, tells the engine to drop the command without answering. A cluster
// node uses it when it cannot finish a command (it lost leadership, Raft timed
// out): the initiator retransmits and the next leader answers, which is the
// only behaviour a healthy cluster would also show.
var ErrNoReply = errors.New("aoe: command dropped unanswered")

// ErrReadOnly is returned by a Disk that refuses writes; the engine answers
// the write with an ATA abort.
var ErrReadOnly = errors.New("aoe: read-only target")

// Gate says whether this node may answer for a target right now. Standalone
// targets have no gate (always open); a cluster node opens it only while it
// leads and its leader lease is valid.
type Gate interface {
	Open() bool
}
