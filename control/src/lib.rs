//! shoal's control plane: the managers, the agent on every node, and the `shoal` CLI.
//!
//! `control/README.md` is the map: what each part owns and which way the arrows run. In
//! short, each part depends only on the ones below it:
//!
//! ```text
//! cli ─► agent ─► manager ─► store ─┐
//!  │       │         └─────► trust ─┼─► cluster ─► shoal-proto
//!  │       └───────────────► (store, trust, cluster)      ▲
//!  ├─► lab                                                 │
//!  └───────────────────────────────────────────────────────┘
//! ```
//!
//! - [`shoal_proto`] (re-exported as [`api`], [`id`], [`token`]): node IDs, tokens, the API
//!   messages and their framing, the cluster view as it travels. No TLS, store or data path.
//! - [`cluster`]: the cluster view in memory (node list, network keys, the ingress network)
//!   and the key schedule. Pure.
//! - [`trust`]: certificates and the pinned-CA and role checks ([`trust::tls`]), the join
//!   proofs ([`trust::join`]).
//! - [`store`]: the node's state dir (redb): its keys, incarnation, membership, and the
//!   manager's state, each as a versioned record.
//! - [`manager`]: the state machine ([`manager::state`], pure) and the API on 2377 (join,
//!   admin, watch, renewals, key rotation).
//! - [`agent`]: the daemon on every node: the local socket, the upstream watch stream, the
//!   manager role when it has one, gossip and data-path glue, capture, metrics.
//! - [`cli`]: the `shoal` program; [`lab`]: a cluster in network namespaces.

#![forbid(unsafe_code)]

pub use shoal_proto::{api, id, token};

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod lab;
pub mod manager;
pub mod store;
pub mod trust;
