package faults

// Checker of the fault suite: every block is a register; its history must be
// linearizable (porcupine), a write whose outcome is unknown may or may not
// have happened, and the final read-back must show, for every block, the
// last acknowledged write or a later one.

import (
	"fmt"
	"math"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

type regInput struct {
	write bool
	value uint64
}

var registerModel = porcupine.Model{
	Init: func() any { return uint64(0) },
	Step: func(state, input, output any) (bool, any) {
		in := input.(regInput)
		if in.write {
			return true, in.value
		}
		return output.(uint64) == state.(uint64), state
	},
	Equal: func(a, b any) bool { return a.(uint64) == b.(uint64) },
	DescribeOperation: func(input, output any) string {
		in := input.(regInput)
		if in.write {
			return fmt.Sprintf("write %d", in.value)
		}
		return "read " + valueString(output.(uint64))
	},
	DescribeState: func(s any) string { return valueString(s.(uint64)) },
}

func valueString(v uint64) string {
	switch v {
	case 0:
		return "initial(zeros)"
	case garbageValue:
		return "GARBAGE"
	}
	return fmt.Sprint(v)
}

type blockResult struct {
	block  int
	result porcupine.CheckResult
	info   porcupine.LinearizationInfo
	ops    []porcupine.Operation
	src    []op // the ops checked, index-aligned with ops
	// breakAt is the call time of the first operation the longest partial
	// linearization could not take: where the history goes wrong.
	breakAt int64
}

type checkReport struct {
	ops, acked, unknown, failed int
	ackedWrites                 int
	linearizable                string // yes, NO, unknown (checker timed out)
	bad                         []blockResult
	lost                        []string // lost acknowledged writes, described
	anomalies                   []string // minimal descriptions of non-linearizable reads
}

// toPorcupine turns one block's history into porcupine operations: failed
// reads say nothing and are dropped; an unknown write never returns (it may
// take effect at any time after its call, or never); an unknown write no read
// observed is dropped (linearizing it last, after every read, is always
// possible, so dropping it changes nothing and keeps the search small).
func toPorcupine(hist []op) ([]porcupine.Operation, []op) {
	observed := map[uint64]bool{}
	for _, o := range hist {
		if !o.Write && o.Outcome == okOutcome {
			observed[o.Value] = true
		}
	}
	var pops []porcupine.Operation
	var src []op
	for _, o := range hist {
		var p porcupine.Operation
		switch {
		case o.Write && o.Outcome == okOutcome:
			p = porcupine.Operation{ClientId: o.Client, Input: regInput{true, o.Value}, Call: o.Call, Output: uint64(0), Return: o.Return}
		case o.Write:
			if !observed[o.Value] {
				continue
			}
			p = porcupine.Operation{ClientId: o.Client, Input: regInput{true, o.Value}, Call: o.Call, Output: uint64(0), Return: math.MaxInt64}
		case o.Outcome == okOutcome:
			p = porcupine.Operation{ClientId: o.Client, Input: regInput{false, 0}, Call: o.Call, Output: o.Value, Return: o.Return}
		default:
			continue
		}
		pops = append(pops, p)
		src = append(src, o)
	}
	return pops, src
}

// check runs the whole checker. final holds the read-back ops (also part of
// hist).
func check(hist []op, final []op, timeout time.Duration) checkReport {
	var rep checkReport
	byBlock := map[int][]op{}
	for _, o := range hist {
		rep.ops++
		switch o.Outcome {
		case okOutcome:
			rep.acked++
			if o.Write {
				rep.ackedWrites++
			}
		case unknownOutcome:
			rep.unknown++
		default:
			rep.failed++
		}
		byBlock[o.Block] = append(byBlock[o.Block], o)
	}
	blocks := make([]int, 0, len(byBlock))
	for b := range byBlock {
		blocks = append(blocks, b)
	}
	sort.Ints(blocks)
	rep.linearizable = "yes"
	for _, b := range blocks {
		pops, src := toPorcupine(byBlock[b])
		res, info := porcupine.CheckOperationsVerbose(registerModel, pops, timeout)
		switch res {
		case porcupine.Illegal:
			rep.linearizable = "NO"
			rep.bad = append(rep.bad, blockResult{block: b, result: res, info: info, ops: pops, src: src, breakAt: breakPoint(info, pops)})
			rep.anomalies = append(rep.anomalies, explain(b, byBlock[b])...)
		case porcupine.Unknown:
			if rep.linearizable == "yes" {
				rep.linearizable = "unknown (checker timed out)"
			}
		}
	}
	rep.lost = lostWrites(byBlock, final)
	return rep
}

// lostWrites: the final read of each block must return a write w such that no
// acknowledged write to that block was invoked after w returned (that write
// would be later in every linearization, so the final value would have to be
// it or a later one).
func lostWrites(byBlock map[int][]op, final []op) []string {
	var lost []string
	for _, f := range final {
		if f.Outcome != okOutcome {
			lost = append(lost, fmt.Sprintf("block %d: final read-back failed (%s): cannot show its acknowledged writes", f.Block, f.Err))
			continue
		}
		var w *op
		for i := range byBlock[f.Block] {
			o := &byBlock[f.Block][i]
			if o.Write && o.Value == f.Value {
				w = o
			}
		}
		var after []op
		for _, o := range byBlock[f.Block] {
			if !o.Write || o.Outcome != okOutcome || o.Value == f.Value {
				continue
			}
			switch {
			case f.Value == garbageValue, f.Value == 0:
				after = append(after, o)
			case w != nil && w.Outcome == okOutcome && o.Call > w.Return:
				// An unknown write may have landed at any time after
				// its call, so nothing is provably after it.
				after = append(after, o)
			}
		}
		if f.Value != 0 && f.Value != garbageValue && w == nil {
			lost = append(lost, fmt.Sprintf("block %d: final value %d was never written", f.Block, f.Value))
			continue
		}
		if len(after) > 0 {
			last := after[len(after)-1]
			lost = append(lost, fmt.Sprintf("block %d: final read-back shows %s, but %d acknowledged write(s) came after it, the last: value %d by client %d [%s .. %s]",
				f.Block, valueString(f.Value), len(after), last.Value, last.Client, ms(last.Call), ms(last.Return)))
		}
	}
	return lost
}

// explain finds the simplest witnesses of a non-linearizable block history:
// a read of a value nobody wrote, a read of a write invoked after the read
// returned, or a stale read (the value read was overwritten by an
// acknowledged write that completed before the read began).
func explain(block int, hist []op) []string {
	byVal := map[uint64]op{}
	for _, o := range hist {
		if o.Write {
			byVal[o.Value] = o
		}
	}
	var out []string
	for _, r := range hist {
		if r.Write || r.Outcome != okOutcome {
			continue
		}
		if r.Value == garbageValue {
			out = append(out, fmt.Sprintf("block %d: read by client %d [%s .. %s] returned content no write carries", block, r.Client, ms(r.Call), ms(r.Return)))
			continue
		}
		w, ok := byVal[r.Value]
		if r.Value != 0 && !ok {
			out = append(out, fmt.Sprintf("block %d: read [%s .. %s] returned value %d that was never written", block, ms(r.Call), ms(r.Return), r.Value))
			continue
		}
		if ok && w.Call > r.Return {
			out = append(out, fmt.Sprintf("block %d: read [%s .. %s] returned value %d, written by a write invoked later [%s ..]", block, ms(r.Call), ms(r.Return), r.Value, ms(w.Call)))
			continue
		}
		wret := int64(-1) // the initial value "returned" before everything
		if ok {
			wret = w.Return
			if w.Outcome != okOutcome {
				wret = w.Call // an unknown write may have happened as early as its call
			}
		}
		for _, o := range hist {
			if o.Write && o.Outcome == okOutcome && o.Call > wret && o.Return < r.Call && o.Value != r.Value {
				out = append(out, fmt.Sprintf("block %d: STALE READ: client %d read %s [%s .. %s], but write %d by client %d was acknowledged [%s .. %s] after that value was written (write of it [%s .. %s])",
					block, r.Client, valueString(r.Value), ms(r.Call), ms(r.Return), o.Value, o.Client, ms(o.Call), ms(o.Return), ms(max(w.Call, 0)), ms(wret)))
				break
			}
		}
		if len(out) >= 5 {
			break
		}
	}
	out = append(out, resurrections(block, hist, byVal)...)
	if len(out) == 0 {
		out = append(out, fmt.Sprintf("block %d: no single stale read explains it (see the porcupine visualisation)", block))
	}
	return out
}

func ms(ns int64) string {
	if ns == math.MaxInt64 {
		return "never"
	}
	return fmt.Sprintf("%.3fs", float64(ns)/1e9)
}

// visualize writes porcupine's HTML for each bad block into dir.
func visualize(t *testing.T, rep checkReport, dir string) []string {
	var files []string
	for _, b := range rep.bad {
		p := filepath.Join(dir, fmt.Sprintf("block-%d-linearizability.html", b.block))
		if err := porcupine.VisualizePath(registerModel, b.info, p); err != nil {
			t.Logf("porcupine visualisation of block %d: %v", b.block, err)
			continue
		}
		files = append(files, p)
	}
	return files
}

// historyExcerpt prints the ops of block around time at (±window).
func historyExcerpt(hist []op, block int, at int64, window time.Duration) string {
	var lines []string
	for _, o := range hist {
		if o.Block != block || o.Return < at-int64(window) || o.Call > at+int64(window) {
			continue
		}
		kind := "read "
		if o.Write {
			kind = "write"
		}
		lines = append(lines, fmt.Sprintf("  client %2d %s %-16s [%s .. %s] %s %s", o.Client, kind, valueString(o.Value), ms(o.Call), ms(o.Return), o.Outcome, o.Err))
	}
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}

// breakPoint is the call time of the earliest operation outside the longest
// partial linearization porcupine found.
func breakPoint(info porcupine.LinearizationInfo, pops []porcupine.Operation) int64 {
	var best []int
	for _, part := range info.PartialLinearizations() {
		for _, lin := range part {
			if len(lin) > len(best) {
				best = lin
			}
		}
	}
	in := make(map[int]bool, len(best))
	for _, i := range best {
		in[i] = true
	}
	at := int64(math.MaxInt64)
	for i, p := range pops {
		if !in[i] && p.Call < at {
			at = p.Call
		}
	}
	if at == math.MaxInt64 && len(pops) > 0 {
		at = pops[len(pops)/2].Call
	}
	return at
}

// resurrections finds values that come back: every write carries a unique
// value, so once a read that began after write w returned has seen another
// value, no later read may see w's value again (w would have taken effect
// after it was acknowledged, or twice).
func resurrections(block int, hist []op, byVal map[uint64]op) []string {
	var reads []op
	for _, o := range hist {
		if !o.Write && o.Outcome == okOutcome {
			reads = append(reads, o)
		}
	}
	sort.Slice(reads, func(i, j int) bool { return reads[i].Call < reads[j].Call })
	var out []string
	seen := map[uint64]bool{}
	for i, r1 := range reads {
		w, ok := byVal[r1.Value]
		if !ok || seen[r1.Value] {
			continue
		}
		// r0: a read of another value that began after w returned (or,
		// for w read before, after that read ended).
		for j := i + 1; j < len(reads) && len(out) < 5; j++ {
			r2 := reads[j]
			if r2.Value == r1.Value || r2.Call <= r1.Return {
				continue
			}
			for k := j + 1; k < len(reads); k++ {
				r3 := reads[k]
				if r3.Value == r1.Value && r3.Call > r2.Return {
					out = append(out, fmt.Sprintf("block %d: value %d CAME BACK: write %d by client %d [%s .. %s %s] was read at [%s .. %s], then value %s by client %d at [%s .. %s], then %d again by client %d at [%s .. %s]: the write took effect twice (a retransmitted copy applied again after later writes)",
						block, r1.Value, w.Value, w.Client, ms(w.Call), ms(w.Return), w.Outcome, ms(r1.Call), ms(r1.Return), valueString(r2.Value), r2.Client, ms(r2.Call), ms(r2.Return), r1.Value, r3.Client, ms(r3.Call), ms(r3.Return)))
					seen[r1.Value] = true
					break
				}
			}
			break
		}
	}
	// A write observed taking effect after it was acknowledged: a read
	// that began after w returned saw another value, and a later read saw w.
	for _, w := range byVal {
		if w.Outcome != okOutcome || seen[w.Value] || len(out) >= 8 {
			continue
		}
		for j, r2 := range reads {
			if r2.Call <= w.Return || r2.Value == w.Value {
				continue
			}
			for _, r3 := range reads[j+1:] {
				if r3.Value == w.Value && r3.Call > r2.Return {
					out = append(out, fmt.Sprintf("block %d: write %d by client %d was acknowledged at %s, a read at [%s .. %s] then saw %s, and a later read at [%s .. %s] saw %d: the write took effect after its acknowledgement (a retransmitted copy applied late)",
						block, w.Value, w.Client, ms(w.Return), ms(r2.Call), ms(r2.Return), valueString(r2.Value), ms(r3.Call), ms(r3.Return), w.Value))
					seen[w.Value] = true
					break
				}
			}
			break
		}
	}
	return out
}
