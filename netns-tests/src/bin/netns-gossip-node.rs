//! The `gossip-node` program (see `shoal_gossip::node`), built as a binary of this package
//! so that its integration tests can find it with `env!("CARGO_BIN_EXE_netns-gossip-node")`:
//! cargo only builds and locates binaries of the package under test.

fn main() -> std::process::ExitCode {
    shoal_gossip::node::main()
}
