package aoe

import (
	"testing"

	"golang.org/x/net/bpf"
)

func TestTargetFilter(t *testing.T) {
	targets := []TargetAddr{{1, 0}, {1, 1}, {7, 3}}
	for _, loose := range []bool{false, true} {
		ts := targets
		if loose {
			for i := 0; i < 150; i++ {
				ts = append(ts, TargetAddr{uint16(100 + i), uint8(i)})
			}
		}
		raw, err := TargetFilter(ts)
		if err != nil {
			t.Fatal(err)
		}
		ins := make([]bpf.Instruction, len(raw))
		for i, r := range raw {
			ins[i] = r.Disassemble()
		}
		vm, err := bpf.NewVM(ins)
		if err != nil {
			t.Fatal(err)
		}
		frame := func(etype uint16, flags uint8, shelf uint16, slot uint8) []byte {
			b := make([]byte, 60)
			h := Header{Dst: BroadcastMAC, Version: 1, Flags: flags, Shelf: shelf, Slot: slot}
			if err := h.Marshal(b); err != nil {
				t.Fatal(err)
			}
			b[12], b[13] = byte(etype>>8), byte(etype)
			return b
		}
		cases := []struct {
			name string
			b    []byte
			want bool
		}{
			{"served", frame(EtherType, 0, 1, 1), true},
			{"served other", frame(EtherType, 0, 7, 3), true},
			{"broadcast", frame(EtherType, 0, 0xffff, 0xff), true},
			{"broadcast slot", frame(EtherType, 0, 1, 0xff), true},
			{"response", frame(EtherType, FlagResponse, 1, 1), false},
			{"ipv4", frame(0x0800, 0, 1, 1), false},
			{"other shelf", frame(EtherType, 0, 2, 1), loose},
			{"other slot", frame(EtherType, 0, 1, 9), loose},
		}
		for _, c := range cases {
			n, err := vm.Run(c.b)
			if err != nil {
				t.Fatal(err)
			}
			if got := n > 0; got != c.want {
				t.Errorf("loose=%v %s: accepted=%v, want %v", loose, c.name, got, c.want)
			}
		}
	}
}

func TestResponseFilter(t *testing.T) {
	raw, err := ResponseFilter()
	if err != nil {
		t.Fatal(err)
	}
	ins := make([]bpf.Instruction, len(raw))
	for i, r := range raw {
		ins[i] = r.Disassemble()
	}
	vm, _ := bpf.NewVM(ins)
	b := make([]byte, 60)
	h := Header{Flags: FlagResponse}
	h.Marshal(b)
	if n, _ := vm.Run(b); n == 0 {
		t.Error("response dropped")
	}
	h.Flags = 0
	h.Marshal(b)
	if n, _ := vm.Run(b); n != 0 {
		t.Error("request accepted")
	}
}
