//! Writes the package's shell completions and man pages, generated from the CLI definition
//! (`shoal_control::cli::Cli`), into a directory: `scripts/package.sh` runs it before
//! `cargo deb`, and `control/tests/package.rs` checks what it writes against `shoal --help`.
//!
//! ```text
//! cargo run -p shoal-control --example gen-docs -- DIR
//! DIR/completions/{shoal.bash,_shoal,shoal.fish}
//! DIR/man/shoal.1, DIR/man/shoal-agent.1, DIR/man/shoal-node-ls.1, ...   (one per subcommand)
//! ```

use std::path::Path;

use clap::CommandFactory as _;
use clap_complete::Shell;

/// Writes `completions/` and `man/` under `dir`.
pub fn generate(dir: &Path) -> std::io::Result<()> {
    let completions = dir.join("completions");
    let man = dir.join("man");
    std::fs::create_dir_all(&completions)?;
    std::fs::create_dir_all(&man)?;
    let mut cmd = shoal_control::cli::Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "shoal", &completions)?;
    }
    // One page per command and subcommand, named as git and docker name theirs:
    // shoal.1, shoal-node.1, shoal-node-ls.1, ...
    cmd.build();
    man_pages(&cmd, &man)
}

/// The page of `cmd` and of each of its subcommands but `help` (clap's own, which `-h`
/// and `--help` already cover) and hidden ones.
fn man_pages(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands() {
        if !sub.is_hide_set() && sub.get_name() != "help" {
            man_pages(sub, dir)?;
        }
    }
    clap_mangen::Man::new(cmd.clone())
        .source(format!("shoal {}", env!("CARGO_PKG_VERSION")))
        .manual("shoal manual")
        .generate_to(dir)?;
    Ok(())
}

#[allow(dead_code)] // the test includes this file for `generate` alone
fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: gen-docs DIR");
        return std::process::ExitCode::from(2);
    };
    match generate(Path::new(&dir)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-docs: {}: {e}", Path::new(&dir).display());
            std::process::ExitCode::FAILURE
        }
    }
}
