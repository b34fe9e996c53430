package node

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/vblade-ha/vblade-ha/replication"
)

// AdminStatus is this node's own status (GET /v1/status).
func (n *Node) AdminStatus() *NodeStatus {
	stats := n.raft.Stats()
	term, _ := strconv.ParseUint(stats["term"], 10, 64)
	s := &NodeStatus{
		ID:              n.cfg.NodeID,
		Address:         n.cfg.RaftAdvertise,
		State:           strings.ToLower(n.raft.State().String()),
		Term:            term,
		CommitIndex:     n.raft.CommitIndex(),
		AppliedIndex:    n.raft.AppliedIndex(),
		FSMAppliedIndex: n.fsm.AppliedIndex(),
		LastLogIndex:    n.raft.LastIndex(),
		GateOpen:        n.gate.Open(),
		Exports:         n.exportInfos(),
	}
	addr, id := n.raft.LeaderWithID()
	s.LeaderID, s.LeaderAddress = string(id), string(addr)
	servers, _ := n.members()
	s.InCluster = len(servers) > 0
	for _, srv := range servers {
		m := ClusterMember{ID: string(srv.ID), Address: string(srv.Address), Suffrage: suffrageName(srv.Suffrage)}
		s.Members = append(s.Members, m)
		if srv.ID == raft.ServerID(n.cfg.NodeID) {
			s.Suffrage = m.Suffrage
		}
	}
	for i := range n.cfg.Exports {
		e := &n.cfg.Exports[i]
		ts := TargetStatus{Target: e.Addr().String(), Netif: e.Netif, Serving: s.GateOpen}
		id := replication.TargetID{Shelf: uint16(e.Shelf), Slot: uint8(e.Slot)}
		if d := n.disks[id]; d != nil {
			ts.Size = d.Size()
		}
		_, ts.Replicated = n.fsm.Target(id)
		ts.Serving = ts.Serving && ts.Replicated
		if mac, ok := n.vmacs[e.Addr()]; ok {
			ts.MAC, ts.MACKind = mac.String(), "virtual"
		} else if srv := n.servers[e.Netif]; srv != nil {
			ts.MAC, ts.MACKind = srv.MAC().String(), "interface"
		}
		s.Targets = append(s.Targets, ts)
	}
	if p := n.transfer.Load(); p != nil {
		s.Transfer = &TransferStatus{Direction: p.Direction.String(), Index: p.Index, Bytes: p.Bytes, Total: p.Total, Done: p.Done}
		if p.Err != nil {
			s.Transfer.Error = p.Err.Error()
		}
	}
	if e := n.fatal.Load(); e != nil {
		s.FatalError = (*e).Error()
	} else if err := n.fsm.Err(); err != nil {
		s.FatalError = err.Error()
	}
	return s
}

func suffrageName(s raft.ServerSuffrage) string {
	switch s {
	case raft.Voter:
		return "voter"
	case raft.Nonvoter:
		return "nonvoter"
	}
	return "staging"
}

// exportInfos lists this node's local images, ordered by shelf.slot.
func (n *Node) exportInfos() []ExportInfo {
	out := make([]ExportInfo, 0, len(n.disks))
	for id, d := range n.disks {
		out = append(out, ExportInfo{Shelf: id.Shelf, Slot: id.Slot, Size: d.Size()})
	}
	slices.SortFunc(out, func(a, b ExportInfo) int {
		if a.Shelf != b.Shelf {
			return int(a.Shelf) - int(b.Shelf)
		}
		return int(a.Slot) - int(b.Slot)
	})
	return out
}

// members is the latest Raft configuration this node knows.
func (n *Node) members() ([]raft.Server, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, fmt.Errorf("read the Raft configuration: %w", err)
	}
	return f.Configuration().Servers, nil
}

func (n *Node) isLeader() bool { return n.raft.State() == raft.Leader }

func (n *Node) peer(addr, id string) *AdminClient {
	return newPeerClient(n.mux.dial, addr, id)
}

