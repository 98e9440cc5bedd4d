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
    pub fn repairs(self) -> bool {
        self != CheckMode::ReadOnly
    }
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
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// One past the last byte used by the image (qcow2 only).
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// Per-problem lines, as qemu-img prints them on stderr.
    pub messages: Vec<String>,
    /// Set when the repair could not go on (e.g. `-r leaks` when refcounts need a rebuild);
    /// the text is what qemu-img prints after "Check failed: ".
    pub failed: Option<String>,
}
