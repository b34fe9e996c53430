package storage

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// loopDevice attaches img to a free loop device and detaches it after the
// test, or skips the test saying why it cannot.
func loopDevice(t *testing.T, img string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPING block device test: needs root to attach a loop device")
	}
	losetup, err := exec.LookPath("losetup")
	if err != nil {
		t.Skipf("SKIPPING block device test: %v", err)
	}
	out, err := exec.Command(losetup, "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Skipf("SKIPPING block device test: losetup --find --show %s: %v: %s", img, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command(losetup, "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

func TestBlockDevice(t *testing.T) {
	const size = 4 << 20
	orig := pattern(size, 0x11)
	img := writeFile(t, t.TempDir(), "loop.img", orig)
	dev := loopDevice(t, img)

	f := mustOpen(t, dev, Options{ReadOnly: true})
	if f.Size() != size {
		t.Fatalf("%s: Size() = %d, want %d (BLKGETSIZE64)", dev, f.Size(), size)
	}
	got := make([]byte, size)
	if err := f.ReadAt(bg, got, 0); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "loop device contents", got, orig)

	g := mustOpen(t, dev, Options{Offset: 1 << 20, Length: 1 << 20})
	if g.Size() != 1<<20 {
		t.Fatalf("Size() with offset and length = %d", g.Size())
	}
	w := pattern(8192, 0x77)
	if err := g.WriteAt(bg, w, 4096); err != nil {
		t.Fatal(err)
	}
	if err := g.Flush(bg); err != nil {
		t.Fatal(err)
	}
	copy(orig[1<<20+4096:], w)
	disk, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "backing file after write and flush through the device", disk, orig)

	d := mustOpen(t, dev, Options{Direct: true, Sync: true})
	t.Logf("%s: O_DIRECT memory alignment %d, offset alignment %d", dev, d.dio.memAlign, d.dio.offAlign)
	for _, c := range []struct {
		off int64
		n   int
		mis int
	}{{0, 4096, 0}, {512, 1024, 1}, {3000, 100, 0}} {
		b := AlignedBuffer(c.n + c.mis)[c.mis:]
		copy(b, pattern(c.n, byte(c.off)))
		if err := d.WriteAt(bg, b, c.off); err != nil {
			t.Fatal(err)
		}
		r := AlignedBuffer(c.n)
		if err := d.ReadAt(bg, r, c.off); err != nil {
			t.Fatal(err)
		}
		mustEqual(t, "direct on block device", r, b)
	}

	for _, c := range []struct {
		opt  Options
		want string
	}{
		{Options{Offset: size}, "offset 4194304 too large for file size 4194304"},
		{Options{Offset: 512, Length: size}, "length 4194304 exceeds size of file"},
	} {
		if _, err := Open(dev, c.opt); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Open(%s, %+v): %v, want %q", dev, c.opt, err, c.want)
		}
	}
}