// notLeader answers a request only the leader may handle; the leader hint
// lets the caller retry there.
func (n *Node) notLeader(what string) error {
	addr, id := n.raft.LeaderWithID()
	if addr == "" {
		return unavailable("node %s cannot %s: it is not the leader and knows no leader right now (election in progress, or a majority of nodes is down): retry in a few seconds", n.cfg.NodeID, what)
	}
	return &APIError{Status: http.StatusMisdirectedRequest,
		Message:  fmt.Sprintf("node %s cannot %s: it is not the leader; the leader is %s at %s", n.cfg.NodeID, what, id, addr),
		LeaderID: string(id), LeaderAddress: string(addr)}
}

// leaderClient returns a client for the current leader, or an error saying
// there is none.
func (n *Node) leaderClient(what string) (*AdminClient, error) {
	addr, id := n.raft.LeaderWithID()
	if addr == "" {
		return nil, unavailable("cannot %s: node %s knows no leader right now (election in progress, or a majority of nodes is down): retry in a few seconds", what, n.cfg.NodeID)
	}
	return n.peer(string(addr), string(id)), nil
}

// waitLeaderOther polls until a leader other than this node is known.
func (n *Node) waitLeaderOther(ctx context.Context, timeout time.Duration) (raft.ServerAddress, raft.ServerID, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		addr, id := n.raft.LeaderWithID()
		if addr != "" && id != raft.ServerID(n.cfg.NodeID) {
			return addr, id, nil
		}
		select {
		case <-ctx.Done():
			return "", "", fmt.Errorf("no other node took over leadership within %v", timeout)
		case <-t.C:
		}
	}
}

// clusterStatus builds the cluster view. With forward set, a follower asks
// the leader for its view and falls back to its own when it cannot.
func (a *adminServer) clusterStatus(ctx context.Context, forward bool) (*ClusterStatus, error) {
	n := a.n
	servers, err := n.members()
	if err != nil {
		return nil, err
	}
	if len(servers) == 0 {
		return &ClusterStatus{Nodes: []MemberStatus{}, Targets: []ServingTarget{},
			Message: fmt.Sprintf("node %s is not in a cluster yet: run `vbladectl cluster init` on the first node, or `vbladectl cluster join ADDR` to join one", n.cfg.NodeID)}, nil
	}
	var note string
	if forward && !n.isLeader() {
		addr, id := n.raft.LeaderWithID()
		if addr == "" {
			note = fmt.Sprintf("no leader right now (election in progress, or a majority of nodes is down); this is node %s's view", n.cfg.NodeID)
		} else {
			cctx, cancel := context.WithTimeout(ctx, 2*peerStatusTimeout)
			cs, err := n.peer(string(addr), string(id)).peerCluster(cctx)
			cancel()
			if err == nil {
				return cs, nil
			}
			note = fmt.Sprintf("the leader's view is unavailable (%v); this is node %s's view", err, n.cfg.NodeID)
		}
	}
	cs := a.localClusterView(ctx, servers)
	if cs.Message == "" {
		cs.Message = note
	}
	return cs, nil
}

