package replication

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"maps"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/raft"
	"github.com/vblade-ha/vblade-ha/aoe"
)

// StateSink hears every change of a target's protocol state that the FSM
// applies (from the log or from a snapshot), so the node can publish it to its
// aoe.Target. It is called from Raft's apply goroutine: it must return quickly
// and must never wait on Raft (that would deadlock the apply loop).
type StateSink interface {
	SetState(shelf uint16, slot uint8, s aoe.TargetState)
}

// TargetSink is optionally implemented by a StateSink that also wants to
// hear targets entering and leaving the replicated set (for example to close
// a gate when a target is removed). Same calling rules as StateSink.
type TargetSink interface {
	AddTarget(shelf uint16, slot uint8, size int64)
	RemoveTarget(shelf uint16, slot uint8)
}

// ErrUnknownTarget is wrapped by the rejection of an entry for a target that is
// not in the replicated set.
var ErrUnknownTarget = errors.New("unknown target")

// ErrCompactionHeld is returned by FSM.Snapshot while a full image is being
// streamed to a follower: a new snapshot would let Raft compact entries the
// follower still needs to replay on top of the image it is receiving. Raft
// logs it and retries at the next snapshot interval.
var ErrCompactionHeld = errors.New("snapshot postponed: a full image is being streamed to a follower and the log after its index must be kept until the transfer ends")

// RejectedError is the response to an entry that every node refuses in the
// same way (its outcome depends only on the replicated state, not on this
// node's disks), for example a write to a target that was never added. Nothing
// was applied anywhere, so nothing is lost; the leader reports it to the caller.
type RejectedError struct {
	Index  uint64
	Op     Op
	Target TargetID
	Err    error
}

func (e *RejectedError) Error() string {
	return fmt.Sprintf("replication: log entry %d (%v %v) rejected: %v", e.Index, e.Op, e.Target, e.Err)
}

func (e *RejectedError) Unwrap() error { return e.Err }

// BatchError is the response to a Batch entry some of whose entries were
// rejected: Errs[i] is the *RejectedError of the Batch's entry i, or nil if
// that entry was applied. (A Batch whose entries all applied answers nil; a
// fatal failure answers the node's *FatalError, as for any entry.)
type BatchError struct {
	Index uint64
	Errs  []error
}

func (e *BatchError) Error() string {
	n, first := 0, error(nil)
	for _, err := range e.Errs {
		if err != nil {
			if first == nil {
				first = err
			}
			n++
		}
	}
	return fmt.Sprintf("replication: log entry %d: %d of %d batched entries rejected, first: %v", e.Index, n, len(e.Errs), first)
}

// FatalError means this node cannot apply the log any further: a local disk
// failed (ENOSPC, EIO), a local image does not match the replicated target, or
// an entry is unreadable. The FSM stops applying at Index (it never applies a
// later entry over the hole) and refuses snapshots, so the log from its last
// snapshot on is kept. The node must stop serving and shut Raft down; after the
// operator fixes the cause, a restart replays the log from the last snapshot
// over the image and the node catches up.
type FatalError struct {
	Index  uint64
	Target TargetID // zero when the failure is not about one target
	Op     string
	Err    error
}

func (e *FatalError) Error() string {
	return fmt.Sprintf("replication: node stopped applying the log at entry %d: %s %v: %v "+
		"(fix the cause, then restart the node: it replays the log from its last snapshot over the local image)",
		e.Index, e.Op, e.Target, e.Err)
}

func (e *FatalError) Unwrap() error { return e.Err }

// FSMOptions configures NewFSM.
type FSMOptions struct {
	// Disks are this node's local images, one per exported target. The FSM
	// never creates, resizes or closes them. A target that the cluster adds
	// must be here with the same size, or the node stops with a FatalError.
	Disks map[TargetID]aoe.Disk
	// Sink is told about state changes; nil ignores them.
	Sink StateSink
	// OnFatal is called once, in its own goroutine (so it may call
	// raft.Shutdown), when the FSM records a FatalError.
	OnFatal func(error)
}

