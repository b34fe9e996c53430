// Package aoe implements ATA over Ethernet (AoE protocol revision 11): the wire
// format, the ATA emulation of a target, the frame path over raw Ethernet
// sockets, and an initiator used by tools and tests.
//
// The codec works on whole Ethernet frames (destination, source, ethertype,
// then the AoE header) because that is what an AF_PACKET raw socket reads and
// writes. Decoding never allocates for ATA and Query Config messages, whose
// payload slices alias the frame buffer: they are on the hot path.
package aoe

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// EtherType is the AoE ethertype.
const EtherType = 0x88A2

// Version is the AoE protocol version this package speaks.
const Version = 1

// Frame layout sizes in bytes, counted from the start of the Ethernet frame.
const (
	EthernetHeaderLen = 14
	HeaderLen         = EthernetHeaderLen + 10 // Ethernet + AoE common header
	ATAHeaderLen      = HeaderLen + 12         // ... + ATA header; data follows
	ConfigHeaderLen   = HeaderLen + 8          // ... + Query Config header; config string follows
	MaskHeaderLen     = HeaderLen + 4          // ... + Mac Mask List header; directives follow
	ReserveHeaderLen  = HeaderLen + 2          // ... + Reserve/Release header; MACs follow
	MinFrameLen       = 60                     // Ethernet minimum without FCS
	SectorSize        = 512
)

// Broadcast shelf and slot: a request to them addresses every target.
const (
	BroadcastShelf uint16 = 0xffff
	BroadcastSlot  uint8  = 0xff
)

