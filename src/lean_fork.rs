//! Starting an echo session's child without making the parent pay for it afterwards.
//!
//! # Why
//! `fork` marks every private page the parent and the new child share copy-on-write, and the
//! parent's next write to each of those pages is a page fault that copies it while the child
//! lives (measured here: about 7 µs per page, the cost of a whole fork floor's session every
//! three pages). The parent's loop writes its stack, some four pages deep from `serve` to
//! `fork`, between every two forks. The child needs none of it: it never returns into the
//! parent's frames.
//!
//! So the part of the parent's stack its loop runs in is not inherited at all
//! (`MADV_DONTFORK` below the frame of `Server::run`, while serving), and the child starts with
//! `clone3` (`CLONE_CLEAR_SIGHAND`: born with default handlers) or `clone` on a stack of its
//! own ([`ChildMemory`], inherited, which the parent never writes; the echo's buffer is there
//! too).
//! What the child needs of its connection goes through a shared mapping ([`Slots`]): pages
//! that are shared, not copied, so the parent's writes to them never fault. Everything else
//! the child reads (its settings, the logger) was written before serving began and is
//! read-only from then on; what the parent keeps writing (the children table, signal-hook's
//! registry) lives in `parent_memory`, which children get zeroed.
//!
//! # The child's own costs
//! A child pays a page fault for each page it writes (a copy, if the parent has the page) and
//! for each 64 KiB of code it runs (the kernel maps code around the faulting address; `fork`
//! copies no mapping of a file). So:
//! - The echo buffer is in [`ChildMemory`], and the child writes nothing else of the
//!   parent's: no allocation, no stdout lock.
//! - The code of its usual path is in one section, `.text.hot.forkecho_child` (each function
//!   marked `#[link_section]`; `.cargo/config.toml` keeps the linker from scattering them),
//!   and calls libc directly where a crate's wrapper would be a page elsewhere.
//!
//! Measured (4 clients, C load generator, the C fork floor alongside): a child took 20 page
//! faults (10 in code, 3 copies) and now takes 6 (4 in code: its section and three pages of
//! libc's; none a copy); the connection rate went from 0.78x to 0.88x of the floor's.
//!
//! # Rules
//! - The child runs only `child_entry`: no frame of the parent's loop exists in it, so it can
//!   never return into the parent's code (rule 2), and it reads nothing on the parent's
//!   stack. The top of the stack (the command line, the environment, `main`'s frames) stays
//!   inherited.
//! - Any other `fork` while serving (the upgrade's check through `Command`, a session whose
//!   slot could not be had) holds a [`StackInherited`], or its child would return into frames
//!   it does not have.
//! - No forked child may read `parent_memory` (it sees zeros there), and so none may run a
//!   signal handler of the parent's: signal-hook's registry lives there. A session's child
//!   resets its handlers with every signal blocked; the upgrade's check is started by
//!   `posix_spawn`, whose child does the same before its `execve`.
//! - When the slots, the stack or the advice cannot be had, sessions start with a plain
//!   `fork`, as before: slower, same result.
//! - A child killed before it took its slot (between `clone` and its first instructions)
//!   leaves the slot taken for good: one of [`SLOTS`], and nothing else, is lost.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::conn::Conn;

/// What a child takes from its slot.
pub struct ChildStart {
    pub conn: Conn,
    pub settings: *const crate::echo::Settings,
    /// The kernel reset every handled signal to its default at `clone3`: the child need not.
    pub handlers_default: bool,
}

/// Slots in flight at once: children created but not yet started. A child takes its slot
/// within microseconds of `clone`; when all are taken (a storm of children the scheduler has
/// not run yet), sessions start with a plain `fork` until one frees.
const SLOTS: usize = 1024;

const FREE: u32 = 0;
const FILLED: u32 = 1;

#[repr(C)]
struct Slot {
    state: AtomicU32,
    start: UnsafeCell<MaybeUninit<ChildStart>>,
}

