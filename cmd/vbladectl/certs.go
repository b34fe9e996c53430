package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vblade-ha/vblade-ha/node"
)

// certsCommand is `vbladectl cluster certs`: it makes a cluster's TLS
// material offline (it talks to no node), so that mutual TLS, the default,
// costs the operator one command.
func certsCommand() *cli.Command {
	return &cli.Command{
		Name:      "certs",
		Usage:     "create a cluster CA, node certificates and a join token (offline)",
		ArgsUsage: " ",
		Description: "Writes into DIR: ca.crt (every node's tls_ca), ca.key (keep it off the nodes),\n" +
			"ID.crt and ID.key per node (its tls_cert and tls_key) and join-token (every node's\n" +
			"join_token_file). An existing CA and token in DIR are reused, so running it again with\n" +
			"new ids adds nodes; --force reissues existing node certificates (rotation: copy the new\n" +
			"files over the old ones, the nodes pick them up on the next connection).\n" +
			"Each certificate names its node id and the host in --hosts at the same position, which\n" +
			"must be the host of the node's raft_advertise (peers verify it); join several names\n" +
			"for one node with '+' (10.0.0.1+n1.example.org).",
		OnUsageError: usageError,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Required: true, Usage: "directory to write the files to (created 0700)"},
			&cli.StringFlag{Name: "nodes", Required: true, Usage: "comma-separated node ids (each node's node_id)"},
			&cli.StringFlag{Name: "hosts", Usage: "comma-separated raft_advertise hosts, one per node in --nodes order (default: the node id as a DNS name)"},
			&cli.StringFlag{Name: "cluster", Value: node.DefaultClusterName, Usage: "cluster name written into a new CA's subject"},
			&cli.DurationFlag{Name: "validity", Value: node.DefaultNodeValidity, Usage: "lifetime of the node certificates"},
			&cli.BoolFlag{Name: "force", Usage: "replace existing node certificates and keys (never the CA or the token)"},
		},
		Action: clusterCerts,
	}
}

func splitList(s string) []string {
	if strings.TrimSpace(s) == "" {
		return nil
	}
	parts := strings.Split(s, ",")
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
	}
	return parts
}

func clusterCerts(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	nodes, hosts := splitList(c.String("nodes")), splitList(c.String("hosts"))
	if len(hosts) > 0 && len(hosts) != len(nodes) {
		return usagef("--hosts has %d entries for %d nodes: give one per node, in the order of --nodes", len(hosts), len(nodes))
	}
	res, err := node.GenerateCerts(node.CertsOptions{
		Dir: c.String("dir"), Cluster: c.String("cluster"), Nodes: nodes, Hosts: hosts,
		NodeValidity: c.Duration("validity"), Force: c.Bool("force"),
	})
	if err != nil {
		return fail(err)
	}
	w := c.App.Writer
	if res.ReusedCA {
		fmt.Fprintln(w, "using the existing CA in", c.String("dir"))
	}
	if res.ReusedTok {
		fmt.Fprintln(w, "using the existing join token in", c.String("dir"))
	}
	for _, f := range res.Written {
		fmt.Fprintln(w, "wrote", f)
	}
	fmt.Fprintf(w, "\nOn each node ID set (and copy the files there; keep %s off the nodes):\n"+
		"  tls_cert = \"/etc/vblade/tls/ID.crt\"\n  tls_key = \"/etc/vblade/tls/ID.key\"\n"+
		"  tls_ca = \"/etc/vblade/tls/%s\"\n  join_token_file = \"/etc/vblade/tls/%s\"\n",
		node.CAKeyFile, node.CAFile, node.JoinTokenFile)
	return nil
}
