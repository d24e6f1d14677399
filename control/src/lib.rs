//! shoal's control plane: the manager's state and its API on 2377, join tokens, node
//! identity, the agent daemon and the `shoal` CLI.
//!
//! What it does: `shoal init` makes a cluster CA, join tokens and network keys; `shoal join`
//! pins the manager's CA from the token before it sends the secret, and keeps what the
//! manager issues (node ID, certificate, node list, keys) in the state dir; the agent keeps
//! a watch stream to the manager so node-list and key changes reach every node; the CLI talks
//! to the local agent over a Unix socket, with docker swarm's words and output shapes.
//!
//! It also runs this node's data path ([`datapath`], on `shoal-ingress`), lets `shoal
//! capture` copy its packets ([`capture`]), and exports Prometheus metrics ([`metrics`]).
//!
//! What it does not do: no Raft yet (one leader; promoted managers forward to it, and nodes
//! join through the leader's address), no overlay networks beyond `ingress`.
//!
//! The state machine ([`state`]), the token format ([`token`]), node IDs ([`id`]) and the
//! gossip keyring schedule ([`gossip::keyring_at`]) are pure: no IO, no clock, no
//! randomness. [`store`], [`tls`], [`manager`], [`agent`] and [`gossip`] (the one seam to
//! `shoal-gossip`) do IO; [`cli`] is the `shoal` program.

#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod capture;
pub mod cli;
pub mod datapath;
pub mod gossip;
pub mod id;
pub mod join;
pub mod lab;
pub mod local;
pub mod manager;
pub mod metrics;
pub mod state;
pub mod store;
pub mod tls;
pub mod token;
