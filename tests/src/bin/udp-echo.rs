//! `udp-echo <port> <name>`: answers every UDP datagram on `[::]:<port>` (IPv4 too, through
//! mapped addresses) with `<name>` and a newline, from one socket in one process.
//!
//! The e2e tests run it in pod namespaces. socat's `UDP-RECVFROM,fork` is not used: its
//! forked child keeps reading the shared socket for a while after answering and swallows
//! the next request without answering it.

use anyhow::{Context as _, Result};
use std::net::UdpSocket;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: udp-echo <port> <name>";
    let port: u16 = args
        .next()
        .context(usage)?
        .parse()
        .context("port must be a number")?;
    let name = args.next().context(usage)?;
    let answer = format!("{name}\n");
    let sock = UdpSocket::bind(("::", port)).with_context(|| format!("binding [::]:{port}"))?;
    let mut buf = [0u8; 2048];
    loop {
        let (_, peer) = sock.recv_from(&mut buf).context("receiving")?;
        // A peer that went away is no reason to stop serving the others.
        if let Err(e) = sock.send_to(answer.as_bytes(), peer) {
            eprintln!("udp-echo: answering {peer}: {e}");
        }
    }
}
