//! SOCK_RNAT: how the socket programs (lb-ebpf/src/sock.rs) translate a socket's answers
//! back. connect() / sendmsg() to a frontend are rewritten to a backend; the entry
//! written then lets getpeername() / recvmsg() show the frontend the application asked
//! for.

/// SOCK_RNAT key: a socket (`bpf_get_socket_cookie`) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRnatKey {
    /// The socket's cookie: unique per socket for the life of the machine.
    pub cookie: u64,
    /// Backend address, 16-byte form.
    pub addr: [u8; 16],
    /// Backend port, network byte order.
    pub port_be: u16,
    // Integers rather than a byte array: the BPF backend turns a zeroed `[u8; N]` into a
    // call to `memset`, which the verifier rejects.
    /// Explicit padding, always zero: hash keys compare every byte.
    pub _pad: u16,
    /// Explicit padding, always zero.
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<SockRnatKey>() == 32);

/// SOCK_RNAT value: the frontend the application asked for. Used only while that frontend
/// still exists with the same `svc_id` (a deleted service's sockets see the real peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRnatValue {
    /// Frontend address, 16-byte form.
    pub addr: [u8; 16],
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`: with `addr` and `port_be`, the SERVICES key to check.
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// The frontend's service port when the socket was translated.
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRnatValue>() == 24);

// SAFETY: repr(C), Copy, no implicit padding, valid for any bit pattern.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: `SockRnatKey` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for SockRnatKey {}
    // SAFETY: `SockRnatValue` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for SockRnatValue {}
}
