//! `gossip-node`: one gossip agent, membership events as JSON lines (see
//! `shoal_gossip::node`).

fn main() -> std::process::ExitCode {
    shoal_gossip::node::main()
}
