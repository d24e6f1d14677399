//! The `shoal` CLI and agent, built as a binary of this package so the control netns test
//! can find it with `CARGO_BIN_EXE_netns-shoal` (a test cannot name another package's
//! binaries). It is exactly `shoal`: the whole program is `shoal_control::cli::main`.

fn main() -> std::process::ExitCode {
    shoal_control::cli::main()
}
