// Package replication turns a set of local disk images into one Raft-replicated
// block store: the log entry format, the Raft FSM that applies entries to the
// local images, the snapshot store that ships a full image only to a node that
// needs one, and the aoe.Disk / aoe.StateStore implementations the leader
// plugs into the AoE engine. It knows nothing about frames or sockets.
package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/vblade-ha/vblade-ha/aoe"
)

// EntryVersion is the newest encoding version, written in the first byte of
// an entry. A node refuses (fatally) an entry with a version it does not know
// rather than guessing: the fix is to upgrade that node. Version 2 added the
// request identity (source MAC and tag) to Write entries; version 1 entries
// (written before) still decode, as writes without identity, so a log written
// by an older node replays. Version 3 added Batch entries. An entry is written
// at the lowest version that can hold it (Batch: 3, others: 2), so a version 2
// node still reads every entry but a Batch.
const (
	EntryVersion       = 3
	entryVersionSingle = 2 // what every entry but a Batch is written at
	entryVersionLegacy = 1 // Write entries without a request identity
)

// MaxBatch bounds the number of entries in one Batch entry.
const MaxBatch = 4096

// MaxWriteLen bounds the payload of one Write entry. The engine writes at most
// one frame's worth of sectors (a few KiB even with jumbo frames); the bound
// only keeps a corrupt length from allocating or copying absurd amounts.
const MaxWriteLen = 1 << 20

// maxImageSize bounds offsets and sizes so that offset+length arithmetic on
// int64 can never overflow (4 EiB is far beyond any real image).
const maxImageSize = 1 << 62

// SectorSize is the unit of every offset and size in the replicated store.
const SectorSize = 512

