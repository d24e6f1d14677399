//! Who is who: the certificates a manager issues and the checks that bind a connection to a
//! node ID and a role ([`tls`]), and the proofs a joining node sends ([`join`]).

pub mod join;
pub mod tls;
