//! Writes cowimg's shell completions (bash, zsh, fish) and man pages (`cowimg.1` and one per
//! subcommand) generated from the clap definitions in `src/cli_args.rs` (through `src/main.rs`):
//!
//! ```sh
//! cargo run --release --example generate-docs -- contrib
//! ```
//!
//! The results are committed under `contrib/`; `tests/cli.rs` regenerates them into a
//! temporary directory and fails when they differ, so they never go stale.

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

// The definitions stay in the binary (where the commands are dispatched); this file and the
// tests include it as a module to reach them.
#[allow(dead_code)]
#[path = "../src/main.rs"]
pub mod cli;

/// Writes `completions/` and `man/` under `out`; returns the files written, relative to `out`.
pub fn write_all(out: &Path) -> io::Result<Vec<PathBuf>> {
    let completions = out.join("completions");
    let man = out.join("man");
    std::fs::create_dir_all(&completions)?;
    std::fs::create_dir_all(&man)?;
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = cli::Cli::command();
        let path = clap_complete::generate_to(shell, &mut cmd, "cowimg", &completions)?;
        written.push(path);
    }
    clap_mangen::generate_to(cli::Cli::command(), &man)?;
    for entry in std::fs::read_dir(&man)? {
        written.push(entry?.path());
    }
    let mut written: Vec<PathBuf> = written
        .into_iter()
        .filter_map(|p| p.strip_prefix(out).ok().map(Path::to_path_buf))
        .collect();
    written.sort();
    Ok(written)
}

fn main() -> io::Result<()> {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: cargo run --release --example generate-docs -- DIR   (the repository's is contrib)");
        std::process::exit(1);
    };
    for path in write_all(Path::new(&out))? {
        println!("{}", Path::new(&out).join(path).display());
    }
    Ok(())
}