// localClusterView polls every member's status (in parallel, each with a
// short timeout) and assembles the cluster view.
func (a *adminServer) localClusterView(ctx context.Context, servers []raft.Server) *ClusterStatus {
	n := a.n
	statuses := make([]*NodeStatus, len(servers))
	errs := make([]error, len(servers))
	var wg sync.WaitGroup
	for i, srv := range servers {
		if srv.ID == raft.ServerID(n.cfg.NodeID) {
			statuses[i] = n.AdminStatus()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			pctx, cancel := context.WithTimeout(ctx, peerStatusTimeout)
			defer cancel()
			statuses[i], errs[i] = n.peer(string(srv.Address), string(srv.ID)).Status(pctx)
		}()
	}
	wg.Wait()

	cs := &ClusterStatus{InCluster: true, Nodes: []MemberStatus{}, Targets: []ServingTarget{}}
	for _, s := range statuses {
		if s != nil && s.State == "leader" && s.Term >= cs.Term {
			cs.Leader, cs.LeaderAddress, cs.Term, cs.CommitIndex = s.ID, s.Address, s.Term, s.CommitIndex
		}
	}
	if cs.Leader == "" {
		addr, id := n.raft.LeaderWithID()
		cs.Leader, cs.LeaderAddress = string(id), string(addr)
		if cs.Leader != "" {
			cs.Message = fmt.Sprintf("leader %s did not answer its admin port; lag is unknown", cs.Leader)
		}
	}
	for i, srv := range servers {
		m := MemberStatus{ID: string(srv.ID), Address: string(srv.Address), Suffrage: suffrageName(srv.Suffrage)}
		s := statuses[i]
		if s == nil {
			m.Role = "unreachable"
			m.Error = errs[i].Error()
			cs.Nodes = append(cs.Nodes, m)
			continue
		}
		m.Reachable = true
		m.Role = s.State
		if s.State == "follower" && srv.Suffrage == raft.Nonvoter {
			m.Role = "nonvoter"
		}
		m.Term, m.CommitIndex, m.AppliedIndex = s.Term, s.CommitIndex, s.AppliedIndex
		if cs.CommitIndex > s.AppliedIndex {
			m.Lag = cs.CommitIndex - s.AppliedIndex
		}
		m.Transfer, m.FatalError = s.Transfer, s.FatalError
		if cs.Term == 0 && s.Term > cs.Term {
			cs.Term = s.Term
		}
		cs.Nodes = append(cs.Nodes, m)
	}
	// Every replicated target, with the node whose gate is open for it.
	for _, t := range n.fsm.Targets() {
		st := ServingTarget{Target: t.ID.String(), Size: t.Size}
		for _, s := range statuses {
			if s == nil {
				continue
			}
			for _, ts := range s.Targets {
				if ts.Target == st.Target && ts.Serving {
					st.Node, st.Address, st.Netif, st.MAC = s.ID, s.Address, ts.Netif, ts.MAC
				}
			}
		}
		cs.Targets = append(cs.Targets, st)
	}
	return cs
}

// join runs on the joining node: it asks the member at addr to add this
// node, following a leader hint, and starts the self-promotion that makes
// it a voter once it has caught up.
func (a *adminServer) join(ctx context.Context, addr string) (*JoinResult, error) {
	n := a.n
	a.joinMu.Lock()
	defer a.joinMu.Unlock()
	servers, err := n.members()
	if err != nil {
		return nil, err
	}
	self := raft.ServerID(n.cfg.NodeID)
	if len(servers) > 0 {
		in := slices.ContainsFunc(servers, func(s raft.Server) bool { return s.ID == self })
		if !in || len(servers) == 1 {
			return nil, conflict("node %s already has cluster state (it was initialised with `vbladectl cluster init`, or was a member before): a node can join only with an empty data_dir: stop it, remove %s, start it and join again",
				n.cfg.NodeID, n.cfg.DataDir)
		}
	}
	token, err := n.joinToken()
	if err != nil {
		return nil, err
	}
	req := PeerJoinRequest{ID: n.cfg.NodeID, Address: n.cfg.RaftAdvertise, Exports: n.exportInfos(), Token: token}
	jctx, cancel := context.WithTimeout(ctx, joinTimeout)
	defer cancel()
	res, err := n.joinVia(jctx, addr, "", req)
	if err != nil {
		return nil, err
	}
	a.startPromotion(res.CommitIndex)
	return res, nil
}

// joinVia sends a join (or promote) request to addr, following one leader
// hint when addr is a member that could not forward it.
func (n *Node) joinVia(ctx context.Context, addr, id string, req PeerJoinRequest) (*JoinResult, error) {
	for hop := 0; ; hop++ {
		res, err := n.peer(addr, id).peerJoin(ctx, req)
		var ae *APIError
		if err != nil && errors.As(err, &ae) && ae.LeaderAddress != "" && ae.LeaderAddress != addr && hop < 2 {
			addr, id = ae.LeaderAddress, ae.LeaderID
			continue
		}
		if err != nil {
			if IsUnreachable(err) {
				return nil, fmt.Errorf("join: %w", err)
			}
			return nil, err
		}
		return res, nil
	}
}

