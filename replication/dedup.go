package replication

import (
	"encoding/binary"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// DedupWindow is how many identified writes (entries whose request has a
// non-zero source MAC) the FSM remembers per target, to recognise the
// retransmission of a write it already applied. It is part of the replicated
// state machine: every node must use the same value (changing it is a format
// change, like a new entry version). See DESIGN.md for why it is large enough
// and small enough.
const DedupWindow = 8192

// recentWrite is what the FSM remembers of one applied identified write:
// enough to tell its retransmission (same identity, offset, length and data)
// from a different write that happens to reuse the identity.
type recentWrite struct {
	ID     aoe.RequestID
	Offset int64
	Length uint32
	CRC    uint32 // CRC-32C of the data
}

// recentWriteLen is the encoded size of a recentWrite in snapshot metadata:
// src(6) tag(4) offset(8) length(4) crc32c(4).
const recentWriteLen = 6 + 4 + 8 + 4 + 4

// recentWrites is one target's table: the last DedupWindow identified writes
// in the order they were applied, evicted first in, first out. A write that
// reuses an identity with different content gets a new slot; the older slot
// stays in the ring (stale) until it is evicted, so the sequence of slots,
// and therefore every later eviction, depends only on the sequence of applied
// entries. The snapshot keeps the whole sequence, stale slots included, so a
// node restored from it evicts exactly as a node that never restarted.
type recentWrites struct {
	ring  []recentWrite         // oldest at head once the ring is full
	head  int                   // next slot to overwrite (0 until full)
	index map[aoe.RequestID]int // identity -> ring position of its newest slot
}

func newRecentWrites() *recentWrites {
	return &recentWrites{index: make(map[aoe.RequestID]int)}
}

// seen reports whether w is the newest write remembered for its identity.
func (r *recentWrites) seen(w recentWrite) bool {
	i, ok := r.index[w.ID]
	return ok && r.ring[i] == w
}

// add remembers w, evicting the oldest slot when the table is full.
func (r *recentWrites) add(w recentWrite) {
	if len(r.ring) < DedupWindow {
		r.index[w.ID] = len(r.ring)
		r.ring = append(r.ring, w)
		return
	}
	old := r.ring[r.head]
	if i, ok := r.index[old.ID]; ok && i == r.head {
		delete(r.index, old.ID)
	}
	r.ring[r.head] = w
	r.index[w.ID] = r.head
	r.head++
	if r.head == len(r.ring) {
		r.head = 0
	}
}

// list returns the slots oldest first (the snapshot order).
func (r *recentWrites) list() []recentWrite {
	out := make([]recentWrite, 0, len(r.ring))
	out = append(out, r.ring[r.head:]...)
	return append(out, r.ring[:r.head]...)
}

// recentWritesFrom rebuilds a table from list (oldest first); adding the slots
// in order reproduces the table they were listed from.
func recentWritesFrom(list []recentWrite) *recentWrites {
	r := newRecentWrites()
	for _, w := range list {
		r.add(w)
	}
	return r
}

func appendRecent(b []byte, list []recentWrite) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(list)))
	for _, w := range list {
		b = append(b, w.ID.Src[:]...)
		b = binary.BigEndian.AppendUint32(b, w.ID.Tag)
		b = binary.BigEndian.AppendUint64(b, uint64(w.Offset))
		b = binary.BigEndian.AppendUint32(b, w.Length)
		b = binary.BigEndian.AppendUint32(b, w.CRC)
	}
	return b
}

// decodeRecent decodes a table of a target of size bytes from the front of p
// and returns the bytes after it. Only what the FSM could have recorded
// decodes: at most DedupWindow slots, non-zero source, whole sectors inside
// the image.
func decodeRecent(p []byte, size int64) ([]recentWrite, []byte, error) {
	if len(p) < 4 {
		return nil, nil, corruptSnap("recent-write table truncated before its count")
	}
	n := binary.BigEndian.Uint32(p)
	p = p[4:]
	if n > DedupWindow || uint64(len(p)) < uint64(n)*recentWriteLen {
		return nil, nil, corruptSnap("recent-write count %d (max %d, %d bytes left)", n, DedupWindow, len(p))
	}
	if n == 0 {
		return nil, p, nil
	}
	list := make([]recentWrite, n)
	for i := range list {
		w := &list[i]
		copy(w.ID.Src[:], p)
		w.ID.Tag = binary.BigEndian.Uint32(p[6:])
		off := binary.BigEndian.Uint64(p[10:])
		w.Length = binary.BigEndian.Uint32(p[18:])
		w.CRC = binary.BigEndian.Uint32(p[22:])
		p = p[recentWriteLen:]
		if w.ID.Src == (aoe.MAC{}) {
			return nil, nil, corruptSnap("recent write %d has no source", i)
		}
		if w.Length == 0 || w.Length > MaxWriteLen || w.Length%SectorSize != 0 ||
			off%SectorSize != 0 || off > uint64(size) || uint64(w.Length) > uint64(size)-off {
			return nil, nil, corruptSnap("recent write %d (%d bytes at %d) is not whole sectors inside the %d-byte image", i, w.Length, off, size)
		}
		w.Offset = int64(off)
	}
	return list, p, nil
}
