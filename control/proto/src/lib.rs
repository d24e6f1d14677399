//! shoal's control protocol: what the CLI, the agent, the managers (and, next, the CNI plugin)
//! say to each other, and nothing else.
//!
//! - [`id`]: node IDs (docker's 25-character base 36).
//! - [`token`]: join tokens, `SWMTKN-1-<CA digest>-<secret>`.
//! - [`api`]: the messages of the agent's local socket and of the manager API on 2377, and
//!   their framing (a length, then JSON). `docs/api.md` is the reference.
//! - [`view`]: the cluster view as it travels from a manager to the nodes (versioned), and
//!   the shared words (role, availability, live keys).
//! - [`claim`]: what a joining node claims; the proofs are made and checked by the control
//!   plane, which holds the crypto.
//!
//! No TLS, no store, no data path in here: a client of the agent's socket depends on this
//! crate alone.

#![forbid(unsafe_code)]

pub mod api;
pub mod claim;
pub mod id;
pub mod publish;
pub mod token;
pub mod view;
