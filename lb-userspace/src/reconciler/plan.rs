//! Desired state → what the maps must hold, as pure functions: each service port's
//! frontends with their flags, the endpoints of each of its tables, the backends kept for
//! established flows, and the Maglev table sizes and slots. Nothing here looks at the
//! maps; the write phases diff this against the bookkeeping.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    ServiceKey, ServiceValue, BACKEND_NONE, SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_DROP_IF_EMPTY,
    SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES,
};

use super::keys::{
    backend_identity, backend_meta_name, family, frontend_key, frontend_table_index, maglev_name,
    table_index, BackendIdentity, FAMILIES, SCOPE_CLUSTER, SCOPE_LOCAL, TABLES_PER_PORT,
};
use super::{ServiceFailure, Shortage};
use crate::maps::addr_from_map;
use crate::model::{Endpoint, Frontend, FrontendKind, Prefix, ServicePortId, ServicePortState};

/// Endpoint → BE_META name, for the endpoints of one table (or the kept ones).
pub(super) type Members = BTreeMap<BackendIdentity, String>;

/// A service port of the desired state, in map terms.
#[derive(Default)]
pub(super) struct WantedPort {
    /// The SERVICES value without svc_id and table (filled in at the switch).
    pub(super) frontends: BTreeMap<ServiceKey, ServiceValue>,
    /// Per [`table_index`] with at least one frontend: its endpoints.
    pub(super) tables: [Option<Members>; TABLES_PER_PORT],
    /// Listed endpoints of a family with frontends that are in none of the tables.
    pub(super) kept: Members,
    /// `loadBalancerSourceRanges`, when some frontend uses them.
    pub(super) src_ranges: Vec<Prefix>,
}

impl WantedPort {
    pub(super) fn of(st: &ServicePortState) -> Self {
        let frontends = frontend_values(st);
        let tables = table_members(st, &frontends);
        let kept = kept_backends(st, &frontends, &tables);
        let src_ranges = if frontends
            .values()
            .any(|v| v.flags & SVC_F_SOURCE_RANGES != 0)
        {
            st.source_ranges.clone()
        } else {
            Vec::new()
        };
        Self {
            frontends,
            tables,
            kept,
            src_ranges,
        }
    }

    /// Every backend this port needs: its tables' members and the kept ones.
    pub(super) fn backends(&self) -> Members {
        let mut need = Members::new();
        for table in self.tables.iter().flatten().chain([&self.kept]) {
            for (identity, meta) in table {
                need.entry(*identity).or_insert_with(|| meta.clone());
            }
        }
        need
    }
}

/// Which families have at least one of `endpoints`.
fn families_present(endpoints: &[Endpoint]) -> [bool; FAMILIES] {
    let mut present = [false; FAMILIES];
    for e in endpoints {
        present[family(&backend_identity(e).0)] = true;
    }
    present
}

/// The SERVICES flags of frontend `f`. `local_any` / `cluster_any`: whether the port has
/// node-local / any endpoints of the frontend's family.
fn frontend_flags(st: &ServicePortState, f: &Frontend, local_any: bool, cluster_any: bool) -> u32 {
    let mut flags = match f.kind {
        FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
        FrontendKind::LoadBalancer | FrontendKind::ExternalIp => SVC_F_EXTERNAL,
        FrontendKind::NodePort => SVC_F_EXTERNAL | SVC_F_NODE_PORT,
    };
    if st.frontend_is_local(f.kind) {
        flags |= SVC_F_LOCAL;
        // "No local endpoint" drops only while the service has endpoints elsewhere; with
        // none at all it refuses, as kube-proxy does.
        if !local_any && cluster_any {
            flags |= SVC_F_DROP_IF_EMPTY;
        }
    }
    if st.affinity_timeout_s.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    if st.restricts_source(f) {
        flags |= SVC_F_SOURCE_RANGES;
    }
    flags
}

/// Frontend → its SERVICES value (without svc_id and table). Two frontends with one key
/// (the same address listed under two kinds) share the entry and its flags.
fn frontend_values(st: &ServicePortState) -> BTreeMap<ServiceKey, ServiceValue> {
    let cluster_any = families_present(&st.endpoints);
    let local_any = families_present(&st.local_endpoints);
    let mut out: BTreeMap<ServiceKey, ServiceValue> = BTreeMap::new();
    for f in &st.frontends {
        let key = frontend_key(f);
        let fam = family(&key.addr);
        let flags = frontend_flags(st, f, local_any[fam], cluster_any[fam]);
        let v = out.entry(key).or_insert(ServiceValue {
            affinity_timeout_s: st.affinity_timeout_s.unwrap_or(0),
            ..Default::default()
        });
        v.flags |= flags;
    }
    out
}

