//! The result of checking an image, in the terms of `qemu-img check`.

/// What a check may repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckMode {
    /// Only look.
    ReadOnly,
    /// Free leaked clusters (`-r leaks`).
    RepairLeaks,
    /// Also fix refcount errors, COPIED flags, invalid entries (`-r all`).
    RepairAll,
}

impl CheckMode {
    /// The mode writes (any repair).
    pub fn repairs(self) -> bool {
        self != CheckMode::ReadOnly
    }
}

/// Guest data that a repair could not keep: a mapping pointed at something that cannot be the
/// data (past the end of the file, misaligned, into the image's own metadata) and was dropped.
/// qemu-img leaves such mappings in place, still corrupt; cowimg removes them and says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostData {
    /// Whose view lost it: "active layer", or "snapshot ID (NAME)".
    pub layer: String,
    /// Guest byte range that no longer reads the old (broken) mapping.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
    /// Why the mapping was broken, and what the range reads now.
    pub reason: String,
}

/// Counts and messages of one check pass (qemu's `BdrvCheckResult`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors: metadata that is wrong and may lose data.
    pub corruptions: u64,
    /// Clusters allocated but unused.
    pub leaks: u64,
    /// Internal errors that kept the check from completing (unreadable metadata...).
    pub check_errors: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaked clusters the repair freed.
    pub leaks_fixed: u64,
    /// One past the last byte used by the image (qcow2 only).
    pub image_end_offset: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Of those, the ones the image (its active layer) maps.
    pub allocated_clusters: u64,
    /// Allocated clusters not right after the previous one in the file.
    pub fragmented_clusters: u64,
    /// Allocated clusters stored compressed.
    pub compressed_clusters: u64,
    /// Per-problem lines, as qemu-img prints them on stderr. Filled by [`crate::Image::check`];
    /// [`crate::Image::check_logged`] hands them to its logger instead, as they happen.
    pub messages: Vec<String>,
    /// Set when the repair could not go on (e.g. `-r leaks` when refcounts need a rebuild);
    /// the text is what the command prints after "Check failed: ". No counts are meaningful then.
    pub failed: Option<String>,
    /// With `failed`: the error qemu-img reports first, as a message of its own (after the
    /// program's name), e.g. "ERROR snapshot table offset invalid".
    pub failed_because: Option<String>,
    /// Mappings a repair dropped, with the guest ranges whose old contents are gone.
    pub lost: Vec<LostData>,
}

impl CheckReport {
    /// Whether this pass changed the image in a way qemu-img reports as a repair (which is
    /// when qemu-img runs its second, "double checking" pass).
    pub fn repaired(&self) -> bool {
        self.corruptions_fixed > 0 || self.leaks_fixed > 0
    }
}