// startPromotion waits, in the background, until this node has applied
// the leader's commit index of its join, then asks the leader to make it a
// voter. A nonvoter does not count towards the quorum, so the cluster keeps
// committing writes while a big image streams to the new node.
func (a *adminServer) startPromotion(index uint64) {
	n := a.n
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-a.ctx.Done():
				return
			case <-t.C:
			}
			servers, err := n.members()
			if err != nil {
				continue
			}
			i := slices.IndexFunc(servers, func(s raft.Server) bool { return s.ID == raft.ServerID(n.cfg.NodeID) })
			if i >= 0 && servers[i].Suffrage == raft.Voter {
				return
			}
			if n.raft.AppliedIndex() < index || n.fsm.Err() != nil {
				continue
			}
			addr, id := n.raft.LeaderWithID()
			if addr == "" {
				continue
			}
			token, err := n.joinToken()
			if err != nil {
				n.log.Warn("promotion to voter: cannot read the join token; retrying", "err", err)
				continue
			}
			req := PeerJoinRequest{ID: n.cfg.NodeID, Address: n.cfg.RaftAdvertise, Exports: n.exportInfos(), Promote: true, Token: token}
			pctx, cancel := context.WithTimeout(a.ctx, peerCallTimeout)
			_, err = n.joinVia(pctx, string(addr), string(id), req)
			cancel()
			if err != nil {
				n.log.Warn("promotion to voter failed; retrying", "err", err)
				continue
			}
			n.log.Info("caught up: promoted to voter", "index", index)
		}
	}()
}

// peerJoin runs on the member a joining node asked.
func (a *adminServer) peerJoin(ctx context.Context, req PeerJoinRequest) (*JoinResult, error) {
	n := a.n
	servers, err := n.members()
	if err != nil {
		return nil, err
	}
	if len(servers) == 0 {
		return nil, conflict("node %s at %s is not in a cluster itself: run `vbladectl cluster init` there first, or join through a member", n.cfg.NodeID, n.cfg.RaftAdvertise)
	}
	if !n.isLeader() {
		if req.Forwarded {
			return nil, n.notLeader("add a node")
		}
		lc, err := n.leaderClient("add node " + req.ID)
		if err != nil {
			return nil, err
		}
		req.Forwarded = true
		res, err := lc.peerJoin(ctx, req)
		if err != nil && IsUnreachable(err) {
			// The joining node may reach the leader when this member
			// cannot: hand it the address.
			addr, id := n.raft.LeaderWithID()
			return nil, &APIError{Status: http.StatusMisdirectedRequest, LeaderID: string(id), LeaderAddress: string(addr),
				Message: fmt.Sprintf("member %s could not reach the leader: %v", n.cfg.NodeID, err)}
		}
		return res, err
	}
	return a.leaderJoin(ctx, req)
}

