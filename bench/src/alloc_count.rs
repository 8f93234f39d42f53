//! A global allocator that counts allocations, to report allocations per processed task.
//!
//! Counting is off unless a workload turns it on ([`counting`]): two counters that every
//! allocating thread bumps are one cache line fought over on every allocation, which would
//! make allocations dearer in every other workload than they are in a real service.
//!
//! Implementing `GlobalAlloc` needs `unsafe`; this module only forwards every call to the
//! system allocator and bumps relaxed atomic counters, so it adds no unsafety of its own.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting allocations (including reallocations).
pub struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count(size: usize) {
    if COUNTING.load(Relaxed) {
        ALLOCATIONS.fetch_add(1, Relaxed);
        BYTES.fetch_add(size as u64, Relaxed);
    }
}

/// Counts allocations until the guard is dropped.
pub fn counting() -> CountingGuard {
    COUNTING.store(true, Relaxed);
    CountingGuard
}

/// Turns counting off when dropped.
pub struct CountingGuard;

impl Drop for CountingGuard {
    fn drop(&mut self) {
        COUNTING.store(false, Relaxed);
    }
}

/// Allocations and allocated bytes so far, process-wide.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub allocations: u64,
    pub bytes: u64,
}

impl Snapshot {
    pub fn now() -> Self {
        Self { allocations: ALLOCATIONS.load(Relaxed), bytes: BYTES.load(Relaxed) }
    }

    /// Allocations and bytes since `earlier`, per task.
    pub fn per_task_since(self, earlier: Snapshot, tasks: usize) -> (f64, f64) {
        let tasks = tasks.max(1) as f64;
        (
            (self.allocations - earlier.allocations) as f64 / tasks,
            (self.bytes - earlier.bytes) as f64 / tasks,
        )
    }
}