// TargetInfo is one target of the replicated set.
type TargetInfo struct {
	ID    TargetID
	Size  int64
	State aoe.TargetState
}

// FSM applies the replicated log to the local images. It implements
// raft.BatchingFSM. Writes go to the images without fsync: the Raft log is the
// durability point, and the images are synced only before a snapshot is
// recorded (see DESIGN.md).
type FSM struct {
	disks   map[TargetID]aoe.Disk // fixed at construction
	sink    StateSink
	onFatal func(error)

	// applyMu is held by ApplyBatch for a whole batch and by an image install
	// from its first image byte to its end, so that no apply of an older entry
	// can land on top of a freshly installed block (see imageSink).
	applyMu sync.Mutex

	mu      sync.RWMutex
	targets map[TargetID]*TargetInfo
	// recent is each target's table of recent identified writes (see
	// DedupWindow); replicated state, recorded in snapshots. Only the apply
	// path (holding applyMu) and Restore change it, under mu.
	recent  map[TargetID]*recentWrites
	applied uint64        // last log index whose effect is in the images
	changed chan struct{} // closed and replaced whenever applied moves
	// fatal is the first fatal failure; sticky. Set under mu, read
	// without it by Err, which every read and write of a target checks.
	fatal atomic.Pointer[FatalError]

	// streams counts full-image streams open on this node; while it is
	// non-zero Snapshot refuses so the log is not compacted under them.
	streams atomic.Int32

	// duplicates counts identified writes skipped because the same write
	// was applied before (retransmissions).
	duplicates atomic.Uint64

	// scratch joins a Batch's adjacent writes (used under applyMu only).
	scratch []byte
}

var (
	_ raft.BatchingFSM = (*FSM)(nil)
	_ raft.FSM         = (*FSM)(nil)
)

// NewFSM returns an FSM over opts.Disks with an empty replicated set; Raft
// fills it by replaying the log or restoring a snapshot.
func NewFSM(opts FSMOptions) *FSM {
	return &FSM{
		disks:   maps.Clone(opts.Disks),
		sink:    opts.Sink,
		onFatal: opts.OnFatal,
		targets: make(map[TargetID]*TargetInfo),
		recent:  make(map[TargetID]*recentWrites),
		changed: make(chan struct{}),
	}
}

// Apply implements raft.FSM.
func (f *FSM) Apply(l *raft.Log) any {
	return f.ApplyBatch([]*raft.Log{l})[0]
}

// ApplyBatch implements raft.BatchingFSM. Each response is nil (applied), a
// *RejectedError (refused identically on every node) or the node's
// *FatalError (nothing from that entry on was applied here).
func (f *FSM) ApplyBatch(logs []*raft.Log) []any {
	resps := make([]any, len(logs))
	f.applyMu.Lock()
	defer f.applyMu.Unlock()
	for i, l := range logs {
		if resp := f.applyOne(l); resp != nil {
			resps[i] = resp
		}
	}
	f.notify()
	return resps
}

