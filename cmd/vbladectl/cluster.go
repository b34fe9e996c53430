package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/vblade-ha/vblade-ha/node"
)

// clusterCommand is `vbladectl cluster ...`: it talks to the local node's
// admin socket; the node does the cluster work.
func clusterCommand() *cli.Command {
	socket := func() cli.Flag {
		return &cli.StringFlag{Name: "socket", Value: node.DefaultAdminSocket, Usage: "admin socket of the local `vblade node` (its admin_socket)"}
	}
	sub := func(name, usage, args string, action cli.ActionFunc, flags ...cli.Flag) *cli.Command {
		return &cli.Command{
			Name:         name,
			Usage:        usage,
			ArgsUsage:    args,
			Flags:        append([]cli.Flag{socket()}, flags...),
			OnUsageError: usageError,
			Action:       action,
		}
	}
	verify := sub("verify", "compare every node's image checksums with the leader's", " ", clusterVerify)
	verify.Description = "The leader takes a barrier, then every node hashes its images once it has applied\n" +
		"the leader's index. Under heavy write load nodes may hash at different points; verify\n" +
		"retries a few times by itself and reports the result as inconclusive (exit 1) if the\n" +
		"applied index kept moving: run it again when the load is lower."
	return &cli.Command{
		Name:  "cluster",
		Usage: "form and inspect a vblade-ha cluster through the local node",
		Subcommands: []*cli.Command{
			sub("init", "start a new cluster with this node as its only member", " ", clusterInit),
			sub("join", "join the cluster of the member at ADDR (its raft_addr); streams the image with progress", "ADDR", clusterJoin,
				&cli.DurationFlag{Name: "timeout", Value: time.Hour, Usage: "give up waiting for the node to catch up after this long"}),
			sub("leave", "remove this node from its cluster (hands leadership over first)", " ", clusterLeave),
			sub("transfer", "hand leadership to another node (planned switchover)", " ", clusterTransfer,
				&cli.StringFlag{Name: "to", Usage: "node id to hand leadership to (default: the most up-to-date node)"}),
			sub("status", "show every node's role, term, indexes and lag, and who serves which target", " ", clusterStatus,
				&cli.BoolFlag{Name: "json", Usage: "print JSON"}),
			verify,
			certsCommand(),
		},
	}
}

// clusterCtx is cancelled by SIGINT/SIGTERM so a long join or verify can be
// interrupted cleanly.
func clusterCtx(c *cli.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
}

func noArgs(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return usagef("%s takes no arguments (got %q)", c.Command.FullName(), c.Args().First())
	}
	return nil
}

// fail turns an error from the node into exit code 1; the node's messages
// already say what to do.
func fail(err error) error {
	return cli.Exit(err.Error(), exitFail)
}

func clusterInit(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	ctx, cancel := clusterCtx(c)
	defer cancel()
	cl := node.NewAdminClient(c.String("socket"))
	if err := cl.Init(ctx); err != nil {
		return fail(err)
	}
	s, err := cl.Status(ctx)
	if err != nil {
		return fail(err)
	}
	fmt.Fprintf(c.App.Writer, "cluster initialised with node %s (%s) as its only member.\n", s.ID, s.Address)
	fmt.Fprintf(c.App.Writer, "add nodes by running on each: vbladectl cluster join %s\n", s.Address)
	return nil
}

func clusterJoin(c *cli.Context) error {
	if c.Args().Len() != 1 {
		return usagef("cluster join needs exactly one argument: ADDR, the raft_addr of any member")
	}
	addr := c.Args().First()
	ctx, cancel := clusterCtx(c)
	defer cancel()
	ctx, tcancel := context.WithTimeout(ctx, c.Duration("timeout"))
	defer tcancel()
	cl := node.NewAdminClient(c.String("socket"))
	res, err := cl.Join(ctx, addr)
	if err != nil {
		return fail(err)
	}
	out := c.App.Writer
	if res.AlreadyMember {
		fmt.Fprintf(out, "already a member (leader %s at %s); waiting until caught up\n", res.LeaderID, res.LeaderAddress)
	} else {
		fmt.Fprintf(out, "added by leader %s at %s; receiving the image and the log up to index %d\n", res.LeaderID, res.LeaderAddress, res.CommitIndex)
	}
	p := newJoinProgress(c.App.ErrWriter)
	s, err := cl.WaitCaughtUp(ctx, res.CommitIndex, 200*time.Millisecond, p.update)
	p.finish()
	if err != nil {
		return fail(fmt.Errorf("%w: the node stays a member and keeps catching up; watch it with `vbladectl cluster status`", err))
	}
	fmt.Fprintf(out, "node %s caught up (applied index %d) and is a voter\n", s.ID, s.AppliedIndex)
	return nil
}

// joinProgress draws the image transfer from the joining node's status.
type joinProgress struct {
	w      io.Writer
	bar    *progressbar.ProgressBar
	failed string
}

func newJoinProgress(w io.Writer) *joinProgress { return &joinProgress{w: w} }