/// The tables the frontends use, each with the endpoints of its family and scope.
fn table_members(
    st: &ServicePortState,
    frontends: &BTreeMap<ServiceKey, ServiceValue>,
) -> [Option<Members>; TABLES_PER_PORT] {
    let mut tables: [Option<Members>; TABLES_PER_PORT] = Default::default();
    for (k, v) in frontends {
        tables[frontend_table_index(k, v.flags)].get_or_insert_with(BTreeMap::new);
    }
    for (endpoints, scope) in [
        (&st.endpoints, SCOPE_CLUSTER),
        (&st.local_endpoints, SCOPE_LOCAL),
    ] {
        for e in endpoints {
            let identity = backend_identity(e);
            if let Some(table) = &mut tables[table_index(family(&identity.0), scope)] {
                table
                    .entry(identity)
                    .or_insert_with(|| backend_meta_name(e));
            }
        }
    }
    tables
}

/// Listed endpoints (ready, local or draining) of a family the port has frontends of that
/// are in none of its tables: their backends stay so established flows keep their pod.
fn kept_backends(
    st: &ServicePortState,
    frontends: &BTreeMap<ServiceKey, ServiceValue>,
    tables: &[Option<Members>; TABLES_PER_PORT],
) -> Members {
    let mut has_frontends = [false; FAMILIES];
    for k in frontends.keys() {
        has_frontends[family(&k.addr)] = true;
    }
    let mut kept = Members::new();
    for e in st
        .endpoints
        .iter()
        .chain(&st.local_endpoints)
        .chain(&st.draining)
    {
        let identity = backend_identity(e);
        let fam = family(&identity.0);
        let in_table = [SCOPE_CLUSTER, SCOPE_LOCAL].iter().any(|scope| {
            tables[table_index(fam, *scope)]
                .as_ref()
                .is_some_and(|t| t.contains_key(&identity))
        });
        if has_frontends[fam] && !in_table {
            kept.entry(identity).or_insert_with(|| backend_meta_name(e));
        }
    }
    kept
}

/// The desired ports in map terms, by SVC_META name.
pub(super) struct Plan {
    pub(super) wanted: BTreeMap<String, WantedPort>,
    /// Backends each port wants kept for established flows, also if the port fails: a
    /// refused port keeps its old state, whose flows may use them.
    pub(super) desired_kept: BTreeMap<String, Vec<BackendIdentity>>,
    /// Ports refused because another one (first by name) claims one of their frontends.
    pub(super) conflicts: Vec<ServiceFailure>,
}

/// Plans `ports`; a frontend claimed twice stays with the first port by name.
pub(super) fn plan_ports(ports: &BTreeMap<&ServicePortId, &ServicePortState>) -> Plan {
    let mut plan = Plan {
        wanted: BTreeMap::new(),
        desired_kept: BTreeMap::new(),
        conflicts: Vec::new(),
    };
    let mut claimed: BTreeMap<ServiceKey, String> = BTreeMap::new();
    for (id, st) in ports {
        let name = id.to_string();
        let wanted = WantedPort::of(st);
        plan.desired_kept
            .insert(name.clone(), wanted.kept.keys().copied().collect());
        let conflict = wanted.frontends.keys().find_map(|key| {
            claimed
                .get(key)
                .filter(|other| **other != name)
                .map(|other| (key, other))
        });
        if let Some((key, other)) = conflict {
            plan.conflicts.push(ServiceFailure {
                service: name,
                shortage: Shortage::FrontendConflict {
                    frontend: crate::maps::fmt_key(key),
                    other: other.clone(),
                },
            });
            continue;
        }
        for key in wanted.frontends.keys() {
            claimed.insert(*key, name.clone());
        }
        plan.wanted.insert(name, wanted);
    }
    plan
}

// ---------------------------------------------------------------------------------------
// Maglev sizing and slots: the one place that calls crate::maglev.
// ---------------------------------------------------------------------------------------

/// How much larger than needed a table may stay before it is shrunk.
pub(super) const MAGLEV_SHRINK_FACTOR: u32 = 4;

/// The table size for `n` endpoints, keeping the current size while it is still large
/// enough (>= the rung `n` needs, see `maglev::table_size`) and not wastefully large (at
/// most two rungs above it). Maglev only remaps little more than 1/N of the slots when one
/// of N backends changes if the table keeps its size; a new size reshuffles nearly every
/// slot, so new flows of unchanged backends would land elsewhere. Growing past a rung
/// cannot avoid that; shrinking waits until the table is 4x larger than needed.
pub(super) fn stable_maglev_size(n: usize, current: Option<u32>) -> u32 {
    let needed = crate::maglev::table_size(n);
    match current {
        Some(c) if c >= needed && c <= needed.saturating_mul(MAGLEV_SHRINK_FACTOR) => c,
        _ => needed,
    }
}

/// The size of a table of `members` (0, no range, for none) given its current size.
pub(super) fn table_size(members: &BTreeSet<BackendIdentity>, current: Option<u32>) -> u32 {
    if members.is_empty() {
        0
    } else {
        stable_maglev_size(members.len(), current)
    }
}

