package main_test

// Test harness for the vblade integration tests: which target binaries to
// run (ours, built by the test, and Debian's /usr/sbin/vblade as reference),
// a LAN per test (internal/netlab), and a minimal raw-frame initiator on a
// root-namespace veth end built on the aoe codec.
//
// These tests need root (network namespaces, AF_PACKET); without it they
// skip loudly. CI runs them as root.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vblade-ha/vblade-ha/aoe"
	"github.com/vblade-ha/vblade-ha/internal/netlab"
)

// debianVblade is the reference implementation (Debian package vblade 25).
const debianVblade = "/usr/sbin/vblade"

// impl is one AoE target implementation under test.
type impl struct {
	name string
	bin  string
	ours bool
}

var (
	buildOnce sync.Once
	buildBin  string
	buildErr  error
	buildSkip string
	buildDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// ourVblade builds ./cmd/vblade (the package of this test) into a temporary
// directory once per test binary, so the test never runs a stale bin/vblade.
// Until the package has a main (it is written in parallel) our subtests skip.
func ourVblade(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		if v := os.Getenv("VBLADE_BIN"); v != "" { // test a prebuilt binary
			buildBin = v
			return
		}
		srcs, _ := filepath.Glob("*.go")
		hasMain := false
		for _, s := range srcs {
			if !strings.HasSuffix(s, "_test.go") {
				hasMain = true
			}
		}
		if !hasMain {
			buildSkip = "cmd/vblade has no non-test Go files yet: our vblade cannot be built"
			return
		}
		dir, err := os.MkdirTemp("", "vblade-it-")
		if err != nil {
			buildErr = err
			return
		}
		buildDir = dir
		out, err := exec.Command("go", "build", "-o", filepath.Join(dir, "vblade"), ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./cmd/vblade: %v\n%s", err, out)
			return
		}
		buildBin = filepath.Join(dir, "vblade")
	})
	if buildSkip != "" {
		t.Skip("SKIP: " + buildSkip)
	}
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildBin
}

// impls is the table every behaviour test runs over. Debian's vblade is
// skipped (loudly) when the package is not installed: `apt-get install
// vblade` (the CI script installs it).
func impls() []impl {
	return []impl{{name: "debian", bin: debianVblade}, {name: "ours", ours: true}}
}

func (im impl) binary(t testing.TB) string {
	t.Helper()
	if im.ours {
		return ourVblade(t)
	}
	if _, err := os.Stat(im.bin); err != nil {
		t.Skipf("SKIP: reference %s not installed (apt-get install vblade): %v", im.bin, err)
	}
	return im.bin
}

// forEachImpl runs f as a subtest per implementation.
func forEachImpl(t *testing.T, f func(t *testing.T, im impl)) {
	for _, im := range impls() {
		t.Run(im.name, func(t *testing.T) {
			netlab.RequireRoot(t)
			f(t, im)
		})
	}
}

// ---------------------------------------------------------------- fixture

// targetOpts configures one target run.
type targetOpts struct {
	MTU    int
	Size   int64    // image size in bytes (default 8 MiB)
	Args   []string // options before shelf slot netif file
	Shelf  uint16
	Slot   uint8
	Image  string // existing image; "" creates one of Size
	Hosts  int    // namespaces on the LAN (target in host 1); default 1
	NoWait bool   // do not wait for the announcement
}

type fixture struct {
	t     *testing.T
	im    impl
	lan   *netlab.LAN
	host  *netlab.Host
	cl    *client
	img   string
	cmd   *exec.Cmd
	opts  targetOpts
	tmac  aoe.MAC // target MAC
	sects int64
}