func (p *joinProgress) update(s *node.NodeStatus) {
	t := s.Transfer
	if t == nil || t.Direction != "receiving" || t.Total <= 0 {
		return
	}
	if p.bar == nil {
		visible := false
		if f, ok := p.w.(*os.File); ok {
			visible = term.IsTerminal(int(f.Fd()))
		}
		p.bar = progressbar.NewOptions64(t.Total,
			progressbar.OptionSetWriter(p.w),
			progressbar.OptionSetDescription("image"),
			progressbar.OptionShowBytes(true),
			progressbar.OptionShowCount(),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionShowElapsedTimeOnFinish(),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionSetVisibility(visible),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(p.w) }),
		)
		if !visible {
			fmt.Fprintf(p.w, "receiving the full image: %d bytes\n", t.Total)
		}
	}
	if t.Error != "" && t.Error != p.failed {
		// Raft retries a failed install; say so and keep waiting.
		p.failed = t.Error
		fmt.Fprintf(p.w, "\nimage transfer failed (%s); the leader retries it\n", t.Error)
	}
	p.bar.ChangeMax64(t.Total)
	_ = p.bar.Set64(t.Bytes)
}

func (p *joinProgress) finish() {
	if p.bar != nil && !p.bar.IsFinished() {
		_ = p.bar.Exit()
	}
}

func clusterLeave(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	ctx, cancel := clusterCtx(c)
	defer cancel()
	cl := node.NewAdminClient(c.String("socket"))
	if err := cl.Leave(ctx); err != nil {
		return fail(err)
	}
	fmt.Fprintln(c.App.Writer, "this node left the cluster. Stop it now; before reusing it, remove its data_dir (it holds the old cluster's state).")
	return nil
}

func clusterTransfer(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	ctx, cancel := clusterCtx(c)
	defer cancel()
	cl := node.NewAdminClient(c.String("socket"))
	res, err := cl.Transfer(ctx, c.String("to"))
	if err != nil {
		return fail(err)
	}
	fmt.Fprintf(c.App.Writer, "leadership moved to %s (%s)\n", res.LeaderID, res.LeaderAddress)
	return nil
}

func clusterStatus(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	ctx, cancel := clusterCtx(c)
	defer cancel()
	ctx, tcancel := context.WithTimeout(ctx, 15*time.Second)
	defer tcancel()
	cs, err := node.NewAdminClient(c.String("socket")).Cluster(ctx)
	if err != nil {
		return fail(err)
	}
	out := c.App.Writer
	if c.Bool("json") {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(cs); err != nil {
			return fail(fmt.Errorf("write JSON: %w", err))
		}
		return nil
	}
	writeClusterStatus(out, cs)
	return nil
}

// writeClusterStatus prints the two tables: nodes, then targets.
func writeClusterStatus(out io.Writer, cs *node.ClusterStatus) {
	if !cs.InCluster {
		fmt.Fprintln(out, cs.Message)
		return
	}
	leader := cs.Leader
	if leader == "" {
		leader = "(none)"
	}
	fmt.Fprintf(out, "leader: %s  term: %d  commit: %d\n\n", leader, cs.Term, cs.CommitIndex)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tADDRESS\tROLE\tTERM\tCOMMIT\tAPPLIED\tLAG\t")
	num := func(ok bool, v uint64) string {
		if !ok {
			return "-"
		}
		return strconv.FormatUint(v, 10)
	}
	for _, m := range cs.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", m.ID, m.Address, m.Role,
			num(m.Reachable, m.Term), num(m.Reachable, m.CommitIndex), num(m.Reachable, m.AppliedIndex), num(m.Reachable && cs.CommitIndex > 0, m.Lag))
	}
	tw.Flush()
	for _, m := range cs.Nodes {
		switch {
		case !m.Reachable:
			fmt.Fprintf(out, "  %s: %s\n", m.ID, m.Error)
		case m.FatalError != "":
			fmt.Fprintf(out, "  %s: STOPPED: %s\n", m.ID, m.FatalError)
		case m.Transfer != nil && !m.Transfer.Done:
			fmt.Fprintf(out, "  %s: image transfer (%s) %d of %d bytes\n", m.ID, m.Transfer.Direction, m.Transfer.Bytes, m.Transfer.Total)
		}
	}
	fmt.Fprintln(out)
	tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TARGET\tSIZE\tSERVED BY\tMAC\tNETIF\t")
	for _, t := range cs.Targets {
		by := t.Node
		if by == "" {
			by = "(nobody)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t\n", t.Target, t.Size, by, t.MAC, t.Netif)
	}
	tw.Flush()
	if cs.Message != "" {
		fmt.Fprintf(out, "\nnote: %s\n", cs.Message)
	}
}

func clusterVerify(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	ctx, cancel := clusterCtx(c)
	defer cancel()
	v, err := node.NewAdminClient(c.String("socket")).Verify(ctx)
	if err != nil {
		return fail(err)
	}
	out := c.App.Writer
	fmt.Fprintf(out, "leader %s, index %d, %d attempt(s)\n", v.Leader, v.Index, v.Attempts)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tTARGET\tSHA256\tRESULT\t")
	for _, nd := range v.Nodes {
		if nd.Error != "" {
			fmt.Fprintf(tw, "%s\t-\t-\tERROR: %s\t\n", nd.ID, nd.Error)
			continue
		}
		for _, t := range nd.Targets {
			r := "match"
			if !t.Match {
				r = "MISMATCH"
			}
			sum := t.SHA256
			if len(sum) > 16 {
				sum = sum[:16]
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\n", nd.ID, t.Target, sum, r)
		}
	}
	tw.Flush()
	switch {
	case v.OK:
		fmt.Fprintln(out, "all images match")
		return nil
	case v.Inconclusive:
		return cli.Exit("verify inconclusive: "+v.Message, exitFail)
	}
	return cli.Exit("images differ (or a node could not be checked): see the table above; a node with a MISMATCH needs a fresh image: `vbladectl cluster leave` on it, remove its data_dir, and join it again", exitFail)
}
