//! The `shoal` binary: everything is in `shoal_control::cli`.

fn main() -> std::process::ExitCode {
    shoal_control::cli::main()
}
