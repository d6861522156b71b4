//! ClientIP session affinity: a client's new flows follow its backend; expired, inactive
//! and foreign entries are ignored; scopes of one service port are separate.

use crate::fixture::{flow, key_addr, monotonic_ns, Fixture, XDP_PASS};
use crate::frames::{build, proto_name, Net, BE_PORT, V4, V6, VIP_PORT};
use anyhow::{anyhow, ensure, Context as _};
use aya::maps::{HashMap, MapData};
use lb_common::{
    AffinityKey, AffinityValue, Counters, ServiceValue, MAP_AFFINITY, PROTO_TCP, PROTO_UDP,
};
use std::net::IpAddr;
use tests::packet::decode;

impl Fixture {
    fn affinity(&mut self, key: &AffinityKey) -> anyhow::Result<Option<AffinityValue>> {
        let m: HashMap<&MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(self.map(MAP_AFFINITY)?)?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn set_affinity(
        &mut self,
        key: AffinityKey,
        backend_id: u32,
        last_ns: u64,
    ) -> anyhow::Result<()> {
        let mut m: HashMap<&mut MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(self.map_mut(MAP_AFFINITY)?)?;
        m.insert(
            key,
            AffinityValue {
                backend_id,
                _pad: 0,
                last_ns,
            },
            0,
        )
        .context("writing AFFINITY")?;
        Ok(())
    }
}

const AFFINITY_SVC: u32 = 32;

/// Where Maglev alone sends a flow from each of `ports` to `AFFINITY_SVC`'s table of
/// {be1, be2} (the table `service_with` builds), found by running the program without
/// affinity. The affinity tests pick ports from this so that Maglev would split them.
fn maglev_choices(
    net: Net,
    proto: u8,
    ports: std::ops::Range<u16>,
) -> anyhow::Result<Vec<(u16, IpAddr)>> {
    let mut fx = Fixture::new("probe")?;
    fx.service(
        AFFINITY_SVC,
        net.vip,
        VIP_PORT,
        proto,
        &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
    )?;
    ports
        .map(|p| Ok((p, fx.forward_from(net, net.vip, proto, p)?)))
        .collect()
}

/// `n` distinct ports Maglev sends to `be`.
fn ports_to(choices: &[(u16, IpAddr)], be: IpAddr, n: usize) -> anyhow::Result<Vec<u16>> {
    let ports: Vec<u16> = choices
        .iter()
        .filter(|(_, b)| *b == be)
        .map(|(p, _)| *p)
        .take(n)
        .collect();
    ensure!(
        ports.len() == n,
        "Maglev sent fewer than {n} of {} probe flows to {be}",
        choices.len()
    );
    Ok(ports)
}

fn affinity_key(net: Net, scope: u32) -> AffinityKey {
    AffinityKey {
        client: key_addr(net.client),
        svc_id: AFFINITY_SVC,
        scope,
    }
}

#[test]
fn affinity_sends_a_clients_new_flows_to_its_backend() -> anyhow::Result<()> {
    use lb_common::{SVC_F_AFFINITY, SVC_F_CLUSTER_IP};
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("affinity {} {}", proto_name(proto), net.client);
            let choices = maglev_choices(net, proto, 41_000..41_032)?;
            let to_be1 = ports_to(&choices, net.be1, 1)?;
            let to_be2 = ports_to(&choices, net.be2, 2)?;
            let mut fx = Fixture::new("affinity")?;
            let ids = fx.service_with(
                AFFINITY_SVC,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
                SVC_F_CLUSTER_IP | SVC_F_AFFINITY,
                10_800,
            )?;
            // The first flow goes where Maglev says and is remembered.
            let t0 = monotonic_ns()?;
            let first = fx
                .forward_from(net, net.vip, proto, to_be1[0])
                .context(ctxt.clone())?;
            let t1 = monotonic_ns()?;
            ensure!(first == net.be1, "{ctxt}: first flow went to {first}");
            let a = fx
                .affinity(&affinity_key(net, 0))?
                .ok_or_else(|| anyhow!("{ctxt}: no AFFINITY entry"))?;
            ensure!(
                a.backend_id == ids[0] && (t0..=t1).contains(&a.last_ns),
                "{ctxt}: AFFINITY {a:?}, expected backend {} stamped in [{t0}, {t1}]",
                ids[0]
            );
            // Flows Maglev would send to be2 follow the client's backend instead, with
            // the usual flow state: CT, RNAT, reply.
            for &port in &to_be2 {
                let be = fx
                    .forward_from(net, net.vip, proto, port)
                    .context(ctxt.clone())?;
                ensure!(be == net.be1, "{ctxt}: port {port} went to {be}, not be1");
                let ct = fx
                    .ct(&flow(net.client, net.vip, port, VIP_PORT, proto))?
                    .ok_or_else(|| anyhow!("{ctxt}: no CT entry"))?;
                ensure!(ct.backend_id == ids[0], "{ctxt}: CT {ct:?}");
                let reply = build(proto, net.be1, net.client, BE_PORT, port)?;
                let d = decode(&fx.run_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)?)?;
                ensure!(
                    d.src == net.vip && d.sport == VIP_PORT && d.dport == port,
                    "{ctxt}: reply {}:{} -> :{}",
                    d.src,
                    d.sport,
                    d.dport
                );
            }
            let a2 = fx
                .affinity(&affinity_key(net, 0))?
                .ok_or_else(|| anyhow!("{ctxt}: AFFINITY entry gone"))?;
            ensure!(
                a2.backend_id == ids[0] && a2.last_ns > a.last_ns,
                "{ctxt}: AFFINITY not refreshed by the new flows: {a2:?} after {a:?}"
            );
            let st = fx.be_stats(ids[0])?;
            ensure!(st.new_flows == 3, "{ctxt}: be1 stats {st:?}");
            ensure!(
                fx.be_stats(ids[1])? == Counters::default(),
                "{ctxt}: be2 got traffic"
            );
        }
    }
    Ok(())
}

