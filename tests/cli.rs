//! The command line's own documentation: every option has a help line, every command's
//! `--help` ends with examples, the README's command table lists every option, and the
//! completions and man pages committed under `contrib/` match the clap definitions.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

#[allow(dead_code)]
#[path = "../examples/generate-docs.rs"]
mod generate_docs;

use generate_docs::cli::Cli;

const REGENERATE: &str = "cargo run --release --example generate-docs -- contrib";

/// The visible subcommands (clap's own `help` is left out: it documents itself).
fn subcommands() -> Vec<clap::Command> {
    let mut cmd = Cli::command();
    cmd.build();
    cmd.get_subcommands()
        .filter(|c| !c.is_hide_set() && c.get_name() != "help")
        .cloned()
        .collect()
}

#[test]
fn every_argument_has_help_and_every_command_examples() {
    let mut bad = Vec::new();
    let mut top = Cli::command();
    top.build();
    let commands = std::iter::once(top).chain(subcommands());
    for cmd in commands {
        let name = cmd.get_name().to_string();
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if arg
                .get_help()
                .is_none_or(|h| h.to_string().trim().is_empty())
            {
                bad.push(format!(
                    "{name}: argument '{}' has no help line",
                    arg.get_id()
                ));
            }
        }
        let after = cmd
            .get_after_help()
            .map(|h| h.to_string())
            .unwrap_or_default();
        let examples = after
            .lines()
            .skip_while(|l| *l != "Examples:")
            .skip(1)
            .take_while(|l| l.starts_with("  cowimg "))
            .count();
        if !(2..=3).contains(&examples) {
            bad.push(format!(
                "{name}: --help should end with 'Examples:' and two or three '  cowimg ...' lines, found {examples}"
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Splits a Markdown table row into option-like words (`-f`, `--backing-chain`, ...).
fn words(row: &str) -> BTreeSet<String> {
    row.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with('-'))
        .map(str::to_string)
        .collect()
}

#[test]
fn readme_command_table_lists_every_option() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let mut bad = Vec::new();
    for cmd in subcommands() {
        let name = cmd.get_name();
        let prefix = format!("| `cowimg {name} ");
        let Some(row) = readme.lines().find(|l| l.starts_with(&prefix)) else {
            bad.push(format!("README.md has no command-table row for '{name}'"));
            continue;
        };
        // Only the synopsis (first cell) counts: the description may mention other flags.
        let synopsis = row.split(" | ").next().unwrap_or(row);
        let listed = words(synopsis);
        for arg in cmd.get_arguments() {
            // Global options (--ca-file) are listed once, under the table.
            if arg.is_positional()
                || arg.is_hide_set()
                || arg.is_global_set()
                || arg.get_id() == "help"
            {
                continue;
            }
            let spellings: Vec<String> = arg
                .get_short()
                .map(|s| format!("-{s}"))
                .into_iter()
                .chain(arg.get_long().map(|l| format!("--{l}")))
                .collect();
            if !spellings.iter().any(|s| listed.contains(s)) {
                bad.push(format!(
                    "README.md's row for '{name}' does not list {}",
                    spellings.join("/")
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for sub in ["completions", "man"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            for e in entries.flatten() {
                out.insert(Path::new(sub).join(e.file_name()));
            }
        }
    }
    out
}

#[test]
fn committed_completions_and_man_pages_are_current() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh: BTreeSet<PathBuf> = generate_docs::write_all(tmp.path())
        .expect("generating into a temporary directory")
        .into_iter()
        .collect();
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let committed = files_under(&contrib);
    let mut stale = Vec::new();
    for f in fresh.union(&committed) {
        let want = std::fs::read(tmp.path().join(f)).ok();
        let have = std::fs::read(contrib.join(f)).ok();
        match (want, have) {
            (Some(_), None) => stale.push(format!("contrib/{} is missing", f.display())),
            (None, Some(_)) => stale.push(format!(
                "contrib/{} is no longer generated (delete it)",
                f.display()
            )),
            (Some(w), Some(h)) if w != h => {
                stale.push(format!("contrib/{} is out of date", f.display()))
            }
            _ => {}
        }
    }
    assert!(
        stale.is_empty(),
        "{}\nThe completions and man pages come from the clap definitions in src/cli_args.rs: run\n  {REGENERATE}\nand commit contrib/.",
        stale.join("\n")
    );
}

/// The README and docs link only files of the repository (a clone has nothing beside it).
#[test]
fn docs_link_only_files_in_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .expect("repository root");
    let mut pages = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "md") {
            pages.push(e.path());
        }
    }
    let mut bad = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("readable page");
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            let file = target.split('#').next().unwrap_or("");
            if file.is_empty() || file.contains("://") || file.starts_with("mailto:") {
                continue;
            }
            let resolved = page.parent().unwrap_or(&root).join(file);
            let inside = resolved.canonicalize().is_ok_and(|p| p.starts_with(&root));
            if !inside {
                bad.push(format!(
                    "{}: link '{target}' is not a file of the repository",
                    page.strip_prefix(&root).unwrap_or(page).display()
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
