//! `cowimg snapshot`: list (`-l`), create (`-c`), apply (`-a`) and delete (`-d`) a qcow2
//! image's internal snapshots, with qemu-img snapshot's options, messages and exit codes. The
//! changes themselves (crash-safe, refcounts exact) are the formats crate's.

use cowimg_formats::{Details, Format};

use cowimg::chain::{open_image, Chain, OpenOptions};
use cowimg::error::{Error, Result};
use cowimg::lock::Access;

/// What to do with the snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `-l`: list them.
    List,
    /// `-c NAME`: take one.
    Create(String),
    /// `-a NAME`: revert the disk to one.
    Apply(String),
    /// `-d NAME`: delete one.
    Delete(String),
}

/// The arguments of `cowimg snapshot` (`cowimg snapshot --help` says what each flag does).
pub struct Args {
    /// The image.
    pub file: String,
    /// `-f`: the image's format (probed when absent).
    pub format: Option<Format>,
    /// `-U`: read an image another process may be writing.
    pub force_share: bool,
    /// What to do.
    pub action: Action,
}

/// The one action the options ask for: at most one of `-l`, `-c`, `-a`, `-d` (qemu-img's
/// rule and message); none lists.
pub fn action(
    list: bool,
    create: Option<String>,
    apply: Option<String>,
    delete: Option<String>,
) -> Result<Action> {
    let mut asked: Vec<Action> = [
        list.then_some(Action::List),
        create.map(Action::Create),
        apply.map(Action::Apply),
        delete.map(Action::Delete),
    ]
    .into_iter()
    .flatten()
    .collect();
    match asked.len() {
        0 => Ok(Action::List),
        1 => Ok(asked.remove(0)),
        _ => Err(Error::Usage(
            "Cannot mix '-l', '-a', '-c', '-d'\nTry 'cowimg snapshot --help' for more info".into(),
        )),
    }
}

/// Runs `cowimg snapshot`; returns the exit status.
pub fn run(a: &Args) -> Result<i32> {
    let (verb, name) = match &a.action {
        Action::List => return list(a),
        Action::Create(n) => ("create", n),
        Action::Apply(n) => ("apply", n),
        Action::Delete(n) => ("delete", n),
    };
    if a.force_share {
        return Err(Error::open(
            &a.file,
            Error::Msg("force-share=on can only be used with read-only images".into()),
        ));
    }
    let layer = open_image(&a.file, a.format, Access::Write)?;
    let failed = |why: String| Error::Msg(format!("Could not {verb} snapshot '{name}': {why}"));
    if layer.format != Format::Qcow2 {
        // qemu-img's words for a driver without internal snapshots, per action.
        return Err(failed(
            match a.action {
                Action::Create(_) => "Operation not supported",
                Action::Apply(_) => "Block driver does not support snapshots",
                _ => "snapshot not found",
            }
            .into(),
        ));
    }
    let image = &layer.image;
    let found = match &a.action {
        Action::Create(n) => image.snapshot_create(n).map(|()| true),
        Action::Apply(n) => image.snapshot_apply(n),
        Action::Delete(n) => image.snapshot_delete(n),
        Action::List => unreachable!("listed above"),
    }
    .map_err(|e| failed(e.to_string()))?;
    if !found {
        return Err(failed(match a.action {
            Action::Apply(_) => "Failed to load snapshot: No such file or directory".into(),
            _ => "snapshot not found".into(),
        }));
    }
    image.close().map_err(|e| Error::image(&a.file, e))?;
    Ok(0)
}

/// Prints the table; an image without snapshots (or of a format without them: QED, raw)
/// prints nothing and succeeds, as qemu-img does.
fn list(a: &Args) -> Result<i32> {
    let mut opts = OpenOptions::read(a.format, a.force_share);
    // Only the named image is listed: its backing files need not be present.
    opts.backing = false;
    let chain = Chain::open(&a.file, opts)?;
    if let Some(top) = chain.layers.first() {
        if let Details::Qcow2(d) = top.image.details() {
            print!("{}", super::info::snapshot_table(&d.snapshots));
        }
    }
    Ok(0)
}