// leaderJoin checks a join request and adds the node as a nonvoter (or
// promotes a caught-up nonvoter).
func (a *adminServer) leaderJoin(ctx context.Context, req PeerJoinRequest) (*JoinResult, error) {
	n := a.n
	if err := n.checkJoinToken(req.Token); err != nil {
		return nil, err
	}
	a.memberMu.Lock()
	defer a.memberMu.Unlock()
	servers, err := n.members()
	if err != nil {
		return nil, err
	}
	var existing *raft.Server
	for i, s := range servers {
		switch {
		case string(s.ID) == req.ID && string(s.Address) != req.Address:
			return nil, conflict("node id %q is already used by the member at %s (the joining node advertises %s): give the joining node a unique node_id, or remove the old member first (`vbladectl cluster leave` on it)",
				req.ID, s.Address, req.Address)
		case string(s.ID) == req.ID:
			existing = &servers[i]
		case string(s.Address) == req.Address:
			return nil, conflict("address %s is already used by member %q (the joining node calls itself %q): each node needs its own raft_addr; if the node was renamed, remove the old member first",
				req.Address, s.ID, req.ID)
		}
	}
	if err := n.checkJoinExports(req.ID, req.Exports); err != nil {
		return nil, err
	}
	res := &JoinResult{LeaderID: n.cfg.NodeID, LeaderAddress: n.cfg.RaftAdvertise}
	if existing != nil {
		res.AlreadyMember = true
		if req.Promote && existing.Suffrage != raft.Voter {
			if err := n.raft.AddVoter(existing.ID, existing.Address, 0, peerCallTimeout).Error(); err != nil {
				return nil, fmt.Errorf("promote node %s to voter: %w", req.ID, err)
			}
			n.log.Info("member promoted to voter", "id", req.ID, "address", req.Address)
		}
		res.CommitIndex = n.raft.CommitIndex()
		return res, nil
	}
	if req.Promote {
		return nil, conflict("node %s is not a member (it was removed while catching up?): run `vbladectl cluster join` on it again", req.ID)
	}
	if err := a.forceImageTransfer(ctx); err != nil {
		return nil, err
	}
	if err := n.raft.AddNonvoter(raft.ServerID(req.ID), raft.ServerAddress(req.Address), 0, peerCallTimeout).Error(); err != nil {
		return nil, fmt.Errorf("add node %s at %s to the Raft configuration: %w", req.ID, req.Address, err)
	}
	n.log.Info("node added as nonvoter; it becomes a voter once caught up", "id", req.ID, "address", req.Address)
	res.CommitIndex = n.raft.CommitIndex()
	return res, nil
}

// checkJoinExports compares a joining node's exports with the replicated
// set (and this leader's own exports, which it registers on taking office:
// right after init the set may still be empty).
func (n *Node) checkJoinExports(id string, exports []ExportInfo) error {
	want := map[replication.TargetID]int64{}
	for tid, d := range n.disks {
		want[tid] = d.Size()
	}
	for _, t := range n.fsm.Targets() {
		want[t.ID] = t.Size
	}
	have := map[replication.TargetID]int64{}
	for _, e := range exports {
		have[replication.TargetID{Shelf: e.Shelf, Slot: e.Slot}] = e.Size
	}
	ids := make([]replication.TargetID, 0, len(want))
	for tid := range want {
		ids = append(ids, tid)
	}
	slices.SortFunc(ids, func(a, b replication.TargetID) int {
		if a.Shelf != b.Shelf {
			return int(a.Shelf) - int(b.Shelf)
		}
		return int(a.Slot) - int(b.Slot)
	})
	for _, tid := range ids {
		size, ok := have[tid]
		switch {
		case !ok:
			return conflict("node %s has no export %v, which the cluster replicates (%d bytes): add an [[export]] with shelf = %d, slot = %d and an image of exactly %d bytes to its config, restart it and join again",
				id, tid, want[tid], tid.Shelf, tid.Slot, want[tid])
		case size != want[tid]:
			return conflict("export %v: node %s's image is %d bytes but the cluster's is %d bytes: every node must export the same size; give node %s an image of exactly %d bytes and join again",
				tid, id, size, want[tid], id, want[tid])
		}
	}
	for _, e := range exports {
		tid := replication.TargetID{Shelf: e.Shelf, Slot: e.Slot}
		if _, ok := want[tid]; !ok {
			return conflict("node %s exports %v, which the cluster does not: every node must export the same targets; remove that export from node %s (or add it to every node) and join again",
				id, tid, id)
		}
	}
	return nil
}