#[repr(C)]
struct Shared {
    /// Where the parent looks for a free slot next.
    cursor: AtomicUsize,
    slots: [Slot; SLOTS],
}

/// The shared mapping, parent and children alike.
pub struct Slots {
    shared: *mut Shared,
}

// Safe: only the parent's single thread fills slots; a child takes only its own.
unsafe impl Send for Slots {}
unsafe impl Sync for Slots {}

impl Slots {
    fn new() -> std::io::Result<Slots> {
        let len = std::mem::size_of::<Shared>();
        // Safe: a fresh anonymous mapping, zero-filled (every slot FREE).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Slots {
            shared: base.cast(),
        })
    }

    /// A free slot, if one is: the next after the last one filled.
    fn free(&self) -> Option<*mut Slot> {
        // Safe: the mapping lives as long as the process.
        let shared = unsafe { &*self.shared };
        let first = shared.cursor.load(Ordering::Relaxed);
        let found = (0..SLOTS)
            .map(|i| (first + i) % SLOTS)
            .find(|&i| shared.slots[i].state.load(Ordering::Acquire) == FREE)?;
        shared.cursor.store((found + 1) % SLOTS, Ordering::Relaxed);
        Some(&shared.slots[found] as *const Slot as *mut Slot)
    }

    /// Puts `start` in `slot`, a free one, for the child about to be made.
    ///
    /// # Safety
    /// `slot` came from [`Slots::free`] just now.
    unsafe fn fill(slot: *mut Slot, start: ChildStart) {
        // Safe: a FREE slot belongs to the parent until it is marked FILLED.
        unsafe { (*(*slot).start.get()).write(start) };
        unsafe { (*slot).state.store(FILLED, Ordering::Release) };
    }

    /// Takes back what [`Slots::fill`] put in `slot`, when no child was created to take it.
    ///
    /// # Safety
    /// `slot` came from `fill` and no child has it.
    unsafe fn unfill(slot: *mut Slot) -> ChildStart {
        let start = (*(*slot).start.get()).assume_init_read();
        (*slot).state.store(FREE, Ordering::Release);
        start
    }

    /// In the child: takes what its slot holds and frees the slot.
    ///
    /// # Safety
    /// `slot` is the one the parent filled for this child.
    #[link_section = ".text.hot.forkecho_child"]
    unsafe fn take(slot: *mut Slot) -> ChildStart {
        let _ = (*slot).state.load(Ordering::Acquire);
        let start = (*(*slot).start.get()).assume_init_read();
        (*slot).state.store(FREE, Ordering::Release);
        start
    }
}

/// The memory an echo child starts with: its stack, with a guard page below, and below that
/// its echo buffer. Inherited by every child (each writes its own copy), never written by the
/// parent: so a page a child touches is a fresh zero page, not a copy of the parent's, and no
/// child writes the allocator's state in the parent's pages (a copy each).
struct ChildMemory {
    /// The echo buffer's start: [`crate::echo::BUFFER_SIZE`] bytes.
    buffer: usize,
    top: usize,
}

/// An echo session's deepest path (a long log line, a panic's message) fits with room.
const STACK_SIZE: usize = 256 * 1024;
/// The guard page below it.
fn guard_size() -> usize {
    page_size()
}

/// The kernel's page size (4 KiB on x86_64, up to 64 KiB elsewhere).
fn page_size() -> usize {
    // Safe: sysconf only answers.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as usize,
        _ => 4096,
    }
}

impl ChildMemory {
    fn new() -> std::io::Result<ChildMemory> {
        let buffer_len = crate::echo::BUFFER_SIZE.next_multiple_of(page_size());
        let len = buffer_len + guard_size() + STACK_SIZE;
        // Safe: a fresh anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Safe: within the mapping just made.
        let guard = unsafe { base.cast::<u8>().add(buffer_len) };
        if unsafe { libc::mprotect(guard.cast(), guard_size(), libc::PROT_NONE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ChildMemory {
            buffer: base as usize,
            top: (base as usize + len) & !15,
        })
    }

    /// The echo buffer, in the child.
    ///
    /// # Safety
    /// Called once, in a child (the parent never touches this memory).
    unsafe fn buffer(&self) -> &'static mut [MaybeUninit<u8>] {
        std::slice::from_raw_parts_mut(
            self.buffer as *mut MaybeUninit<u8>,
            crate::echo::BUFFER_SIZE,
        )
    }
}