// notify wakes WaitApplied callers; once per batch, not per entry.
func (f *FSM) notify() {
	f.mu.Lock()
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

// applyOne applies one log and advances the applied index. It returns an
// error value (never a typed nil) or nil.
func (f *FSM) applyOne(l *raft.Log) error {
	f.mu.RLock()
	applied, fatal := f.applied, f.fatal.Load()
	f.mu.RUnlock()
	if fatal != nil {
		return fatal
	}
	if l.Index <= applied {
		// Already covered: an installed image (at least as new as its
		// snapshot index) replaced the effect of this entry; applying it
		// now would roll blocks back.
		return nil
	}
	var err error
	if l.Type == raft.LogCommand {
		err = f.applyCommand(l)
	}
	if err != nil {
		var fe *FatalError
		if errors.As(err, &fe) {
			f.setFatal(fe)
			return fe
		}
	}
	f.mu.Lock()
	f.applied = l.Index
	f.mu.Unlock()
	return err
}

func (f *FSM) applyCommand(l *raft.Log) error {
	e, err := DecodeEntry(l.Data)
	if err != nil {
		var ee *EntryError
		if errors.As(err, &ee) {
			ee.Index = l.Index
		}
		// A bad entry is local corruption as far as this node can tell; the
		// only safe move is to stop before the hole.
		return &FatalError{Index: l.Index, Op: "decode", Err: err}
	}
	// The entries in order: a Batch's, as if each had an index of its own,
	// or the one entry. A fatal failure stops the batch where it happened;
	// the node stops there (a restart replays the whole batch, whose writes
	// land the same way again). Rejections are reported entry by entry.
	// Writes that continue each other (same target, each starting where the
	// previous ended, as a sequential writer's window does) go to the image
	// as one write; the result is the same as writing them one by one in
	// order.
	entries := e.Batch
	if e.Op != OpBatch {
		entries = []Entry{e}
	}
	var errs []error
	var run writeRun
	for i := range entries {
		sub := &entries[i]
		var err error
		if sub.Op == OpWrite {
			var apply bool
			if apply, err = f.admitWrite(l.Index, sub); apply {
				if !run.extends(sub) {
					if err := f.flushRun(l.Index, &run); err != nil {
						return err
					}
				}
				run.add(sub)
				continue
			}
		} else {
			if err := f.flushRun(l.Index, &run); err != nil {
				return err
			}
			err = f.applyEntry(l.Index, sub)
		}
		if err == nil {
			continue
		}
		if _, ok := err.(*FatalError); ok || e.Op != OpBatch {
			return err
		}
		if errs == nil {
			errs = make([]error, len(entries))
		}
		errs[i] = err
	}
	if err := f.flushRun(l.Index, &run); err != nil {
		return err
	}
	if errs != nil {
		return &BatchError{Index: l.Index, Errs: errs}
	}
	return nil
}

// writeRun is a sequence of admitted writes to one target, each starting
// where the previous one ended.
type writeRun struct {
	target TargetID
	offset int64
	parts  [][]byte
	n      int
}

func (r *writeRun) extends(e *Entry) bool {
	return len(r.parts) > 0 && e.Target == r.target && e.Offset == r.offset+int64(r.n) && r.n+len(e.Data) <= MaxWriteLen
}

func (r *writeRun) add(e *Entry) {
	if len(r.parts) == 0 {
		r.target, r.offset = e.Target, e.Offset
	}
	r.parts = append(r.parts, e.Data)
	r.n += len(e.Data)
}

// flushRun writes r to its image and empties it. The FSM's scratch buffer
// joins the parts; it is only used under applyMu.
func (f *FSM) flushRun(index uint64, r *writeRun) error {
	if len(r.parts) == 0 {
		return nil
	}
	data := r.parts[0]
	if len(r.parts) > 1 {
		f.scratch = f.scratch[:0]
		for _, p := range r.parts {
			f.scratch = append(f.scratch, p...)
		}
		data = f.scratch
	}
	err := f.writeImage(index, r.target, data, r.offset)
	r.parts, r.n = r.parts[:0], 0
	return err
}

// admitWrite decides whether the write e of the entry at index is applied:
// (true, nil) to write it, (false, nil) for a retransmission already applied
// (acknowledged without writing), (false, *RejectedError) for a write every
// node refuses.
func (f *FSM) admitWrite(index uint64, e *Entry) (bool, error) {
	f.mu.RLock()
	t := f.targets[e.Target]
	f.mu.RUnlock()
	reject := func(format string, args ...any) error {
		return &RejectedError{Index: index, Op: e.Op, Target: e.Target, Err: fmt.Errorf(format, args...)}
	}
	if t == nil {
		return false, reject("%w", ErrUnknownTarget)
	}
	if e.Offset+int64(len(e.Data)) > t.Size {
		return false, reject("write of %d bytes at %d is beyond the %d-byte image", len(e.Data), e.Offset, t.Size)
	}
	if e.Request.Src != (aoe.MAC{}) && f.seenOrRecord(*e) {
		// The retransmission of a write already applied: applying it
		// again could roll back later writes to the same blocks. Every
		// node decides the same way (the table is replicated state), and
		// the copy is acknowledged like the original.
		f.duplicates.Add(1)
		return false, nil
	}
	return true, nil
}

// writeImage writes data at off to target's local image.
func (f *FSM) writeImage(index uint64, target TargetID, data []byte, off int64) error {
	// Background context: an apply is never abandoned halfway, the image
	// must end up with the entry or the node stops.
	if err := f.disks[target].WriteAt(context.Background(), data, off); err != nil {
		return &FatalError{Index: index, Target: target, Op: "write",
			Err: fmt.Errorf("local image write of %d bytes at %d: %w", len(data), off, err)}
	}
	return nil
}

// applyEntry applies one entry, neither a Write (admitWrite and a write run,
// in applyCommand) nor a Batch, of the log entry at index.
func (f *FSM) applyEntry(index uint64, e *Entry) error {
	reject := func(format string, args ...any) error {
		return &RejectedError{Index: index, Op: e.Op, Target: e.Target, Err: fmt.Errorf(format, args...)}
	}
	fatal := func(op string, err error) error {
		return &FatalError{Index: index, Target: e.Target, Op: op, Err: err}
	}

	f.mu.RLock()
	t := f.targets[e.Target]
	f.mu.RUnlock()

	switch e.Op {
	case OpNoop:
		return nil

	case OpSetState:
		if t == nil {
			return reject("%w", ErrUnknownTarget)
		}
		nt := &TargetInfo{ID: t.ID, Size: t.Size, State: e.State}
		f.mu.Lock()
		f.targets[e.Target] = nt
		f.mu.Unlock()
		if f.sink != nil {
			f.sink.SetState(e.Target.Shelf, e.Target.Slot, e.State.Clone())
		}
		return nil

	case OpAddTarget:
		if t != nil {
			if t.Size == e.Size {
				return nil // idempotent: adding again changes nothing
			}
			return reject("target already exported with %d bytes, not %d", t.Size, e.Size)
		}
		if err := f.checkLocal(e.Target, e.Size); err != nil {
			return fatal("add-target", err)
		}
		f.mu.Lock()
		f.targets[e.Target] = &TargetInfo{ID: e.Target, Size: e.Size}
		f.mu.Unlock()
		if ts, ok := f.sink.(TargetSink); ok {
			ts.AddTarget(e.Target.Shelf, e.Target.Slot, e.Size)
		}
		return nil

	case OpRemoveTarget:
		if t == nil {
			return reject("%w", ErrUnknownTarget)
		}
		if t.Size != e.Size {
			return reject("target has %d bytes, removal names %d", t.Size, e.Size)
		}
		f.mu.Lock()
		delete(f.targets, e.Target)
		delete(f.recent, e.Target)
		f.mu.Unlock()
		if ts, ok := f.sink.(TargetSink); ok {
			ts.RemoveTarget(e.Target.Shelf, e.Target.Slot)
		}
		return nil
	}
	return reject("unknown op") // unreachable: DecodeEntry validated Op
}

// seenOrRecord reports whether the identified write e is the same write (same
// identity, offset, length and data) as the newest one remembered for its
// identity; if not, it records e, which is then applied. Recording before the
// image write is safe: if that write fails the FSM stops at this entry and a
// restart rebuilds the table from the snapshot and the log.
func (f *FSM) seenOrRecord(e Entry) bool {
	w := recentWrite{ID: e.Request, Offset: e.Offset, Length: uint32(len(e.Data)), CRC: crc32.Checksum(e.Data, castagnoli)}
	f.mu.Lock()
	defer f.mu.Unlock()
	r := f.recent[e.Target]
	if r == nil {
		r = newRecentWrites()
		f.recent[e.Target] = r
	}
	if r.seen(w) {
		return true
	}
	r.add(w)
	return false
}

// DuplicateWrites is the number of retransmitted writes this FSM recognised
// and did not apply again since it started.
func (f *FSM) DuplicateWrites() uint64 { return f.duplicates.Load() }

// checkLocal reports whether this node holds an image for id of the given size.
func (f *FSM) checkLocal(id TargetID, size int64) error {
	d := f.disks[id]
	if d == nil {
		return fmt.Errorf("the cluster exports %v (%d bytes) but this node has no local image for it: add an export for %v with a %d-byte image to this node's config", id, size, id, size)
	}
	if got := d.Size(); got != size {
		return fmt.Errorf("the cluster exports %v with %d bytes but the local image has %d: give this node an image of exactly %d bytes", id, size, got, size)
	}
	return nil
}

func (f *FSM) setFatal(fe *FatalError) {
	f.mu.Lock()
	first := f.fatal.Load() == nil
	if first {
		f.fatal.Store(fe)
	}
	f.mu.Unlock()
	if first && f.onFatal != nil {
		go f.onFatal(fe)
	}
}

// Err returns the FatalError that stopped this FSM, or nil.
func (f *FSM) Err() error {
	if fe := f.fatal.Load(); fe != nil {
		return fe
	}
	return nil
}

// AppliedIndex is the last log index whose effect is in the local images.
func (f *FSM) AppliedIndex() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.applied
}