// forceImageTransfer snapshots with no trailing log so the new node gets
// the full image (its local file says nothing about the cluster's data).
func (a *adminServer) forceImageTransfer(ctx context.Context) error {
	n := a.n
	for attempt := 1; ; attempt++ {
		err := replication.ForceImageTransfer(n.raft)
		if err == nil {
			return nil
		}
		msg := err.Error()
		switch {
		case strings.Contains(msg, replication.ErrCompactionHeld.Error()):
			// Another image stream is open (a lagging follower): it holds
			// compaction until it ends. Raft formats the FSM's error with
			// %v, so errors.Is cannot see it.
		case errors.Is(err, raft.ErrNothingNewToSnapshot), strings.Contains(msg, "configuration entry"):
			// Nothing applied yet, or a configuration change still being
			// applied: a barrier moves the FSM past it.
			bctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			berr := n.repl.Barrier(bctx)
			cancel()
			if berr != nil {
				return fmt.Errorf("prepare the full image for the new node: barrier: %w", berr)
			}
		default:
			return fmt.Errorf("prepare the full image for the new node: %w", err)
		}
		select {
		case <-ctx.Done():
			return unavailable("prepare the full image for the new node: gave up after %d attempts (%v): last error: %v; retry the join", attempt, ctx.Err(), err)
		case <-time.After(min(time.Duration(attempt)*100*time.Millisecond, time.Second)):
		}
	}
}

// leave runs on the leaving node.
func (a *adminServer) leave(ctx context.Context) error {
	n := a.n
	servers, err := n.members()
	if err != nil {
		return err
	}
	self := raft.ServerID(n.cfg.NodeID)
	if len(servers) == 0 {
		return conflict("node %s is not in a cluster: nothing to leave", n.cfg.NodeID)
	}
	if !slices.ContainsFunc(servers, func(s raft.Server) bool { return s.ID == self }) {
		return conflict("node %s is no longer in its cluster's configuration (already removed): stop it, and remove %s before reusing it", n.cfg.NodeID, n.cfg.DataDir)
	}
	if len(servers) == 1 {
		return conflict("node %s is the only member: a cluster cannot remove its last node; to dismantle the cluster, stop the node and remove %s", n.cfg.NodeID, n.cfg.DataDir)
	}
	if n.isLeader() {
		// Hand over first: removing the leader itself would leave the
		// cluster without one until an election timeout.
		if err := n.raft.LeadershipTransfer().Error(); err != nil {
			return unavailable("leave: hand leadership over first: %v: check that the other nodes are up (vbladectl cluster status) and retry", err)
		}
		if _, _, err := n.waitLeaderOther(ctx, 10*time.Second); err != nil {
			return unavailable("leave: %v: retry", err)
		}
	}
	req := PeerRemoveRequest{ID: n.cfg.NodeID, Address: n.cfg.RaftAdvertise}
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		lc, err := n.leaderClient("leave")
		if err == nil {
			cctx, cancel := context.WithTimeout(ctx, peerCallTimeout)
			err = lc.peerRemove(cctx, req)
			cancel()
			if err == nil {
				n.log.Info("left the cluster: stop this node now; its data_dir holds the old cluster state", "data_dir", n.cfg.DataDir)
				return nil
			}
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("leave: %w (last error: %v)", ctx.Err(), last)
		case <-time.After(500 * time.Millisecond):
		}
	}
	return last
}

// peerRemove runs on the leader (or forwards to it).
func (a *adminServer) peerRemove(ctx context.Context, req PeerRemoveRequest) error {
	n := a.n
	if !n.isLeader() {
		if req.Forwarded {
			return n.notLeader("remove a node")
		}
		lc, err := n.leaderClient("remove node " + req.ID)
		if err != nil {
			return err
		}
		req.Forwarded = true
		return lc.peerRemove(ctx, req)
	}
	a.memberMu.Lock()
	defer a.memberMu.Unlock()
	servers, err := n.members()
	if err != nil {
		return err
	}
	i := slices.IndexFunc(servers, func(s raft.Server) bool { return string(s.ID) == req.ID })
	if i < 0 {
		return nil // already gone: a retried leave succeeds
	}
	if string(servers[i].Address) != req.Address {
		return conflict("node id %q belongs to the member at %s, not %s: refusing to remove it", req.ID, servers[i].Address, req.Address)
	}
	if err := n.raft.RemoveServer(raft.ServerID(req.ID), 0, peerCallTimeout).Error(); err != nil {
		return fmt.Errorf("remove node %s from the Raft configuration: %w", req.ID, err)
	}
	n.log.Info("node removed from the cluster", "id", req.ID, "address", req.Address)
	return nil
}