/// Set up once the parent serves: the slots, the child's stack.
pub struct LeanFork {
    slots: Slots,
    memory: ChildMemory,
    /// The parent's stack below this address is not inherited.
    boundary: usize,
}

static LEAN: std::sync::OnceLock<Option<LeanFork>> = std::sync::OnceLock::new();

/// The mapping of this process that contains `address`: (start, end), from `/proc/self/maps`.
fn mapping_containing(address: usize) -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let (start, end) = line.split_whitespace().next()?.split_once('-')?;
        let (start, end) = (
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        );
        (start..end).contains(&address).then_some((start, end))
    })
}

/// Marks the main stack below `boundary` inherited by children or not.
fn set_stack_inherited(boundary: usize, inherited: bool) -> std::io::Result<()> {
    let (start, _) = mapping_containing(boundary - 1)
        .ok_or_else(|| std::io::Error::other("the stack is not in /proc/self/maps"))?;
    let advice = match inherited {
        true => libc::MADV_DOFORK,
        false => libc::MADV_DONTFORK,
    };
    // Safe: changes only whether these pages are copied into children.
    if unsafe { libc::madvise(start as *mut libc::c_void, boundary - start, advice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The stack pointer of the caller (an approximation off x86_64: the address of a local).
#[inline(always)]
pub fn stack_pointer() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        let sp: usize;
        // Safe: reads a register.
        unsafe { std::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack)) };
        sp
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let local = 0u8;
        std::ptr::addr_of!(local) as usize
    }
}

/// Called by the parent once, before its first session, with its stack pointer in the frame
/// the loop is called from: from here on sessions start lean, and the stack below the end of
/// that page is the parent's alone (the loop's frames; the frames above, with the command
/// line and the environment, stay inherited, and are not written while the loop runs).
pub fn prepare(stack_pointer: usize) {
    LEAN.get_or_init(|| {
        let boundary = stack_pointer.next_multiple_of(page_size());
        // Rule 2, once: nothing writes to stdout from here on (see `spawn`).
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let made = (|| -> std::io::Result<LeanFork> {
            let lean = LeanFork {
                slots: Slots::new()?,
                memory: ChildMemory::new()?,
                boundary,
            };
            set_stack_inherited(boundary, false)?;
            Ok(lean)
        })();
        match made {
            Ok(lean) => Some(lean),
            Err(e) => {
                log::debug!("sessions start with a plain fork: {e}");
                None
            }
        }
    });
}

/// The whole stack inherited by children, until dropped: for a `fork` whose child returns
/// into the caller's frames (as `fork` and `Command` do).
pub struct StackInherited {
    boundary: Option<usize>,
}

/// Makes the whole stack inherited (see [`StackInherited`]). Fails if it cannot be: a child
/// forked then would start without the frames it returns into, so the caller must not fork.
pub fn inherit_stack() -> std::io::Result<StackInherited> {
    let boundary = match LEAN.get() {
        Some(Some(lean)) => Some(lean.boundary),
        _ => None,
    };
    if let Some(boundary) = boundary {
        set_stack_inherited(boundary, true)?;
    }
    Ok(StackInherited { boundary })
}

impl Drop for StackInherited {
    fn drop(&mut self) {
        if let Some(boundary) = self.boundary {
            if let Err(e) = set_stack_inherited(boundary, false) {
                log::warn!("cannot make the stack the parent's alone again: {e}");
            }
        }
    }
}

