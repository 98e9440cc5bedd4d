//! cowimg's fuzz targets (run with cargo-fuzz; see docs/reliability.md).
pub mod targets;