// newFixture builds a LAN (target namespace + a root-namespace port for the
// test's initiator), creates the image and starts the target.
func newFixture(t *testing.T, im impl, o targetOpts) *fixture {
	t.Helper()
	bin := im.binary(t)
	if o.MTU == 0 {
		o.MTU = 1500
	}
	if o.Size == 0 {
		o.Size = 8 << 20
	}
	if o.Shelf == 0 {
		o.Shelf = 1
	}
	if o.Hosts == 0 {
		o.Hosts = 1
	}
	lan := netlab.New(t, netlab.Options{Hosts: o.Hosts, RootPorts: 2, MTU: o.MTU})
	f := &fixture{t: t, im: im, lan: lan, host: lan.Host(1), opts: o, img: o.Image}
	copy(f.tmac[:], f.host.MAC)
	if f.img == "" {
		f.img = filepath.Join(t.TempDir(), "disk.img")
		if err := os.WriteFile(f.img, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(f.img, o.Size); err != nil {
			t.Fatal(err)
		}
	}
	f.sects = o.Size / 512
	f.cl = newClient(t, lan.Root[0].Name)
	f.start(bin)
	return f
}

// start runs the target and waits for its startup announcement (a Query
// Config response to broadcast), the sign that it serves.
func (f *fixture) start(bin string) {
	f.t.Helper()
	args := append([]string{bin}, f.opts.Args...)
	args = append(args, fmt.Sprint(f.opts.Shelf), fmt.Sprint(f.opts.Slot), f.host.If, f.img)
	f.cl.drain()
	f.cmd = f.lan.Start(f.host.NS, args...)
	if f.opts.NoWait {
		return
	}
	if _, ok := f.cl.waitAnnounce(f.opts.Shelf, f.opts.Slot, 5*time.Second); !ok {
		so, se := f.lan.Output(f.cmd)
		f.t.Fatalf("%s: no startup announcement within 5 s\nstdout: %s\nstderr: %s", f.im.name, so, se)
	}
	// vblade 25 prints "pid N: eS.L, N sectors O_RDWR" on stdout. It does
	// not flush when stdout is a file, so for Debian's binary the line
	// appears only at exit; ours must print it at once.
	if f.im.ours {
		re := regexp.MustCompile(fmt.Sprintf(`pid \d+: e%d\.%d, %d sectors`, f.opts.Shelf, f.opts.Slot, f.sects))
		if out, ok := f.lan.WaitOutput(f.cmd, re, 2*time.Second); !ok {
			f.t.Errorf("ours: startup line %q missing from stdout %q", re, out)
		}
	}
}

func (f *fixture) restart() {
	f.t.Helper()
	f.lan.Stop(f.cmd, 15)
	f.start(f.im.binary(f.t))
}

// ---------------------------------------------------------------- client

// client is a minimal AoE initiator on a raw socket: it sends one request
// and collects the responses carrying its tag. It is deliberately separate
// from aoe.Client so the tests also check the codec against a second,
// independent user.
type client struct {
	t    testing.TB
	conn *aoe.Conn
	mac  aoe.MAC
	tag  uint32
	rbuf []byte
	seen [][]byte // frames read but not matched (announcements etc.)
}

func newClient(t testing.TB, ifname string) *client {
	t.Helper()
	filter, err := aoe.ResponseFilter()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := aoe.Listen(ifname, aoe.ListenConfig{Filter: filter, ReadBuffer: 4 << 20})
	if err != nil {
		t.Fatalf("initiator socket on %s: %v", ifname, err)
	}
	t.Cleanup(func() { conn.Close() })
	return &client{t: t, conn: conn, mac: conn.MAC(), tag: 0x7e570000, rbuf: make([]byte, 65536)}
}

// nextTag returns a fresh tag; the high bit stays clear (the Linux driver's
// own tags have it set when they come from the kernel, which we avoid).
func (c *client) nextTag() uint32 { c.tag++; return c.tag }

func (c *client) hdr(dst aoe.MAC, shelf uint16, slot uint8, cmd aoe.Command) aoe.Header {
	return aoe.Header{Dst: dst, Src: c.mac, Version: aoe.Version, Shelf: shelf, Slot: slot, Command: cmd, Tag: c.nextTag()}
}

// send writes the frame, padded to the Ethernet minimum as a NIC would.
func (c *client) send(frame []byte) {
	c.t.Helper()
	if len(frame) < aoe.MinFrameLen {
		frame = append(frame, make([]byte, aoe.MinFrameLen-len(frame))...)
	}
	if err := c.conn.WriteFrame(frame); err != nil {
		c.t.Fatalf("send frame: %v", err)
	}
}

// sendRaw writes the frame exactly as given (no padding): for malformed
// frame tests.
func (c *client) sendRaw(frame []byte) {
	c.t.Helper()
	if err := c.conn.WriteFrame(frame); err != nil {
		c.t.Fatalf("send frame: %v", err)
	}
}

// collect reads responses with the given tag until the deadline; with
// first set it returns as soon as one arrives.
func (c *client) collect(tag uint32, timeout time.Duration, first bool) [][]byte {
	var got [][]byte
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		_ = c.conn.SetReadDeadline(deadline)
		n, err := c.conn.ReadFrame(c.rbuf)
		if err != nil {
			break
		}
		fr := bytes.Clone(c.rbuf[:n])
		var h aoe.Header
		if h.Unmarshal(fr) != nil {
			continue
		}
		if h.Tag != tag || h.Dst != c.mac {
			c.seen = append(c.seen, fr)
			continue
		}
		got = append(got, fr)
		if first {
			break
		}
	}
	return got
}

// do sends a request and returns the first response (nil on silence within
// timeout). It retransmits once: a veth does not drop frames, but a target
// may still be setting up its socket.
func (c *client) do(frame []byte, timeout time.Duration) []byte {
	c.t.Helper()
	var h aoe.Header
	if err := h.Unmarshal(frame); err != nil {
		c.t.Fatalf("bad request: %v", err)
	}
	for try := 0; try < 2; try++ {
		c.send(frame)
		c.seen = nil
		if r := c.collect(h.Tag, timeout/2, true); len(r) > 0 {
			return r[0]
		}
	}
	// Say what did arrive: a response with a wrong tag or address is a
	// different bug than silence.
	for _, fr := range c.seen {
		c.t.Logf("no answer to tag %#x; unmatched frame: % x", h.Tag, fr[:min(len(fr), 48)])
	}
	return nil
}

