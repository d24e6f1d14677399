//! The `shoal-cni` binary: the program is [`shoal_cni::program::main`].

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    shoal_cni::program::main()
}
