//! shoal's control plane: the manager's state and its API on 2377, join tokens, node
//! identity, the agent daemon and the `shoal` CLI.
//!
//! What it does: `shoal init` makes a cluster CA, join tokens and network keys; `shoal join`
//! pins the manager's CA from the token before it sends the secret, and keeps what the
//! manager issues (node ID, certificate, node list, keys) in the state dir; the agent keeps
//! a watch stream to the manager so node-list and key changes reach every node; the CLI talks
//! to the local agent over a Unix socket, with docker swarm's words and output shapes.
//!
//! What it does not do: no Raft yet (one leader; promoted managers forward to it), no data
//! path (that is `shoal-vxlan`), no overlay networks beyond their definition.
//!
//! The state machine ([`state`]), the token format ([`token`]) and node IDs ([`id`]) are
//! pure: no IO, no clock, no randomness. [`store`], [`tls`], [`manager`] and [`agent`] do IO.

#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod cli;
pub mod gossip;
pub mod id;
pub mod manager;
pub mod state;
pub mod store;
pub mod tls;
pub mod token;
