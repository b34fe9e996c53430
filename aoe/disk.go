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