// transfer hands leadership over; on a follower with local set, it asks
// the leader to.
func (a *adminServer) transfer(ctx context.Context, req TransferRequest, local bool) (*TransferResult, error) {
	n := a.n
	if !n.isLeader() {
		if !local {
			return nil, n.notLeader("transfer leadership")
		}
		servers, err := n.members()
		if err != nil {
			return nil, err
		}
		if len(servers) == 0 {
			return nil, conflict("node %s is not in a cluster", n.cfg.NodeID)
		}
		lc, err := n.leaderClient("transfer leadership")
		if err != nil {
			return nil, err
		}
		cctx, cancel := context.WithTimeout(ctx, peerCallTimeout)
		defer cancel()
		return lc.peerTransfer(cctx, req)
	}
	servers, err := n.members()
	if err != nil {
		return nil, err
	}
	var f raft.Future
	if req.To != "" {
		i := slices.IndexFunc(servers, func(s raft.Server) bool { return string(s.ID) == req.To })
		switch {
		case i < 0:
			ids := make([]string, len(servers))
			for j, s := range servers {
				ids[j] = string(s.ID)
			}
			return nil, &APIError{Status: http.StatusNotFound, Message: fmt.Sprintf("no member with id %q (members: %s)", req.To, strings.Join(ids, ", "))}
		case req.To == n.cfg.NodeID:
			return nil, conflict("node %s already leads", req.To)
		case servers[i].Suffrage != raft.Voter:
			return nil, conflict("node %s is a nonvoter (still catching up after its join) and cannot lead yet: wait until `vbladectl cluster status` shows it as a follower", req.To)
		}
		f = n.raft.LeadershipTransferToServer(servers[i].ID, servers[i].Address)
	} else {
		if len(servers) < 2 {
			return nil, conflict("node %s is the only member: there is nobody to hand leadership to", n.cfg.NodeID)
		}
		f = n.raft.LeadershipTransfer()
	}
	if err := f.Error(); err != nil {
		target := req.To
		if target == "" {
			target = "another node"
		}
		return nil, unavailable("leadership transfer to %s failed: %v: check that it is up and caught up (vbladectl cluster status), then retry", target, err)
	}
	addr, id, err := n.waitLeaderOther(ctx, 10*time.Second)
	if err != nil {
		return nil, unavailable("leadership transfer: %v", err)
	}
	return &TransferResult{LeaderID: string(id), LeaderAddress: string(addr)}, nil
}

// verifyAttempts bounds the automatic retries of a verify whose checksums
// differed while the applied index moved (writes in flight).
const verifyAttempts = 3

// verify compares every member's image checksums with the leader's, at
// the leader's applied index after a barrier. A write landing on one node
// while it hashes (the applied index moved) makes a mismatch inconclusive;
// verify then retries, and reports Inconclusive if it never settles.
func (a *adminServer) verify(ctx context.Context, local bool) (*VerifyResult, error) {
	n := a.n
	if !n.isLeader() {
		if !local {
			return nil, n.notLeader("verify")
		}
		servers, err := n.members()
		if err != nil {
			return nil, err
		}
		if len(servers) == 0 {
			return nil, conflict("node %s is not in a cluster: nothing to verify", n.cfg.NodeID)
		}
		lc, err := n.leaderClient("verify")
		if err != nil {
			return nil, err
		}
		return lc.peerVerify(ctx)
	}
	var res *VerifyResult
	for attempt := 1; attempt <= verifyAttempts; attempt++ {
		var moved bool
		var err error
		res, moved, err = a.verifyOnce(ctx)
		if err != nil {
			return nil, err
		}
		res.Attempts = attempt
		if res.OK || !moved {
			return res, nil
		}
		res.Inconclusive = true
		res.Message = fmt.Sprintf("checksums differed while writes moved the applied index (attempt %d of %d): the images were hashed at different points; retry when the write load is lower", attempt, verifyAttempts)
	}
	return res, nil
}