/// What became of a lean start.
pub enum Started {
    Child(libc::pid_t),
    /// `clone` failed: the connection comes back, to answer the client.
    Failed(Conn, std::io::Error),
    /// Not available (not prepared, or every slot in flight): start it another way.
    Unavailable(ChildStart),
}

/// Starts the child for `start` lean. On success the parent's copy of the connection is
/// closed (rule 5).
pub fn spawn(start: ChildStart) -> Started {
    let Some(Some(lean)) = LEAN.get() else {
        return Started::Unavailable(start);
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&start.conn.stream);
    let Some(slot) = lean.slots.free() else {
        return Started::Unavailable(start);
    };
    // Safe: just found free.
    unsafe { Slots::fill(slot, start) };
    // Keep every signal pending across clone; see `signals::block_all`.
    let parent_mask = match crate::signals::block_all() {
        Ok(mask) => mask,
        // Safe: no child was made.
        Err(e) => return Started::Failed(unsafe { Slots::unfill(slot) }.conn, e),
    };
    // Safe: `child_entry` takes its slot and never returns; the stack is the lean one.
    let pid = unsafe { clone_onto(&lean.memory, slot) };
    let error = std::io::Error::last_os_error();
    if let Err(e) = crate::signals::restore_mask(&parent_mask) {
        log::error!("cannot restore the signal mask after clone: {e}");
    }
    if pid < 0 {
        // Safe: no child was made.
        let start = unsafe { Slots::unfill(slot) };
        return Started::Failed(start.conn, error);
    }
    // Rule 5: the parent's copy of the connection goes now (its owner moved to the slot).
    // Safe: this descriptor is the parent's, and nothing of the parent's owns it any more.
    unsafe { libc::close(fd) };
    Started::Child(pid)
}

/// Whether `clone3` with `CLONE_CLEAR_SIGHAND` (Linux 5.5) works here; cleared, once, at the
/// first refusal.
static CLONE3: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// `clone3`'s argument, its first version (64 bytes).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

/// A forked child (exit signal SIGCHLD) that starts in [`child_entry`] with `slot`, on
/// `stack`. Returns its pid, or -1 with errno set.
///
/// With `clone3` and `CLONE_CLEAR_SIGHAND`, the kernel gives the child every handled signal
/// back at its default (ignored ones stay ignored), which saves the child a `sigaction` per
/// hooked signal; the slot says so. Where the kernel refuses it, plain `clone`.
///
/// # Safety
/// `slot` is filled; `child_entry` never returns.
unsafe fn clone_onto(memory: &ChildMemory, slot: *mut Slot) -> libc::pid_t {
    if CLONE3.load(Ordering::Relaxed) {
        (*(*slot).start.get()).assume_init_mut().handlers_default = true;
        let args = CloneArgs {
            flags: CLONE_CLEAR_SIGHAND,
            pidfd: 0,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: (memory.top - STACK_SIZE) as u64,
            stack_size: STACK_SIZE as u64,
            tls: 0,
        };
        let size = std::mem::size_of::<CloneArgs>() as u64;
        let pid = raw_clone(
            libc::SYS_clone3,
            &args as *const CloneArgs as u64,
            size,
            slot,
        );
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOSYS | libc::EINVAL | libc::E2BIG) if pid < 0 => {
                CLONE3.store(false, Ordering::Relaxed);
            }
            _ => return pid,
        }
    }
    (*(*slot).start.get()).assume_init_mut().handlers_default = false;
    raw_clone(
        libc::SYS_clone,
        libc::SIGCHLD as u64,
        memory.top as u64,
        slot,
    )
}