// WaitApplied blocks until the applied index reaches index, the FSM stops
// with a fatal error, or ctx ends.
func (f *FSM) WaitApplied(ctx context.Context, index uint64) error {
	for {
		f.mu.RLock()
		applied, fatal, ch := f.applied, f.fatal.Load(), f.changed
		f.mu.RUnlock()
		if applied >= index {
			return nil
		}
		if fatal != nil {
			return fatal
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("wait for log index %d (applied %d): %w", index, applied, ctx.Err())
		}
	}
}

// Target returns the replicated state of one target.
func (f *FSM) Target(id TargetID) (TargetInfo, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	t := f.targets[id]
	if t == nil {
		return TargetInfo{}, false
	}
	return TargetInfo{ID: t.ID, Size: t.Size, State: t.State.Clone()}, true
}

// Targets returns the replicated set, ordered by shelf then slot.
func (f *FSM) Targets() []TargetInfo {
	f.mu.RLock()
	out := make([]TargetInfo, 0, len(f.targets))
	for _, t := range f.targets {
		out = append(out, TargetInfo{ID: t.ID, Size: t.Size, State: t.State.Clone()})
	}
	f.mu.RUnlock()
	slices.SortFunc(out, func(a, b TargetInfo) int {
		switch {
		case a.ID.less(b.ID):
			return -1
		case b.ID.less(a.ID):
			return 1
		}
		return 0
	})
	return out
}

