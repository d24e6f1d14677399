//! The `shoal` binary: everything is in `shoal_control::cli`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    shoal_control::cli::main()
}
