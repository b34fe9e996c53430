package replication

import (
	"fmt"

	"github.com/hashicorp/raft"
)

// DefaultTrailingLogs is the number of log entries kept behind a snapshot.
// Snapshots are cheap here (an image sync and a few bytes of metadata), so
// they can be frequent; the trailing log is what lets a follower that was
// briefly away catch up from the log instead of a full image. A write entry is
// at most a frame of sectors (about 1 KiB, 9 KiB with jumbo frames), so this
// is tens to hundreds of MiB of log.
const DefaultTrailingLogs = 65536

// TuneConfig sets the raft.Config fields this package relies on and leaves
// the rest (timeouts, lease, ids) to the node:
//   - BatchApplyCh: concurrent writes are committed and applied as a batch
//     (group commit is what carries write throughput);
//   - MaxAppendEntries: larger batches per AppendEntries round;
//   - TrailingLogs: see DefaultTrailingLogs (raised, never lowered);
//   - NoSnapshotRestoreOnStart false: the restore at start-up only loads the
//     small metadata (target states and the index to replay from).
func TuneConfig(c *raft.Config) {
	c.BatchApplyCh = true
	if c.MaxAppendEntries < 256 {
		c.MaxAppendEntries = 256
	}
	if c.TrailingLogs < DefaultTrailingLogs {
		c.TrailingLogs = DefaultTrailingLogs
	}
	c.NoSnapshotRestoreOnStart = false
}

// ForceImageTransfer takes a snapshot with no trailing log, so that a node
// that joins next must receive the full image instead of replaying the log
// over whatever its local file holds (the log only says what changed since
// the cluster started, not what the bootstrap image contained). Call it on the
// leader just before AddVoter for a new member. Followers that lag at that
// moment also get a full image; that costs time, not correctness. While
// another image stream is open it fails with an error whose text contains
// ErrCompactionHeld's (Raft flattens the FSM's error with %v): retry later.
func ForceImageTransfer(r *raft.Raft) error {
	cur := r.ReloadableConfig()
	tmp := cur
	tmp.TrailingLogs = 0
	if err := r.ReloadConfig(tmp); err != nil {
		return fmt.Errorf("replication: force image transfer: lower trailing logs: %w", err)
	}
	err := r.Snapshot().Error()
	if rerr := r.ReloadConfig(cur); rerr != nil && err == nil {
		err = fmt.Errorf("restore trailing logs to %d: %w", cur.TrailingLogs, rerr)
	}
	if err != nil {
		return fmt.Errorf("replication: force image transfer: %w", err)
	}
	return nil
}