// headerLen is version, op, shelf (2), slot; trailerLen is the CRC32C.
const (
	headerLen  = 5
	trailerLen = 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// TargetID names an AoE target (shelf.slot).
type TargetID struct {
	Shelf uint16
	Slot  uint8
}

// String formats t as the Linux driver names it: e<shelf>.<slot>.
func (t TargetID) String() string { return fmt.Sprintf("e%d.%d", t.Shelf, t.Slot) }

func (t TargetID) less(o TargetID) bool {
	if t.Shelf != o.Shelf {
		return t.Shelf < o.Shelf
	}
	return t.Slot < o.Slot
}

// Op is the kind of a log entry. Zero is not a valid op so that a zeroed
// buffer never decodes as something meaningful.
type Op uint8

const (
	OpWrite        Op = 1 // overwrite bytes of a target's image
	OpSetState     Op = 2 // replace a target's config string, mask list and reservations
	OpAddTarget    Op = 3 // add a target of a given size to the replicated set
	OpRemoveTarget Op = 4 // remove a target from the replicated set
	OpNoop         Op = 5 // changes nothing; useful to force a new index
	OpBatch        Op = 6 // several entries (no Batch among them), applied in order
)

func (o Op) String() string {
	switch o {
	case OpWrite:
		return "write"
	case OpSetState:
		return "set-state"
	case OpAddTarget:
		return "add-target"
	case OpRemoveTarget:
		return "remove-target"
	case OpNoop:
		return "noop"
	case OpBatch:
		return "batch"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Entry is one replicated command. Which fields matter depends on Op:
// Write uses Offset, Data and Request, SetState uses State, AddTarget and
// RemoveTarget use Size, Batch uses Batch (and has a zero Target).
type Entry struct {
	Op     Op
	Target TargetID
	Offset int64  // Write: byte offset, a multiple of SectorSize
	Data   []byte // Write: whole sectors; after DecodeEntry it aliases the input
	// Request is the initiator's identity for the write (source MAC and
	// tag). The FSM applies a write at most once per identity within its
	// window (see DESIGN.md); a zero Src means no identity (never
	// deduplicated).
	Request aoe.RequestID
	State   aoe.TargetState // SetState
	Size    int64           // AddTarget, RemoveTarget: image size in bytes
	// Batch holds a Batch entry's entries: the leader's group commit puts
	// the writes that arrive while earlier proposals are in flight into
	// one log entry (see DESIGN.md, "Group commit").
	Batch []Entry
}

// ErrCorruptEntry is wrapped by every EntryError caused by bytes that do not
// form a valid entry (bad checksum, truncated, impossible field values).
var ErrCorruptEntry = errors.New("corrupt log entry")

// ErrUnsupportedVersion is wrapped by an EntryError for an entry written by a
// newer (or foreign) encoder.
var ErrUnsupportedVersion = errors.New("unsupported log entry version")

// ErrInvalidEntry is wrapped by the error AppendBinary returns for an Entry
// that cannot be encoded (the caller built something the format forbids).
var ErrInvalidEntry = errors.New("invalid log entry")

// EntryError reports why an entry could not be decoded. Index is the Raft log
// index when known (DecodeEntry does not know it; the FSM fills it in).
type EntryError struct {
	Index  uint64
	Reason string
	Err    error // ErrCorruptEntry or ErrUnsupportedVersion
}

func (e *EntryError) Error() string {
	if e.Index != 0 {
		return fmt.Sprintf("replication: log entry %d: %v: %s", e.Index, e.Err, e.Reason)
	}
	return fmt.Sprintf("replication: log entry: %v: %s", e.Err, e.Reason)
}

func (e *EntryError) Unwrap() error { return e.Err }

func corrupt(format string, args ...any) error {
	return &EntryError{Reason: fmt.Sprintf(format, args...), Err: ErrCorruptEntry}
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("replication: encode entry: %w: %s", ErrInvalidEntry, fmt.Sprintf(format, args...))
}

// MarshalBinary encodes e. See AppendBinary.
func (e *Entry) MarshalBinary() ([]byte, error) {
	return e.AppendBinary(make([]byte, 0, e.encodedLen()))
}

func (e *Entry) encodedLen() int {
	return 1 + e.bareLen() + trailerLen
}

// bareLen is the length of e's encoding without version and checksum, as it
// is held inside a Batch.
func (e *Entry) bareLen() int {
	n := headerLen - 1
	switch e.Op {
	case OpWrite:
		n += 6 + 4 + 8 + len(e.Data)
	case OpSetState:
		n += 2 + len(e.State.Config) + 1 + 6*len(e.State.Masks) + 2 + 6*len(e.State.Reservations)
	case OpAddTarget, OpRemoveTarget:
		n += 8
	case OpBatch:
		n += 2
		for i := range e.Batch {
			n += 4 + e.Batch[i].bareLen()
		}
	}
	return n
}

// AppendBinary appends the encoding of e to b:
//
//	version(1) op(1) shelf(2, big endian) slot(1) body crc32c(4, over all before)
//
// Bodies: Write: src(6) tag(4) offset(8) data(rest); SetState: configLen(2)
// config nMasks(1) masks(6 each) nRes(2) reservations(6 each); AddTarget and
// RemoveTarget: size(8); Noop: empty; Batch (shelf and slot zero): n(2), then
// n times len(4) and an entry of len bytes without version and checksum
// (op shelf slot body; the Batch's version and checksum cover it). The
// encoding is canonical: one Entry has exactly one encoding at a version,
// which the fuzz test checks. (A version 1 Write, still decoded, has no src
// and tag; decoding and re-encoding it at version 1 gives the same bytes.)
func (e *Entry) AppendBinary(b []byte) ([]byte, error) {
	v := byte(entryVersionSingle)
	if e.Op == OpBatch {
		v = EntryVersion
	}
	return e.appendVersion(b, v)
}

// appendVersion encodes e at version v (what AppendBinary picks, or the
// legacy version for tests and the fuzz check of legacy input).
func (e *Entry) appendVersion(b []byte, v byte) ([]byte, error) {
	if err := e.validate(); err != nil {
		return b, err
	}
	switch {
	case v < entryVersionLegacy || v > EntryVersion:
		return b, invalid("unknown entry version %d", v)
	case v == entryVersionLegacy && e.Op == OpWrite && e.Request != (aoe.RequestID{}):
		return b, invalid("version %d write entries carry no request identity", v)
	case v < EntryVersion && e.Op == OpBatch:
		return b, invalid("version %d has no batch entries", v)
	}
	start := len(b)
	b = append(b, v)
	b = e.appendBare(b, v)
	return appendChecksum(b, start), nil
}

// appendChecksum appends the checksum of the entry encoded in b[start:].
func appendChecksum(b []byte, start int) []byte {
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(b[start:], castagnoli))
}

// appendMember appends the validated entry e as held inside a Batch: its
// length, then its encoding without version and checksum.
func appendMember(b []byte, e *Entry, v byte) []byte {
	at := len(b)
	b = append(b, 0, 0, 0, 0)
	b = e.appendBare(b, v)
	binary.BigEndian.PutUint32(b[at:], uint32(len(b)-at-4))
	return b
}

// appendBare appends op, shelf, slot and body of the validated entry e.
func (e *Entry) appendBare(b []byte, v byte) []byte {
	b = append(b, byte(e.Op))
	b = binary.BigEndian.AppendUint16(b, e.Target.Shelf)
	b = append(b, e.Target.Slot)
	switch e.Op {
	case OpWrite:
		if v != entryVersionLegacy {
			b = append(b, e.Request.Src[:]...)
			b = binary.BigEndian.AppendUint32(b, e.Request.Tag)
		}
		b = binary.BigEndian.AppendUint64(b, uint64(e.Offset))
		b = append(b, e.Data...)
	case OpSetState:
		b = appendState(b, e.State)
	case OpAddTarget, OpRemoveTarget:
		b = binary.BigEndian.AppendUint64(b, uint64(e.Size))
	case OpBatch:
		b = binary.BigEndian.AppendUint16(b, uint16(len(e.Batch)))
		for i := range e.Batch {
			b = appendMember(b, &e.Batch[i], v)
		}
	}
	return b
}

func (e *Entry) validate() error {
	switch e.Op {
	case OpWrite:
		if len(e.Data) == 0 || len(e.Data) > MaxWriteLen || len(e.Data)%SectorSize != 0 {
			return invalid("write of %d bytes (want 1..%d whole sectors)", len(e.Data), MaxWriteLen/SectorSize)
		}
		if e.Offset < 0 || e.Offset > maxImageSize || e.Offset%SectorSize != 0 {
			return invalid("write offset %d is not a non-negative multiple of %d", e.Offset, SectorSize)
		}
	case OpSetState:
		return validateState(e.State)
	case OpAddTarget, OpRemoveTarget:
		if e.Size <= 0 || e.Size > maxImageSize || e.Size%SectorSize != 0 {
			return invalid("target size %d is not a positive multiple of %d", e.Size, SectorSize)
		}
	case OpNoop:
	case OpBatch:
		if e.Target != (TargetID{}) {
			return invalid("batch entry names target %v (its entries name theirs)", e.Target)
		}
		if len(e.Batch) == 0 || len(e.Batch) > MaxBatch {
			return invalid("batch of %d entries (want 1..%d)", len(e.Batch), MaxBatch)
		}
		for i := range e.Batch {
			if e.Batch[i].Op == OpBatch {
				return invalid("batch entry %d is a batch", i)
			}
			if err := e.Batch[i].validate(); err != nil {
				return err
			}
		}
	default:
		return invalid("unknown op %d", uint8(e.Op))
	}
	if e.Op != OpBatch && e.Batch != nil {
		return invalid("%v entry carries a batch", e.Op)
	}
	return nil
}

func validateState(s aoe.TargetState) error {
	switch {
	case len(s.Config) > aoe.MaxConfigLen:
		return invalid("config string of %d bytes (max %d)", len(s.Config), aoe.MaxConfigLen)
	case len(s.Masks) > aoe.MaxMasks:
		return invalid("%d masks (max %d)", len(s.Masks), aoe.MaxMasks)
	case len(s.Reservations) > aoe.MaxReservations:
		return invalid("%d reservations (max %d)", len(s.Reservations), aoe.MaxReservations)
	}
	return nil
}

func appendState(b []byte, s aoe.TargetState) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s.Config)))
	b = append(b, s.Config...)
	b = append(b, byte(len(s.Masks)))
	for _, m := range s.Masks {
		b = append(b, m[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(s.Reservations)))
	for _, m := range s.Reservations {
		b = append(b, m[:]...)
	}
	return b
}