#[test]
fn affinity_ignores_expired_inactive_and_foreign_entries() -> anyhow::Result<()> {
    use lb_common::{SVC_F_AFFINITY, SVC_F_CLUSTER_IP};
    const TIMEOUT_S: u32 = 10;
    for net in [V4, V6] {
        let proto = PROTO_TCP;
        let ctxt = format!("affinity entries {}", net.client);
        let choices = maglev_choices(net, proto, 42_000..42_032)?;
        let ports = ports_to(&choices, net.be1, 5)?;
        let mut fx = Fixture::new("affstale")?;
        let ids = fx.service_with(
            AFFINITY_SVC,
            net.vip,
            VIP_PORT,
            proto,
            &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
            SVC_F_CLUSTER_IP | SVC_F_AFFINITY,
            TIMEOUT_S,
        )?;
        let key = affinity_key(net, 0);
        let expect_entry = |fx: &mut Fixture, id: u32, after: u64, what: &str| {
            let a = fx
                .affinity(&key)?
                .ok_or_else(|| anyhow!("{ctxt}: {what}: no AFFINITY entry"))?;
            ensure!(
                a.backend_id == id && a.last_ns >= after,
                "{ctxt}: {what}: AFFINITY {a:?}, expected backend {id} stamped after {after}"
            );
            anyhow::Ok(())
        };

        // A fresh entry written by hand is followed (Maglev says be1, the entry be2)...
        fx.set_affinity(key, ids[1], monotonic_ns()?)?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[0])
            .context(ctxt.clone())?;
        ensure!(be == net.be2, "{ctxt}: fresh entry not followed: {be}");

        // ...one older than the timeout is not, and is rewritten.
        let now = monotonic_ns()?;
        let old = now
            .checked_sub((TIMEOUT_S as u64 + 1) * 1_000_000_000)
            .context("the machine has been up for less than the affinity timeout")?;
        fx.set_affinity(key, ids[1], old)?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[1])
            .context(ctxt.clone())?;
        ensure!(be == net.be1, "{ctxt}: expired entry followed to {be}");
        expect_entry(&mut fx, ids[0], now, "expired")?;

        // An entry naming a backend no longer active is ignored and rewritten.
        fx.set_backend(ids[1], net.be2, BE_PORT, false)?;
        let now = monotonic_ns()?;
        fx.set_affinity(key, ids[1], now)?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[2])
            .context(ctxt.clone())?;
        ensure!(
            be == net.be1,
            "{ctxt}: inactive backend's entry followed to {be}"
        );
        expect_entry(&mut fx, ids[0], now, "inactive")?;

        // An entry naming a backend of the other family (a reused id, say) likewise.
        let foreign = if net.client.is_ipv4() { V6.be2 } else { V4.be2 };
        fx.set_backend(3299, foreign, BE_PORT, true)?;
        let now = monotonic_ns()?;
        fx.set_affinity(key, 3299, now)?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[3])
            .context(ctxt.clone())?;
        ensure!(
            be == net.be1,
            "{ctxt}: other family's backend followed to {be}"
        );
        expect_entry(&mut fx, ids[0], now, "other family")?;

        // A tracked flow whose backend goes away is a new flow again: the client's entry
        // (be1, now gone) is ignored, Maglev picks be2, and the entry follows, so the
        // client's next new flow goes to be2 too.
        fx.set_backend(ids[1], net.be2, BE_PORT, true)?;
        fx.set_maglev(AFFINITY_SVC * 16, 7, &[ids[1]])?;
        fx.set_backend(ids[0], net.be1, BE_PORT, false)?;
        let now = monotonic_ns()?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[3])
            .context(ctxt.clone())?;
        ensure!(be == net.be2, "{ctxt}: rescheduled flow went to {be}");
        expect_entry(&mut fx, ids[1], now, "rescheduled")?;
        fx.set_backend(ids[0], net.be1, BE_PORT, true)?;
        fx.set_maglev(AFFINITY_SVC * 16, 7, &[ids[0], ids[1]])?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[4])
            .context(ctxt.clone())?;
        ensure!(
            be == net.be2,
            "{ctxt}: next flow went to {be}, not the rescheduled flow's backend"
        );
    }
    Ok(())
}

