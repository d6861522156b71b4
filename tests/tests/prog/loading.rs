//! Loading: the verifier accepts both programs and every map is pinned.

use crate::fixture::{Fixture, LOOPBACK_IFINDEX, XDP_PASS};
use crate::frames::{BE_PORT, CLIENT_PORT, V4, VIP_PORT};
use anyhow::ensure;
use lb_common::{ALL_MAPS, PROG_POD, PROTO_TCP};
use tests::packet::{self, TcpKind};

#[test]
fn object_loads_with_all_maps_pinned_and_debug_on() -> anyhow::Result<()> {
    // Loading with DEBUG = 1 also proves the aya-log path passes the verifier.
    let mut fx = Fixture::with_debug("load", true)?;
    for name in ALL_MAPS {
        ensure!(fx.map(name).is_ok(), "map {name} not in the object");
        let pin = fx.pin_dir.join(name);
        ensure!(pin.exists(), "map {name} not pinned at {}", pin.display());
    }
    fx.service(1, V4.vip, VIP_PORT, PROTO_TCP, &[(V4.be1, BE_PORT)])?;
    let syn = packet::tcp(V4.client, V4.vip, CLIENT_PORT, VIP_PORT, TcpKind::Syn, &[])?;
    fx.run_expect_on(
        PROG_POD,
        &syn,
        LOOPBACK_IFINDEX,
        XDP_PASS,
        lb_common::R_FWD_PASS,
    )?;
    Ok(())
}