func (a *adminServer) verifyOnce(ctx context.Context) (*VerifyResult, bool, error) {
	n := a.n
	bctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := n.repl.Barrier(bctx)
	cancel()
	if err != nil {
		return nil, false, unavailable("verify: barrier on the leader: %v: retry", err)
	}
	index := n.fsm.AppliedIndex()
	servers, err := n.members()
	if err != nil {
		return nil, false, err
	}
	res := &VerifyResult{Index: index, Leader: n.cfg.NodeID, Nodes: make([]VerifyNode, len(servers))}
	sums := make([]*ChecksumResponse, len(servers))
	var wg sync.WaitGroup
	for i, srv := range servers {
		res.Nodes[i] = VerifyNode{ID: string(srv.ID), Address: string(srv.Address)}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if srv.ID == raft.ServerID(n.cfg.NodeID) {
				sums[i], err = n.localChecksums(ctx, index)
			} else {
				sums[i], err = n.peer(string(srv.Address), string(srv.ID)).peerChecksum(ctx, index)
			}
			if err != nil {
				res.Nodes[i].Error = err.Error()
			}
		}()
	}
	wg.Wait()
	li := slices.IndexFunc(servers, func(s raft.Server) bool { return s.ID == raft.ServerID(n.cfg.NodeID) })
	if li < 0 || sums[li] == nil {
		return nil, false, fmt.Errorf("verify: the leader could not checksum its own images: %s", res.Nodes[max(li, 0)].Error)
	}
	want := map[string]string{}
	for _, t := range sums[li].Targets {
		want[t.Target] = t.SHA256
	}
	res.OK = true
	moved := false
	for i, s := range sums {
		if s == nil {
			res.OK = false
			continue
		}
		res.Nodes[i].AppliedBefore, res.Nodes[i].AppliedAfter = s.AppliedBefore, s.AppliedAfter
		if s.AppliedBefore != s.AppliedAfter || s.AppliedBefore != sums[li].AppliedBefore {
			moved = true
		}
		for _, t := range s.Targets {
			vt := VerifyTarget{Target: t.Target, SHA256: t.SHA256, Match: want[t.Target] == t.SHA256}
			res.OK = res.OK && vt.Match
			res.Nodes[i].Targets = append(res.Nodes[i].Targets, vt)
		}
		if len(s.Targets) != len(want) {
			res.OK = false
		}
	}
	return res, moved, nil
}

// localChecksums hashes every replicated image once the applied index has
// reached index.
func (n *Node) localChecksums(ctx context.Context, index uint64) (*ChecksumResponse, error) {
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := n.fsm.WaitApplied(wctx, index)
	cancel()
	// The FSM counts only the entries it sees; if index is a barrier or
	// no-op entry restored from a snapshot, Raft's own applied index is the
	// one that reaches it.
	if err != nil && (ctx.Err() != nil || n.fsm.Err() != nil || n.raft.AppliedIndex() < index) {
		return nil, unavailable("node %s has applied %d of the leader's %d entries (%v): it is behind; retry once it has caught up (vbladectl cluster status)",
			n.cfg.NodeID, n.fsm.AppliedIndex(), index, err)
	}
	res := &ChecksumResponse{AppliedBefore: n.fsm.AppliedIndex()}
	for _, t := range n.fsm.Targets() {
		d := n.fsm.Disk(t.ID)
		if d == nil {
			return nil, fmt.Errorf("node %s has no local image for %v", n.cfg.NodeID, t.ID)
		}
		sum, err := replication.ImageChecksum(ctx, d)
		if err != nil {
			return nil, fmt.Errorf("node %s: checksum %v: %w", n.cfg.NodeID, t.ID, err)
		}
		res.Targets = append(res.Targets, TargetChecksum{Target: t.ID.String(), SHA256: hex.EncodeToString(sum[:])})
	}
	res.AppliedAfter = n.fsm.AppliedIndex()
	return res, nil
}
