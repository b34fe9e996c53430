package faults

import (
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// TestChecker proves the checker catches what it is for: a stale read, a
// lost acknowledged write, garbage; and accepts unknown writes that did or
// did not happen. Needs no root.
func TestChecker(t *testing.T) {
	s := int64(time.Second)
	w := func(c, b int, v uint64, call, ret int64, oc outcome) op {
		return op{Client: c, Block: b, Write: true, Value: v, Call: call * s, Return: ret * s, Outcome: oc}
	}
	rd := func(c, b int, v uint64, call, ret int64) op {
		return op{Client: c, Block: b, Value: v, Call: call * s, Return: ret * s, Outcome: okOutcome}
	}
	ok := []op{
		w(1, 0, 1, 0, 1, okOutcome), rd(2, 0, 1, 2, 3),
		w(1, 0, 2, 4, 6, okOutcome), rd(2, 0, 1, 4, 5), // concurrent with the write: old value is fine
		w(1, 0, 3, 7, 8, unknownOutcome), rd(2, 0, 2, 9, 10), // unknown write not seen yet
		rd(2, 0, 3, 11, 12),              // ... and now seen: it happened
		w(1, 1, 9, 0, 1, unknownOutcome), // never seen: never happened
	}
	final := []op{rd(1000, 0, 3, 20, 21), rd(1000, 1, 0, 20, 21)}
	rep := check(append(ok, final...), final, 10*time.Second)
	if rep.linearizable != "yes" || len(rep.lost) != 0 {
		t.Fatalf("valid history judged %s, lost %v, anomalies %v", rep.linearizable, rep.lost, rep.anomalies)
	}

	stale := append(append([]op(nil), ok...), rd(2, 0, 1, 13, 14))
	rep = check(stale, nil, 10*time.Second)
	if rep.linearizable != "NO" || len(rep.anomalies) == 0 || !strings.Contains(rep.anomalies[0], "STALE READ") {
		t.Fatalf("stale read not caught: %s %v", rep.linearizable, rep.anomalies)
	}

	lostFinal := []op{rd(1000, 0, 2, 20, 21)} // write 3 was seen, but 2 was acked before ... 3 unknown: not lost
	rep = check(append(ok[:4], lostFinal...), lostFinal, 10*time.Second)
	if len(rep.lost) != 0 {
		t.Fatalf("no write lost, but: %v", rep.lost)
	}
	lostFinal = []op{rd(1000, 0, 1, 20, 21)}
	rep = check(append(ok[:4], lostFinal...), lostFinal, 10*time.Second)
	if len(rep.lost) != 1 || rep.linearizable != "NO" {
		t.Fatalf("lost write 2 not caught: %v %s", rep.lost, rep.linearizable)
	}
	garbage := []op{rd(1000, 0, garbageValue, 20, 21)}
	rep = check(append(ok[:2], garbage...), garbage, 10*time.Second)
	if len(rep.lost) != 1 || rep.linearizable != "NO" {
		t.Fatalf("garbage not caught: %v %s", rep.lost, rep.linearizable)
	}

	// Encoding round trip.
	b := make([]byte, blockSz)
	for i := 0; i < 100; i++ {
		v := rand.Uint64N(1 << 50)
		encode(b, 7, v)
		if decode(b, 7) != v || decode(b, 8) != garbageValue {
			t.Fatalf("encode/decode of %d", v)
		}
	}
	if decode(make([]byte, blockSz), 3) != 0 {
		t.Fatal("zeros are not the initial value")
	}
}
