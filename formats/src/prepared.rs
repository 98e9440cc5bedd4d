//! "Prepared for writing" as a type: a format's in-memory state whose allocator is loaded.
//! Each format's `prepare_write` is the only maker of a [`Writing`], and every step that
//! allocates or frees space takes one, so that no step can run on an unprepared image.

use std::ops::{Deref, DerefMut};

/// A format's in-memory state that may hold an allocator (loaded on the first write).
pub(crate) trait Allocating {
    /// The format's allocator.
    type Allocator;
    /// The allocator, once loaded.
    fn allocator(&mut self) -> Option<&mut Self::Allocator>;
}

/// The state `M` with its allocator loaded; it dereferences to the state.
pub(crate) struct Writing<'m, M: Allocating>(&'m mut M);

impl<'m, M: Allocating> Writing<'m, M> {
    /// Wraps `m`, whose allocator the caller (the format's `prepare_write`) has just loaded.
    pub(crate) fn prepared(m: &'m mut M) -> Self {
        debug_assert!(m.allocator().is_some(), "prepared without an allocator");
        Writing(m)
    }

    /// The allocator.
    pub(crate) fn alloc(&mut self) -> &mut M::Allocator {
        // Loaded before a `Writing` is made, and dropped only by a format's `forget_tables`,
        // which no step holding a `Writing` calls without preparing again.
        self.0.allocator().expect("a Writing has its allocator")
    }
}

impl<M: Allocating> Deref for Writing<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        self.0
    }
}

impl<M: Allocating> DerefMut for Writing<'_, M> {
    fn deref_mut(&mut self) -> &mut M {
        self.0
    }
}
