//! Globals the loader sets in `.rodata` when it loads the object (`EbpfLoader::set_global`,
//! by symbol name: hence `#[no_mangle]`). They are read through `read_volatile`: a plain
//! read would be folded to the initial value at compile time, since to the compiler an
//! immutable static never changes.

/// Set to 1 at load time (`--debug`) to log one line per verdict through aya-log.
#[no_mangle]
static DEBUG: u8 = 0;

/// The network namespace cookie of the agent (set at load time; 0 = act for nobody): the
/// socket programs act only for sockets in this namespace (`sock.rs`).
#[no_mangle]
static SOCK_NETNS_COOKIE: u64 = 0;

/// True if the agent was started with `--debug`.
#[inline(always)]
pub fn debug() -> bool {
    // SAFETY: a read of an initialised, aligned static that nothing in the program writes.
    unsafe { core::ptr::read_volatile(&DEBUG) != 0 }
}

/// The agent's network namespace cookie, 0 if none was set.
#[inline(always)]
pub fn agent_netns_cookie() -> u64 {
    // SAFETY: a read of an initialised, aligned static that nothing in the program writes.
    unsafe { core::ptr::read_volatile(&SOCK_NETNS_COOKIE) }
}