#[test]
fn affinity_scopes_of_one_service_port_are_separate() -> anyhow::Result<()> {
    use lb_common::{SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL, SVC_F_LOCAL};
    for net in [V4, V6] {
        let proto = PROTO_TCP;
        let ctxt = format!("affinity scopes {}", net.client);
        let choices = maglev_choices(net, proto, 43_000..43_032)?;
        let cluster_ports = ports_to(&choices, net.be1, 1)?;
        let mut fx = Fixture::new("affscope")?;
        let ids = fx.service_with(
            AFFINITY_SVC,
            net.vip,
            VIP_PORT,
            proto,
            &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
            SVC_F_CLUSTER_IP | SVC_F_AFFINITY,
            10_800,
        )?;
        // The same service port's external frontend (`net.other`) with eTP Local: its own
        // table, holding only the local endpoint be1.
        let lb_offset = 1000;
        fx.set_maglev(lb_offset, 7, &[ids[0]])?;
        fx.set_service(
            net.other,
            VIP_PORT,
            proto,
            ServiceValue {
                svc_id: AFFINITY_SVC,
                maglev_offset: lb_offset,
                maglev_size: 7,
                flags: SVC_F_EXTERNAL | SVC_F_LOCAL | SVC_F_AFFINITY,
                affinity_timeout_s: 10_800,
                _pad: 0,
            },
        )?;
        // The client is pinned to be2 in the cluster scope.
        let pinned_at = monotonic_ns()?;
        fx.set_affinity(affinity_key(net, 0), ids[1], pinned_at)?;

        // Through the local frontend that entry does not apply: be1, remembered under
        // scope 1; the cluster-scope entry is left alone.
        let be = fx.forward_from(net, net.other, proto, 43_100)?;
        ensure!(be == net.be1, "{ctxt}: local frontend went to {be}");
        let local = fx
            .affinity(&affinity_key(net, 1))?
            .ok_or_else(|| anyhow!("{ctxt}: no scope-1 entry"))?;
        ensure!(
            local.backend_id == ids[0],
            "{ctxt}: scope-1 entry {local:?}"
        );
        let cluster = fx
            .affinity(&affinity_key(net, 0))?
            .ok_or_else(|| anyhow!("{ctxt}: scope-0 entry gone"))?;
        ensure!(
            cluster.backend_id == ids[1] && cluster.last_ns == pinned_at,
            "{ctxt}: scope-0 entry changed by a scope-1 flow: {cluster:?}"
        );
        // Through the ClusterIP the scope-0 entry still applies (Maglev would say be1).
        let be = fx.forward_from(net, net.vip, proto, cluster_ports[0])?;
        ensure!(be == net.be2, "{ctxt}: cluster frontend went to {be}");
    }
    Ok(())
}