// BroadcastMAC is the Ethernet broadcast address.
var BroadcastMAC = MAC{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// Header flag bits (low nibble of the version/flags byte).
const (
	FlagResponse = 0x08
	FlagError    = 0x04
)

// Command is the AoE command code.
type Command uint8

// AoE commands.
const (
	CmdATA         Command = 0
	CmdQueryConfig Command = 1
	CmdMaskList    Command = 2
	CmdReserve     Command = 3
)

func (c Command) String() string {
	switch c {
	case CmdATA:
		return "ATA"
	case CmdQueryConfig:
		return "QueryConfig"
	case CmdMaskList:
		return "MacMaskList"
	case CmdReserve:
		return "ReserveRelease"
	}
	return fmt.Sprintf("Command(%d)", uint8(c))
}

// ErrorCode is the AoE error field of a response with FlagError set.
type ErrorCode uint8

// AoE error codes.
const (
	ErrCodeBadCommand     ErrorCode = 1 // unrecognized command code
	ErrCodeBadArg         ErrorCode = 2 // bad argument parameter
	ErrCodeUnavailable    ErrorCode = 3 // device unavailable
	ErrCodeConfigSet      ErrorCode = 4 // config string present
	ErrCodeBadVersion     ErrorCode = 5 // unsupported version
	ErrCodeTargetReserved ErrorCode = 6 // target is reserved
)

func (e ErrorCode) String() string {
	switch e {
	case 0:
		return "none"
	case ErrCodeBadCommand:
		return "unrecognized command"
	case ErrCodeBadArg:
		return "bad argument"
	case ErrCodeUnavailable:
		return "device unavailable"
	case ErrCodeConfigSet:
		return "config string present"
	case ErrCodeBadVersion:
		return "unsupported version"
	case ErrCodeTargetReserved:
		return "target is reserved"
	}
	return fmt.Sprintf("error %d", uint8(e))
}

// ProtocolError is an AoE error response, as the initiator sees it.
type ProtocolError struct {
	Command Command
	Code    ErrorCode
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("aoe: %s: target answered error %d (%s)", e.Command, uint8(e.Code), e.Code)
}

// Decoding errors. They are values so callers can test with errors.Is.
var (
	ErrShortFrame   = errors.New("aoe: frame too short")
	ErrNotAoE       = errors.New("aoe: not an AoE frame")
	ErrBufferSmall  = errors.New("aoe: buffer too small")
	ErrConfigLength = errors.New("aoe: config string length exceeds frame or 1024 bytes")
	ErrTooManyMACs  = errors.New("aoe: MAC count exceeds frame")
)

// Header is the Ethernet and AoE common header.
type Header struct {
	Dst, Src MAC
	Version  uint8 // high nibble of the version/flags byte
	Flags    uint8 // FlagResponse | FlagError
	Error    ErrorCode
	Shelf    uint16 // "major"
	Slot     uint8  // "minor"
	Command  Command
	Tag      uint32
}

// IsResponse reports whether the response flag is set.
func (h *Header) IsResponse() bool { return h.Flags&FlagResponse != 0 }

// IsError reports whether the error flag is set.
func (h *Header) IsError() bool { return h.Flags&FlagError != 0 }

// Unmarshal decodes the header at the start of frame b.
func (h *Header) Unmarshal(b []byte) error {
	if len(b) < HeaderLen {
		return ErrShortFrame
	}
	if binary.BigEndian.Uint16(b[12:14]) != EtherType {
		return ErrNotAoE
	}
	copy(h.Dst[:], b[0:6])
	copy(h.Src[:], b[6:12])
	h.Version = b[14] >> 4
	h.Flags = b[14] & 0x0f
	h.Error = ErrorCode(b[15])
	h.Shelf = binary.BigEndian.Uint16(b[16:18])
	h.Slot = b[18]
	h.Command = Command(b[19])
	h.Tag = binary.BigEndian.Uint32(b[20:24])
	return nil
}

// Marshal encodes h into the first HeaderLen bytes of b.
func (h *Header) Marshal(b []byte) error {
	if len(b) < HeaderLen {
		return ErrBufferSmall
	}
	copy(b[0:6], h.Dst[:])
	copy(b[6:12], h.Src[:])
	binary.BigEndian.PutUint16(b[12:14], EtherType)
	b[14] = h.Version<<4 | h.Flags&0x0f
	b[15] = byte(h.Error)
	binary.BigEndian.PutUint16(b[16:18], h.Shelf)
	b[18] = h.Slot
	b[19] = byte(h.Command)
	binary.BigEndian.PutUint32(b[20:24], h.Tag)
	return nil
}

// ATA flag bits (the AFlags byte).
const (
	ATAFlagWrite    = 0x01
	ATAFlagAsync    = 0x02
	ATAFlagDevice   = 0x10
	ATAFlagExtended = 0x40 // LBA48
)

// ATA command and status codes the emulation knows.
const (
	ATACmdReadSectors      = 0x20
	ATACmdReadSectorsExt   = 0x24
	ATACmdWriteSectors     = 0x30
	ATACmdWriteSectorsExt  = 0x34
	ATACmdCheckPowerMode   = 0xe5
	ATACmdFlushCache       = 0xe7
	ATACmdFlushCacheExt    = 0xea
	ATACmdIdentify         = 0xec
	ATAStatusError         = 0x01 // ERR
	ATAStatusDataRequest   = 0x08 // DRQ
	ATAStatusDeviceFault   = 0x20 // DF
	ATAStatusReady         = 0x40 // DRDY
	ATAStatusBusy          = 0x80 // BSY
	ATAErrAbort            = 0x04 // ABRT
	ATAErrIDNotFound       = 0x10 // IDNF
	ATAErrUncorrectable    = 0x40 // UNC
	ATAStatusErrorMaskLinx = 0xa9 // BSY|DF|DRQ|ERR: what the Linux driver treats as failure
)

// ATA is an ATA request or response: the ATA header after the common header,
// and the data that follows it. Data aliases the frame buffer.
type ATA struct {
	Header
	AFlags      uint8
	ErrFeature  uint8 // feature on request, error register on response
	SectorCount uint8
	CmdStatus   uint8 // command on request, status on response
	LBA         uint64
	Data        []byte
}

// Unmarshal decodes an ATA message from frame b without copying its data.
func (m *ATA) Unmarshal(b []byte) error {
	if err := m.Header.Unmarshal(b); err != nil {
		return err
	}
	if len(b) < ATAHeaderLen {
		return ErrShortFrame
	}
	m.AFlags = b[24]
	m.ErrFeature = b[25]
	m.SectorCount = b[26]
	m.CmdStatus = b[27]
	m.LBA = getLBA(b[28:34])
	m.Data = b[ATAHeaderLen:]
	return nil
}

// MarshalLen is the frame length Marshal writes.
func (m *ATA) MarshalLen() int { return ATAHeaderLen + len(m.Data) }

// Marshal encodes m into b and returns the number of bytes written. When Data
// already aliases b[ATAHeaderLen:] the copy is skipped.
func (m *ATA) Marshal(b []byte) (int, error) {
	n := m.MarshalLen()
	if len(b) < n {
		return 0, ErrBufferSmall
	}
	if err := m.Header.Marshal(b); err != nil {
		return 0, err
	}
	m.marshalATAHeader(b)
	if len(m.Data) > 0 && &m.Data[0] != &b[ATAHeaderLen] {
		copy(b[ATAHeaderLen:], m.Data)
	}
	return n, nil
}

func (m *ATA) marshalATAHeader(b []byte) {
	b[24] = m.AFlags
	b[25] = m.ErrFeature
	b[26] = m.SectorCount
	b[27] = m.CmdStatus
	putLBA(b[28:34], m.LBA)
	b[34], b[35] = 0, 0
}

func getLBA(p []byte) uint64 {
	var v uint64
	for i := 0; i < 6; i++ {
		v |= uint64(p[i]) << (8 * i)
	}
	return v
}

func putLBA(p []byte, v uint64) {
	for i := 0; i < 6; i++ {
		p[i] = byte(v >> (8 * i))
	}
}

// ConfigCommand is the Query Config sub-command.
type ConfigCommand uint8

// Query Config sub-commands.
const (
	ConfigRead      ConfigCommand = 0 // read the config string
	ConfigTest      ConfigCommand = 1 // answer only if the string matches exactly
	ConfigPrefix    ConfigCommand = 2 // answer only if the string is a prefix
	ConfigSet       ConfigCommand = 3 // set if empty (or equal), else error ConfigSet
	ConfigForceSet  ConfigCommand = 4 // set unconditionally
	configLastValid               = ConfigForceSet
)

// Config is a Query Config request or response. Config aliases the frame.
type Config struct {
	Header
	BufferCount     uint16
	FirmwareVersion uint16
	SectorCount     uint8 // max sectors per ATA command (r11)
	AoEVersion      uint8
	Command         ConfigCommand
	Config          []byte
}

// Unmarshal decodes a Query Config message from frame b. The declared config
// string length must fit both the frame and MaxConfigLen.
func (m *Config) Unmarshal(b []byte) error {
	if err := m.Header.Unmarshal(b); err != nil {
		return err
	}
	if len(b) < ConfigHeaderLen {
		return ErrShortFrame
	}
	m.BufferCount = binary.BigEndian.Uint16(b[24:26])
	m.FirmwareVersion = binary.BigEndian.Uint16(b[26:28])
	m.SectorCount = b[28]
	m.AoEVersion = b[29] >> 4
	m.Command = ConfigCommand(b[29] & 0x0f)
	n := int(binary.BigEndian.Uint16(b[30:32]))
	if n > MaxConfigLen || ConfigHeaderLen+n > len(b) {
		return ErrConfigLength
	}
	m.Config = b[ConfigHeaderLen : ConfigHeaderLen+n]
	return nil
}

// MarshalLen is the frame length Marshal writes.
func (m *Config) MarshalLen() int { return ConfigHeaderLen + len(m.Config) }

// Marshal encodes m into b and returns the number of bytes written.
func (m *Config) Marshal(b []byte) (int, error) {
	if len(m.Config) > MaxConfigLen {
		return 0, ErrConfigLength
	}
	n := m.MarshalLen()
	if len(b) < n {
		return 0, ErrBufferSmall
	}
	if err := m.Header.Marshal(b); err != nil {
		return 0, err
	}
	binary.BigEndian.PutUint16(b[24:26], m.BufferCount)
	binary.BigEndian.PutUint16(b[26:28], m.FirmwareVersion)
	b[28] = m.SectorCount
	b[29] = m.AoEVersion<<4 | byte(m.Command)&0x0f
	binary.BigEndian.PutUint16(b[30:32], uint16(len(m.Config)))
	copy(b[ConfigHeaderLen:], m.Config)
	return n, nil
}

// MaskCommand is the Mac Mask List sub-command.
type MaskCommand uint8

// Mac Mask List sub-commands.
const (
	MaskRead MaskCommand = 0
	MaskEdit MaskCommand = 1
)

// MaskError is the Mac Mask List error field.
type MaskError uint8

// Mac Mask List errors.
const (
	MaskErrUnspecified  MaskError = 1
	MaskErrBadDirective MaskError = 2
	MaskErrListFull     MaskError = 3
)

// DirectiveCommand is a mask directive's command.
type DirectiveCommand uint8

// Mask directive commands.
const (
	DirNone   DirectiveCommand = 0
	DirAdd    DirectiveCommand = 1
	DirDelete DirectiveCommand = 2
)

// Directive is one Mac Mask List directive.
type Directive struct {
	Command DirectiveCommand
	MAC     MAC
}

const directiveLen = 8

// Mask is a Mac Mask List request or response.
type Mask struct {
	Header
	Command    MaskCommand
	MaskError  MaskError
	Directives []Directive
}

// Unmarshal decodes a Mac Mask List message from frame b.
func (m *Mask) Unmarshal(b []byte) error {
	if err := m.Header.Unmarshal(b); err != nil {
		return err
	}
	if len(b) < MaskHeaderLen {
		return ErrShortFrame
	}
	m.Command = MaskCommand(b[25])
	m.MaskError = MaskError(b[26])
	n := int(b[27])
	if MaskHeaderLen+n*directiveLen > len(b) {
		return ErrTooManyMACs
	}
	m.Directives = m.Directives[:0]
	for i := 0; i < n; i++ {
		p := b[MaskHeaderLen+i*directiveLen:]
		var d Directive
		d.Command = DirectiveCommand(p[1])
		copy(d.MAC[:], p[2:8])
		m.Directives = append(m.Directives, d)
	}
	return nil
}

// MarshalLen is the frame length Marshal writes.
func (m *Mask) MarshalLen() int { return MaskHeaderLen + len(m.Directives)*directiveLen }

// Marshal encodes m into b and returns the number of bytes written.
func (m *Mask) Marshal(b []byte) (int, error) {
	if len(m.Directives) > 255 {
		return 0, ErrTooManyMACs
	}
	n := m.MarshalLen()
	if len(b) < n {
		return 0, ErrBufferSmall
	}
	if err := m.Header.Marshal(b); err != nil {
		return 0, err
	}
	b[24] = 0
	b[25] = byte(m.Command)
	b[26] = byte(m.MaskError)
	b[27] = byte(len(m.Directives))
	for i, d := range m.Directives {
		p := b[MaskHeaderLen+i*directiveLen:]
		p[0] = 0
		p[1] = byte(d.Command)
		copy(p[2:8], d.MAC[:])
	}
	return n, nil
}

// ReserveCommand is the Reserve/Release sub-command.
type ReserveCommand uint8

// Reserve/Release sub-commands.
const (
	ReserveRead     ReserveCommand = 0
	ReserveSet      ReserveCommand = 1
	ReserveForceSet ReserveCommand = 2
)

// Reserve is a Reserve/Release request or response.
type Reserve struct {
	Header
	Command ReserveCommand
	MACs    []MAC
}

// Unmarshal decodes a Reserve/Release message from frame b.
func (m *Reserve) Unmarshal(b []byte) error {
	if err := m.Header.Unmarshal(b); err != nil {
		return err
	}
	if len(b) < ReserveHeaderLen {
		return ErrShortFrame
	}
	m.Command = ReserveCommand(b[24])
	n := int(b[25])
	if ReserveHeaderLen+n*6 > len(b) {
		return ErrTooManyMACs
	}
	m.MACs = m.MACs[:0]
	for i := 0; i < n; i++ {
		var mac MAC
		copy(mac[:], b[ReserveHeaderLen+i*6:])
		m.MACs = append(m.MACs, mac)
	}
	return nil
}

// MarshalLen is the frame length Marshal writes.
func (m *Reserve) MarshalLen() int { return ReserveHeaderLen + len(m.MACs)*6 }

// Marshal encodes m into b and returns the number of bytes written.
func (m *Reserve) Marshal(b []byte) (int, error) {
	if len(m.MACs) > 255 {
		return 0, ErrTooManyMACs
	}
	n := m.MarshalLen()
	if len(b) < n {
		return 0, ErrBufferSmall
	}
	if err := m.Header.Marshal(b); err != nil {
		return 0, err
	}
	b[24] = byte(m.Command)
	b[25] = byte(len(m.MACs))
	for i, mac := range m.MACs {
		copy(b[ReserveHeaderLen+i*6:], mac[:])
	}
	return n, nil
}

// SectorsPerFrame is the largest ATA sector count a frame of the given MTU
// carries: the MTU less the AoE and ATA headers, in whole sectors. vblade
// subtracts the Ethernet header too ((MTU-36)/512); so do we, so the two agree
// on every MTU (1500 gives 2, 9000 gives 17).
func SectorsPerFrame(mtu int) int {
	n := (mtu - ATAHeaderLen) / SectorSize
	if n < 1 {
		return 1
	}
	if n > 255 {
		return 255
	}
	return n
}