/// The system call `nr` (clone or clone3, with their first two arguments) made so that the
/// child starts in [`child_entry`] with `slot`: its function and argument are in registers the
/// kernel copied. (glibc's `clone` stores them on the child's stack first: a write of the
/// parent's to a page the previous child still shares, a copy-on-write fault in every fork,
/// measured.) Returns the child's pid, or -1 with errno set.
///
/// # Safety
/// As [`clone_onto`]; the child's stack top is 16-byte aligned.
#[cfg(target_arch = "x86_64")]
#[link_section = ".text.hot.forkecho_child"]
#[inline(never)]
unsafe fn raw_clone(nr: libc::c_long, a0: u64, a1: u64, slot: *mut Slot) -> libc::pid_t {
    let entry: extern "C" fn(*mut libc::c_void) -> libc::c_int = child_entry;
    let ret: i64;
    std::arch::asm!(
        "syscall",
        "test rax, rax",
        "jnz 2f",
        // The child, on its own stack: an outermost frame, then its function, which never
        // returns (ud2 if it did).
        "xor ebp, ebp",
        "mov rdi, r12",
        "call r13",
        "ud2",
        "2:",
        inlateout("rax") nr => ret,
        in("rdi") a0,
        in("rsi") a1,
        in("rdx") 0u64,
        in("r10") 0u64,
        in("r8") 0u64,
        in("r12") slot,
        in("r13") entry,
        lateout("rcx") _,
        lateout("r11") _,
    );
    if ret < 0 {
        // As glibc's wrappers report it.
        *libc::__errno_location() = (-ret) as libc::c_int;
        return -1;
    }
    ret as libc::pid_t
}

/// Elsewhere: glibc's `clone` for plain `clone`; `clone3` is not tried.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn raw_clone(nr: libc::c_long, _: u64, stack: u64, slot: *mut Slot) -> libc::pid_t {
    if nr != libc::SYS_clone {
        *libc::__errno_location() = libc::ENOSYS;
        return -1;
    }
    libc::clone(
        child_entry,
        stack as *mut libc::c_void,
        libc::SIGCHLD,
        slot.cast(),
    )
}

#[link_section = ".text.hot.forkecho_child"]
extern "C" fn child_entry(slot: *mut libc::c_void) -> libc::c_int {
    // Safe: the parent filled this slot for this child.
    let start = unsafe { Slots::take(slot.cast()) };
    // Safe: the settings were written before serving began and live on the parent's heap,
    // which the child has a copy of.
    let settings = unsafe { &*start.settings };
    let Some(Some(lean)) = LEAN.get() else {
        unreachable!("a lean child exists only once LEAN is set");
    };
    // Safe: this child's own copy, taken once.
    let buffer = unsafe { lean.memory.buffer() };
    crate::spawn::child_main(start.conn, start.handlers_default, |conn| {
        crate::echo::run(conn, settings, buffer).exit_code()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(fd_from: &std::net::TcpListener) -> ChildStart {
        let stream = socket2::Socket::from(fd_from.try_clone().unwrap());
        let peer = crate::conn::Peer::Ip("127.0.0.1:1".parse().unwrap());
        let accepted = crate::conn::Accepted::direct(stream, peer, crate::conn::Local::Unix);
        let source = crate::limits::Source::Uid(0);
        ChildStart {
            conn: Conn::admitted(accepted, source, 1, 1),
            settings: std::ptr::null(),
            handlers_default: false,
        }
    }

    #[test]
    fn slots_run_out_while_children_have_not_taken_theirs_and_come_back_when_they_do() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let slots = Slots::new().unwrap();
        let mut filled = Vec::new();
        for _ in 0..SLOTS {
            let slot = slots.free().expect("a free slot");
            // Safe: just found free.
            unsafe { Slots::fill(slot, start(&listener)) };
            filled.push(slot);
        }
        assert!(slots.free().is_none(), "every slot is in flight");
        // A child takes its slot: that one is free again, and the next to be filled.
        // Safe: filled above, taken once.
        let taken = unsafe { Slots::take(filled[7]) };
        assert_eq!(taken.conn.number, 1);
        assert_eq!(slots.free(), Some(filled[7]));
        for (i, slot) in filled.into_iter().enumerate().filter(|&(i, _)| i != 7) {
            // Safe: filled above, and no child has it.
            let start = unsafe { Slots::unfill(slot) };
            assert_eq!(start.conn.number, 1, "slot {i}");
        }
    }
}