// silent sends a request and reports whether no response came within d.
func (c *client) silent(frame []byte, d time.Duration) (bool, []byte) {
	var h aoe.Header
	_ = h.Unmarshal(frame)
	c.send(frame)
	r := c.collect(h.Tag, d, true)
	if len(r) > 0 {
		return false, r[0]
	}
	return true, nil
}

func (c *client) drain() {
	_ = c.conn.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
	for {
		n, err := c.conn.ReadFrame(c.rbuf)
		if err != nil {
			break
		}
		c.seen = append(c.seen, bytes.Clone(c.rbuf[:n]))
	}
	c.seen = nil
}

// waitAnnounce waits for an unsolicited Query Config response from the
// given target (to broadcast, or to us when the target has a mask list).
func (c *client) waitAnnounce(shelf uint16, slot uint8, timeout time.Duration) ([]byte, bool) {
	check := func(fr []byte) bool {
		var m aoe.Config
		return m.Unmarshal(fr) == nil && m.Header.Command == aoe.CmdQueryConfig && m.IsResponse() &&
			m.Shelf == shelf && m.Slot == slot
	}
	for _, fr := range c.seen {
		if check(fr) {
			return fr, true
		}
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		_ = c.conn.SetReadDeadline(deadline)
		n, err := c.conn.ReadFrame(c.rbuf)
		if err != nil {
			break
		}
		fr := bytes.Clone(c.rbuf[:n])
		c.seen = append(c.seen, fr)
		if check(fr) {
			return fr, true
		}
	}
	return nil, false
}

// ---------------------------------------------------------------- requests

func (c *client) ataFrame(dst aoe.MAC, shelf uint16, slot uint8, aflags, cmd, scnt uint8, lba uint64, data []byte) []byte {
	m := aoe.ATA{Header: c.hdr(dst, shelf, slot, aoe.CmdATA), AFlags: aflags, SectorCount: scnt, CmdStatus: cmd, LBA: lba, Data: data}
	b := make([]byte, m.MarshalLen())
	if _, err := m.Marshal(b); err != nil {
		c.t.Fatal(err)
	}
	return b
}

func (c *client) cfgFrame(dst aoe.MAC, shelf uint16, slot uint8, sub aoe.ConfigCommand, s string) []byte {
	m := aoe.Config{Header: c.hdr(dst, shelf, slot, aoe.CmdQueryConfig), Command: sub, Config: []byte(s)}
	b := make([]byte, m.MarshalLen())
	if _, err := m.Marshal(b); err != nil {
		c.t.Fatal(err)
	}
	return b
}

func (c *client) maskFrame(dst aoe.MAC, shelf uint16, slot uint8, sub aoe.MaskCommand, dirs ...aoe.Directive) []byte {
	m := aoe.Mask{Header: c.hdr(dst, shelf, slot, aoe.CmdMaskList), Command: sub, Directives: dirs}
	b := make([]byte, m.MarshalLen())
	if _, err := m.Marshal(b); err != nil {
		c.t.Fatal(err)
	}
	return b
}

func (c *client) resFrame(dst aoe.MAC, shelf uint16, slot uint8, sub aoe.ReserveCommand, macs ...aoe.MAC) []byte {
	m := aoe.Reserve{Header: c.hdr(dst, shelf, slot, aoe.CmdReserve), Command: sub, MACs: macs}
	b := make([]byte, m.MarshalLen())
	if _, err := m.Marshal(b); err != nil {
		c.t.Fatal(err)
	}
	return b
}

// decodeATA decodes an ATA response or fails the test.
func decodeATA(t testing.TB, fr []byte) aoe.ATA {
	t.Helper()
	var m aoe.ATA
	if fr == nil {
		t.Fatalf("no response")
	}
	if err := m.Unmarshal(fr); err != nil {
		t.Fatalf("decode ATA response: %v", err)
	}
	return m
}

func decodeConfig(t testing.TB, fr []byte) aoe.Config {
	t.Helper()
	var m aoe.Config
	if fr == nil {
		t.Fatalf("no response")
	}
	if err := m.Unmarshal(fr); err != nil {
		t.Fatalf("decode config response: %v (% x)", err, fr[:min(len(fr), 64)])
	}
	return m
}

// identifyWords returns IDENTIFY data as little-endian 16-bit words.
func identifyWords(data []byte) []uint16 {
	w := make([]uint16, len(data)/2)
	for i := range w {
		w[i] = binary.LittleEndian.Uint16(data[2*i:])
	}
	return w
}

// pattern returns n sectors of data unique to (seed, lba) so a misplaced
// sector is detected, not only a wrong byte.
func pattern(seed byte, lba uint64, n int) []byte {
	b := make([]byte, n*512)
	for s := 0; s < n; s++ {
		for i := 0; i < 512; i += 8 {
			binary.LittleEndian.PutUint64(b[s*512+i:], (lba+uint64(s))<<16|uint64(seed)<<8|uint64(i/8))
		}
	}
	return b
}