// Disk returns this node's local image for id (nil if it has none). Reads
// served by the leader come from it.
func (f *FSM) Disk(id TargetID) aoe.Disk { return f.disks[id] }

// Snapshot implements raft.FSM. It copies no image data: it records the
// applied index, the target set and each target's recent-write table (the
// replicated deduplication state), and Persist syncs the images before the
// record is written (a fuzzy snapshot, see DESIGN.md). It is called on Raft's
// apply goroutine, so the recorded index matches the images' content so far.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	if err := f.Err(); err != nil {
		return nil, err // never record an index past a hole
	}
	if f.streams.Load() > 0 {
		return nil, ErrCompactionHeld
	}
	f.mu.RLock()
	meta := snapshotMeta{Index: f.applied}
	for _, t := range f.targets {
		meta.Targets = append(meta.Targets, TargetInfo{ID: t.ID, Size: t.Size, State: t.State.Clone()})
		if r := f.recent[t.ID]; r != nil && len(r.ring) > 0 {
			if meta.Recent == nil {
				meta.Recent = make(map[TargetID][]recentWrite)
			}
			meta.Recent[t.ID] = r.list()
		}
	}
	f.mu.RUnlock()
	meta.sort()
	return &fsmSnapshot{fsm: f, meta: meta}, nil
}

