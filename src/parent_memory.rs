//! Memory the children do not inherit: the parent's bookkeeping (the children table, the
//! per-source counts, and the listener slots with their readiness flags) is allocated from one
//! anonymous mapping marked `MADV_WIPEONFORK`.
//!
//! # Why
//! After `fork`, every private page the parent and the new child both map is copy-on-write. The
//! parent writes its table between every two forks (a child added, a child reaped), so each
//! table page it writes costs it a page fault and a 4 KiB copy while the newest child still maps
//! the old page; the old page then stays behind in that child as private memory the child never
//! reads, for as long as the session lasts. With thousands of children the table spans many
//! pages and every insert lands on a different one. A child gets this mapping zero-filled
//! instead: nothing is copied or shared, the parent's writes never fault, and the child's memory
//! holds only what its session touches.
//!
//! # Rules
//! - A child must never read these tables (it would see zeros). It does not: the child runs
//!   only `spawn::child_main`, which never returns and never drops the parent's objects.
//! - Allocation is a bump pointer and freeing is a no-op: the tables only grow (a hash table
//!   that grows leaves its old, smaller array behind, and a reload that changes the listeners
//!   leaves the old flags, a few bytes), so what is wasted is at most the size of the final
//!   tables. When the mapping is full, or could not be made (kernels before 4.14 lack
//!   `MADV_WIPEONFORK`), allocations fall back to the ordinary heap: slower forks, same results.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use allocator_api2::alloc::{AllocError, Allocator, Global};

/// Address space reserved for the tables: enough for hundreds of thousands of live children.
/// Only pages written are ever backed by memory.
const RESERVED: usize = 64 << 20;

/// The mapping: where it starts and how long it is.
struct Region {
    base: usize,
    len: usize,
}

static REGION: OnceLock<Option<Region>> = OnceLock::new();
/// Offset of the first free byte in `REGION`.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The allocator handle for collections that only the parent uses (`hashbrown` tables).
#[derive(Debug, Clone, Copy, Default)]
pub struct ParentOnly;

/// Makes the mapping; call once in the parent before the first fork. Returns false (and the
/// tables use the ordinary heap) when the kernel refuses.
pub fn reserve() -> bool {
    REGION.get_or_init(map_region).is_some()
}

fn map_region() -> Option<Region> {
    // Safe: a fresh anonymous mapping; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RESERVED,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    // Safe: advice on the mapping just made.
    if unsafe { libc::madvise(base, RESERVED, libc::MADV_WIPEONFORK) } != 0 {
        // Safe: unmaps only what was mapped above.
        unsafe { libc::munmap(base, RESERVED) };
        return None;
    }
    Some(Region {
        base: base as usize,
        len: RESERVED,
    })
}

fn region() -> Option<&'static Region> {
    REGION.get().and_then(Option::as_ref)
}

/// Carves `layout` out of the mapping, or None if it is missing or full.
fn bump(layout: Layout) -> Option<NonNull<[u8]>> {
    let region = region()?;
    let mut offset = NEXT.load(Ordering::Relaxed);
    loop {
        let start = (region.base + offset).next_multiple_of(layout.align()) - region.base;
        let end = start.checked_add(layout.size())?;
        if end > region.len {
            return None;
        }
        match NEXT.compare_exchange(offset, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                let ptr = NonNull::new((region.base + start) as *mut u8)?;
                return Some(NonNull::slice_from_raw_parts(ptr, layout.size()));
            }
            Err(current) => offset = current,
        }
    }
}

fn in_region(ptr: NonNull<u8>) -> bool {
    region().is_some_and(|r| (r.base..r.base + r.len).contains(&(ptr.as_ptr() as usize)))
}

// Safe: memory handed out is valid for `layout`, stays valid until the process ends (it is
// never reused), and pointers from the fallback go back to the allocator that made them.
unsafe impl Allocator for ParentOnly {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Global.allocate(layout);
        }
        match bump(layout) {
            Some(block) => Ok(block),
            None => Global.allocate(layout),
        }
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if !in_region(ptr) {
            // Safe: not ours, so it came from `Global` with this layout (the caller's contract).
            unsafe { Global.deallocate(ptr, layout) }
        }
    }
}

/// While set, the global allocator takes from the mapping (see [`with_allocations_parent_only`]).
static DIVERTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs `f` with every heap allocation it makes (a library's, too) taken from the mapping:
/// for what only the parent ever touches and touches between forks, such as signal-hook's
/// registry, whose handler writes to it at each SIGCHLD (a copy-on-write fault per fork,
/// measured, if it sat on the ordinary heap). A child sees such memory zeroed: it must never
/// read it (a child resets every handler before it unblocks signals, so signal-hook's never
/// runs there).
pub fn with_allocations_parent_only<T>(f: impl FnOnce() -> T) -> T {
    DIVERTED.store(true, Ordering::Relaxed);
    let result = f();
    DIVERTED.store(false, Ordering::Relaxed);
    result
}

/// The process's allocator: the system's, except while [`with_allocations_parent_only`] runs.
/// Memory from the mapping is never given back (see the module doc): freeing it is a no-op,
/// and growing it copies it to the ordinary heap.
pub struct ForkAware;

// Safe: every block is valid for its layout: from the system allocator, or fresh (never
// reused, so zero) from the mapping; a block goes back only to the allocator that made it.
unsafe impl std::alloc::GlobalAlloc for ForkAware {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if DIVERTED.load(Ordering::Relaxed) && layout.size() > 0 {
            if let Some(block) = bump(layout) {
                return block.as_ptr().cast();
            }
        }
        // Safe: the caller's layout, unchanged.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if DIVERTED.load(Ordering::Relaxed) && layout.size() > 0 {
            // Fresh from the mapping, never handed out before: zero already.
            if let Some(block) = bump(layout) {
                return block.as_ptr().cast();
            }
        }
        // Safe: the caller's layout, unchanged.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match NonNull::new(ptr) {
            Some(p) if in_region(p) => {}
            // Safe: not from the mapping, so from the system allocator with this layout.
            _ => unsafe { std::alloc::System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match NonNull::new(ptr) {
            Some(p) if in_region(p) => {
                // Safe: a valid layout (the caller's contract for `new_size`).
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                // Safe: as `alloc`.
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    // Safe: both blocks are valid for the smaller size and do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
                }
                new
            }
            // Safe: from the system allocator, with this layout.
            _ => unsafe { std::alloc::System.realloc(ptr, layout, new_size) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_live_in_the_region_and_survive_growth() {
        assert!(reserve(), "mmap + MADV_WIPEONFORK");
        let mut map = hashbrown::HashMap::with_hasher_in(std::hash::RandomState::new(), ParentOnly);
        for i in 0..10_000u32 {
            map.insert(i, u64::from(i) * 3);
        }
        assert!(map.iter().all(|(k, v)| *v == u64::from(*k) * 3));
        let first = map.iter().next().map(|(k, _)| k as *const u32).unwrap();
        assert!(in_region(NonNull::new(first as *mut u8).unwrap()));
        for i in 0..10_000u32 {
            assert_eq!(map.remove(&i), Some(u64::from(i) * 3));
        }
        assert!(map.is_empty());
    }
}