/// The MAGLEV slots of a table of `members` with `size` slots, as backend ids (`id_of`);
/// a member without an id gets `BACKEND_NONE`, which the data path drops.
pub(super) fn table_slots(
    members: &BTreeSet<BackendIdentity>,
    size: u32,
    id_of: impl Fn(&BackendIdentity) -> Option<u32>,
) -> Vec<u32> {
    // The model's order, (address, port), so the table is the one maglev.rs documents for
    // these endpoints.
    let mut order: Vec<BackendIdentity> = members.iter().copied().collect();
    order.sort_by_key(|b| (addr_from_map(&b.0), u16::from_be(b.1)));
    let ids: Vec<u32> = order
        .iter()
        .map(|b| id_of(b).unwrap_or(BACKEND_NONE))
        .collect();
    let names: Vec<Vec<u8>> = order.iter().map(maglev_name).collect();
    crate::maglev::build_table(&names, size)
        .into_iter()
        .map(|i| ids.get(i as usize).copied().unwrap_or(BACKEND_NONE))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn ep(addr: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: addr.parse().expect("test address"),
            port,
            target: None,
        }
    }

    fn lb(addr: &str) -> Frontend {
        Frontend {
            addr: addr.parse().expect("test address"),
            port: 80,
            protocol: Protocol::Tcp,
            kind: FrontendKind::LoadBalancer,
        }
    }

    #[test]
    fn table_index_is_undone_by_family_and_scope_of_table() {
        use super::super::keys::{family_of_table, scope_of_table};
        let mut seen = BTreeSet::new();
        for fam in 0..FAMILIES {
            for scope in [SCOPE_CLUSTER, SCOPE_LOCAL] {
                let index = table_index(fam, scope);
                assert!(index < TABLES_PER_PORT);
                assert_eq!(
                    (family_of_table(index), scope_of_table(index)),
                    (fam, scope)
                );
                seen.insert(index);
            }
        }
        assert_eq!(seen.len(), TABLES_PER_PORT);
    }

    #[test]
    fn table_size_stays_within_a_factor_of_four_and_then_shrinks() {
        let needed = crate::maglev::table_size(10);
        assert_eq!(stable_maglev_size(10, None), needed);
        assert_eq!(stable_maglev_size(10, Some(needed * 3)), needed * 3);
        assert_eq!(stable_maglev_size(10, Some(needed * 5)), needed);
        assert_eq!(stable_maglev_size(10, Some(needed - 1)), needed);
        assert_eq!(table_size(&BTreeSet::new(), Some(needed)), 0);
    }

    #[test]
    fn a_local_frontend_drops_only_while_its_family_has_remote_endpoints() {
        let mut st = ServicePortState {
            frontends: vec![lb("198.18.200.1"), lb("2001:db8:200::1")],
            endpoints: vec![ep("198.18.1.1", 80)],
            external_local: true,
            ..Default::default()
        };
        let flags = |st: &ServicePortState| -> Vec<u32> {
            WantedPort::of(st)
                .frontends
                .values()
                .map(|v| v.flags & SVC_F_DROP_IF_EMPTY)
                .collect()
        };
        // IPv4 has a remote endpoint only: drop; IPv6 has none at all: refuse.
        assert_eq!(flags(&st), [SVC_F_DROP_IF_EMPTY, 0]);
        st.local_endpoints = vec![ep("198.18.1.1", 80)];
        assert_eq!(flags(&st), [0, 0]);
    }

    #[test]
    fn draining_endpoints_are_kept_out_of_every_table() {
        let st = ServicePortState {
            frontends: vec![lb("198.18.200.1")],
            endpoints: vec![ep("198.18.1.1", 80)],
            local_endpoints: vec![ep("198.18.1.1", 80)],
            draining: vec![ep("198.18.1.2", 80), ep("2001:db8::2", 80)],
            ..Default::default()
        };
        let wanted = WantedPort::of(&st);
        let kept: Vec<BackendIdentity> = wanted.kept.keys().copied().collect();
        // The IPv6 one has no frontend of its family: not kept.
        assert_eq!(kept, [backend_identity(&ep("198.18.1.2", 80))]);
        assert_eq!(wanted.backends().len(), 2);
    }

    #[test]
    fn a_frontend_claimed_twice_stays_with_the_first_port_by_name() {
        let id = |name: &str| ServicePortId::new("default", name, "", Protocol::Tcp);
        let st = ServicePortState {
            frontends: vec![lb("198.18.200.1")],
            ..Default::default()
        };
        let (a, b) = (id("a"), id("b"));
        let ports = BTreeMap::from([(&a, &st), (&b, &st)]);
        let plan = plan_ports(&ports);
        assert_eq!(plan.wanted.keys().collect::<Vec<_>>(), ["default/a:-/TCP"]);
        assert_eq!(plan.conflicts.len(), 1);
        assert_eq!(plan.conflicts[0].service, "default/b:-/TCP");
        assert!(plan.desired_kept.contains_key("default/b:-/TCP"));
    }
}