// Restore implements raft.FSM. It reads only the snapshot's metadata (target
// set, states and recent-write tables, which replace the FSM's own): at
// start-up the local images are already at least as new as the snapshot, and
// after an install the image was written by the snapshot sink as it arrived.
// Either way no image byte is copied here. It leaves the rest of rc unread
// (Raft closes it).
func (f *FSM) Restore(rc io.ReadCloser) error {
	meta, _, err := readMeta(rc)
	if err != nil {
		return fmt.Errorf("replication: restore snapshot: %w", err)
	}
	for _, t := range meta.Targets {
		if err := f.checkLocal(t.ID, t.Size); err != nil {
			fe := &FatalError{Index: meta.Index, Target: t.ID, Op: "restore", Err: err}
			f.setFatal(fe)
			return fe
		}
	}

	f.applyMu.Lock()
	defer f.applyMu.Unlock()
	f.mu.Lock()
	old := f.targets
	f.targets = make(map[TargetID]*TargetInfo, len(meta.Targets))
	f.recent = make(map[TargetID]*recentWrites, len(meta.Targets))
	for _, t := range meta.Targets {
		f.targets[t.ID] = &TargetInfo{ID: t.ID, Size: t.Size, State: t.State}
		if list := meta.Recent[t.ID]; len(list) > 0 {
			f.recent[t.ID] = recentWritesFrom(list)
		}
	}
	f.applied = meta.Index
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()

	ts, _ := f.sink.(TargetSink)
	for id := range old {
		if _, ok := f.targets[id]; !ok && ts != nil {
			ts.RemoveTarget(id.Shelf, id.Slot)
		}
	}
	for _, t := range meta.Targets {
		if _, ok := old[t.ID]; !ok && ts != nil {
			ts.AddTarget(t.ID.Shelf, t.ID.Slot, t.Size)
		}
		if f.sink != nil {
			f.sink.SetState(t.ID.Shelf, t.ID.Slot, t.State.Clone())
		}
	}
	return nil
}

// beginInstall is called by the snapshot sink before it writes the first
// image byte of an incoming full image. It waits for the batch being applied
// and then blocks further applies until endInstall, because an entry older
// than the snapshot applied after a block was installed would roll that block
// back with nothing later in the log to repair it.
func (f *FSM) beginInstall() { f.applyMu.Lock() }

// endInstall ends an install. On success the images hold the state at index
// or later, so entries up to index still queued for apply are skipped; on
// failure nothing is skipped: the partly written image is newer than the
// applied index block by block, and replaying the log from the applied index
// over it converges to the exact state (the same fuzzy argument).
func (f *FSM) endInstall(index uint64, ok bool) {
	if ok {
		f.mu.Lock()
		f.applied = index
		close(f.changed)
		f.changed = make(chan struct{})
		f.mu.Unlock()
	}
	f.applyMu.Unlock()
}

// fsmSnapshot is the small record a snapshot persists.
type fsmSnapshot struct {
	fsm  *FSM
	meta snapshotMeta
}

// Persist syncs every image and then writes the metadata. The order is the
// point: once the metadata (and the log compaction that follows it) is
// durable, the images on disk must already hold everything up to its index.
func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	for _, t := range s.meta.Targets {
		d := s.fsm.disks[t.ID]
		if d == nil {
			sink.Cancel()
			return fmt.Errorf("replication: persist snapshot %d: no local image for %v", s.meta.Index, t.ID)
		}
		if err := d.Flush(context.Background()); err != nil {
			sink.Cancel()
			return fmt.Errorf("replication: persist snapshot %d: sync image of %v: %w", s.meta.Index, t.ID, err)
		}
	}
	if _, err := sink.Write(s.meta.encode(false)); err != nil {
		sink.Cancel()
		return fmt.Errorf("replication: persist snapshot %d: write metadata: %w", s.meta.Index, err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("replication: persist snapshot %d: %w", s.meta.Index, err)
	}
	return nil
}

func (s *fsmSnapshot) Release() {}