// DecodeEntry decodes one entry. It never panics on any input; every failure
// is an *EntryError. Data of a Write entry aliases b (no copy: the FSM writes
// it straight to the image).
func DecodeEntry(b []byte) (Entry, error) {
	var e Entry
	if len(b) < headerLen+trailerLen {
		return e, corrupt("%d bytes is shorter than the smallest entry (%d)", len(b), headerLen+trailerLen)
	}
	body, sum := b[:len(b)-trailerLen], binary.BigEndian.Uint32(b[len(b)-trailerLen:])
	if got := crc32.Checksum(body, castagnoli); got != sum {
		return e, corrupt("checksum mismatch (stored %08x, computed %08x)", sum, got)
	}
	version := body[0]
	if version < entryVersionLegacy || version > EntryVersion {
		return e, &EntryError{
			Reason: fmt.Sprintf("version %d, this node understands %d to %d: upgrade this node", version, entryVersionLegacy, EntryVersion),
			Err:    ErrUnsupportedVersion,
		}
	}
	return decodeBare(body[1:], version, true)
}

// decodeBare decodes op, shelf, slot and body (all of p) at version v; a Batch
// only where batchOK (not inside another).
func decodeBare(p []byte, v byte, batchOK bool) (Entry, error) {
	var e Entry
	if len(p) < headerLen-1 {
		return e, corrupt("%d bytes is shorter than an entry header (%d)", len(p), headerLen-1)
	}
	e.Op = Op(p[0])
	e.Target = TargetID{Shelf: binary.BigEndian.Uint16(p[1:3]), Slot: p[3]}
	p = p[headerLen-1:]
	switch e.Op {
	case OpWrite:
		if v != entryVersionLegacy {
			if len(p) < 10 {
				return Entry{}, corrupt("write entry truncated (%d body bytes)", len(p))
			}
			copy(e.Request.Src[:], p)
			e.Request.Tag = binary.BigEndian.Uint32(p[6:])
			p = p[10:]
		}
		if len(p) < 8 {
			return Entry{}, corrupt("write entry truncated (%d body bytes)", len(p))
		}
		off := binary.BigEndian.Uint64(p)
		e.Data = p[8:]
		if off > maxImageSize || off%SectorSize != 0 {
			return Entry{}, corrupt("write offset %d is not a sector offset", off)
		}
		e.Offset = int64(off)
		if len(e.Data) == 0 || len(e.Data) > MaxWriteLen || len(e.Data)%SectorSize != 0 {
			return Entry{}, corrupt("write of %d bytes is not 1..%d whole sectors", len(e.Data), MaxWriteLen/SectorSize)
		}
	case OpSetState:
		s, rest, err := decodeState(p)
		if err != nil {
			return Entry{}, err
		}
		if len(rest) != 0 {
			return Entry{}, corrupt("set-state entry has %d trailing bytes", len(rest))
		}
		e.State = s
	case OpAddTarget, OpRemoveTarget:
		if len(p) != 8 {
			return Entry{}, corrupt("%v entry body is %d bytes, want 8", e.Op, len(p))
		}
		size := binary.BigEndian.Uint64(p)
		if size == 0 || size > maxImageSize || size%SectorSize != 0 {
			return Entry{}, corrupt("target size %d is not a positive multiple of %d", size, SectorSize)
		}
		e.Size = int64(size)
	case OpNoop:
		if len(p) != 0 {
			return Entry{}, corrupt("noop entry carries %d body bytes", len(p))
		}
	case OpBatch:
		if !batchOK || v < EntryVersion {
			return Entry{}, corrupt("batch entry inside a batch or at version %d", v)
		}
		if e.Target != (TargetID{}) {
			return Entry{}, corrupt("batch entry names target %v", e.Target)
		}
		if len(p) < 2 {
			return Entry{}, corrupt("batch entry truncated (%d body bytes)", len(p))
		}
		n := int(binary.BigEndian.Uint16(p))
		p = p[2:]
		if n == 0 || n > MaxBatch {
			return Entry{}, corrupt("batch of %d entries (want 1..%d)", n, MaxBatch)
		}
		e.Batch = make([]Entry, n)
		for i := range e.Batch {
			if len(p) < 4 {
				return Entry{}, corrupt("batch entry %d of %d truncated", i, n)
			}
			l := binary.BigEndian.Uint32(p)
			p = p[4:]
			if uint64(l) > uint64(len(p)) {
				return Entry{}, corrupt("batch entry %d of %d claims %d bytes, %d left", i, n, l, len(p))
			}
			sub, err := decodeBare(p[:l], v, false)
			if err != nil {
				return Entry{}, err
			}
			e.Batch[i] = sub
			p = p[l:]
		}
		if len(p) != 0 {
			return Entry{}, corrupt("batch entry has %d trailing bytes", len(p))
		}
	default:
		return Entry{}, corrupt("unknown op %d", uint8(e.Op))
	}
	return e, nil
}

