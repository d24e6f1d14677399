//! The `shoal-cni` plugin, built as a binary of this package so the networks netns test can
//! find it with `CARGO_BIN_EXE_netns-shoal-cni`. It is exactly `shoal-cni`.

fn main() -> std::process::ExitCode {
    shoal_cni::program::main()
}
