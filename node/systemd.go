package node

import (
	"context"
	"fmt"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hashicorp/raft"

	"github.com/vblade-ha/vblade-ha/replication"
)

// The unit files in ops/systemd run vblade with Type=notify: systemd holds
// dependent units (and `systemctl start`) until the process says it is
// ready. Outside systemd NOTIFY_SOCKET is unset and every call here is a
// no-op, so the daemon behaves the same when started by hand or in tests.

// NotifyReady tells systemd the service is ready (READY=1). It reports
// whether a notification was sent; an error means NOTIFY_SOCKET is set but
// unusable, which systemd will show as a start timeout.
func NotifyReady() (bool, error) { return notify(daemon.SdNotifyReady) }

// NotifyStopping tells systemd the service is shutting down (STOPPING=1), so
// `systemctl status` shows why the node is still running during a
// leadership hand-off.
func NotifyStopping() (bool, error) { return notify(daemon.SdNotifyStopping) }

// NotifyStatus sets the one-line status `systemctl status` shows.
func NotifyStatus(format string, a ...any) (bool, error) {
	return notify("STATUS=" + fmt.Sprintf(format, a...))
}

func notify(state string) (bool, error) {
	// unsetEnvironment=false: a node restarted in-process (tests) or a
	// child it runs must still be able to notify.
	return daemon.SdNotify(false, state)
}

// NotifyWhenReady waits until the node has joined its cluster and caught up
// (see Ready), then sends READY=1. Until then it keeps STATUS= telling the
// operator what the node waits for, so a fresh node that nobody has
// initialised or joined says so instead of looking hung. It returns when
// READY=1 was sent or ctx ends; run it in its own goroutine next to Run.
func (n *Node) NotifyWhenReady(ctx context.Context) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last := ""
	for {
		ready, why := n.Ready()
		if ready {
			NotifyStatus("serving: member of the cluster, log applied up to %d", n.fsm.AppliedIndex())
			NotifyReady()
			n.log.Info("node ready", "applied_index", n.fsm.AppliedIndex())
			return
		}
		if why != last {
			NotifyStatus("%s", why)
			last = why
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// Ready reports whether the node is a member of a cluster that has a leader
// and has applied everything it knows to be committed; if not, why (for
// STATUS= and logs). A follower that is still receiving a full image is not
// ready: its disk is not yet the cluster's.
func (n *Node) Ready() (bool, string) {
	if n.raft == nil {
		return false, "starting"
	}
	if err := n.fatal.Load(); err != nil {
		return false, fmt.Sprintf("stopped applying the log: %v", *err)
	}
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return false, fmt.Sprintf("reading cluster configuration: %v", err)
	}
	member := false
	for _, s := range f.Configuration().Servers {
		if s.ID == raft.ServerID(n.cfg.NodeID) {
			member = true
		}
	}
	if !member {
		return false, "not in a cluster yet: run `vbladectl cluster init` on the first node or `vbladectl cluster join` to add this one"
	}
	if addr, _ := n.raft.LeaderWithID(); addr == "" {
		return false, "member of a cluster, waiting for a leader (are a majority of the nodes up and reachable?)"
	}
	if p := n.transfer.Load(); p != nil && !p.Done && p.Direction == replication.Receiving {
		return false, fmt.Sprintf("receiving the disk image from the leader: %d of %d bytes", p.Bytes, p.Total)
	}
	commit, applied := n.raft.CommitIndex(), n.fsm.AppliedIndex()
	if commit == 0 || applied < commit {
		return false, fmt.Sprintf("catching up with the replicated log: applied %d of %d", applied, commit)
	}
	return true, ""
}