// decodeState decodes an encoded TargetState from the front of p and returns
// the bytes after it. The state is copied out of p so that it outlives the
// log buffer.
func decodeState(p []byte) (aoe.TargetState, []byte, error) {
	var s aoe.TargetState
	if len(p) < 2 {
		return s, nil, corrupt("state truncated before config length")
	}
	n := int(binary.BigEndian.Uint16(p))
	p = p[2:]
	if n > aoe.MaxConfigLen || len(p) < n {
		return s, nil, corrupt("config length %d (max %d, %d bytes left)", n, aoe.MaxConfigLen, len(p))
	}
	if n > 0 {
		s.Config = append([]byte(nil), p[:n]...)
	}
	p = p[n:]
	if len(p) < 1 {
		return s, nil, corrupt("state truncated before mask count")
	}
	n = int(p[0])
	p = p[1:]
	if n > aoe.MaxMasks || len(p) < 6*n {
		return s, nil, corrupt("mask count %d (max %d, %d bytes left)", n, aoe.MaxMasks, len(p))
	}
	s.Masks, p = decodeMACs(p, n)
	if len(p) < 2 {
		return s, nil, corrupt("state truncated before reservation count")
	}
	n = int(binary.BigEndian.Uint16(p))
	p = p[2:]
	if n > aoe.MaxReservations || len(p) < 6*n {
		return s, nil, corrupt("reservation count %d (max %d, %d bytes left)", n, aoe.MaxReservations, len(p))
	}
	s.Reservations, p = decodeMACs(p, n)
	return s, p, nil
}

func decodeMACs(p []byte, n int) ([]aoe.MAC, []byte) {
	if n == 0 {
		return nil, p
	}
	macs := make([]aoe.MAC, n)
	for i := range macs {
		copy(macs[i][:], p[6*i:])
	}
	return macs, p[6*n:]
}
