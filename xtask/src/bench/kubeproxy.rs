//! The services the `forward` and `tcp` suites install, and the same services as kube-proxy
//! would program them: an iptables-restore file shaped like kube-proxy's iptables mode and
//! an `nft -f` file shaped like its nftables mode (1.31). The baselines must be what a node
//! running kube-proxy really does per packet, so the chains, matches, marks and masquerade
//! are reproduced rule for rule; only what this topology cannot exercise (NodePorts, load
//! balancer firewalls, services without endpoints) is reduced to its empty chains and maps.

use crate::e2e::{EndpointSpec, PortSpec, ServiceSpec};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Pod addresses live here (the topology's POD_RANGE_V4): kube-proxy's `--cluster-cidr`,
/// which decides which sources are masqueraded.
pub const CLUSTER_CIDR: &str = "198.18.1.0/24";
/// The service CIDR the VIPs are allocated from (inside the topology's VIP range).
pub const SERVICE_CIDR: &str = "198.19.0.0/16";

/// `services` service ports of one protocol. The first `hot` carry the traffic and have two
/// endpoints (so kube-proxy's random choice is there: `statistic` / `numgen`); the others
/// have one (Maglev slots: 10,000 service ports with two endpoints each would not fit
/// MAGLEV_SLOTS).
#[derive(Clone, Debug)]
pub struct Plan {
    pub services: usize,
    pub hot: usize,
    /// "UDP" or "TCP".
    pub protocol: &'static str,
    pub port: u16,
    pub target_port: u16,
    /// (address, pod name) of every pod.
    pub pods: Vec<(Ipv4Addr, String)>,
}

impl Plan {
    /// VIP of service port `i`: 198.19.0.1 onwards, so the hot ones are consecutive.
    pub fn vip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + i as u32)
    }

    pub fn name(i: usize) -> String {
        format!("svc-{i}")
    }

    /// Pod indices of service port `i`'s endpoints.
    pub fn endpoints(&self, i: usize) -> Vec<usize> {
        let n = self.pods.len().max(1);
        if i < self.hot && n > 1 {
            (0..n.min(2)).collect()
        } else {
            vec![i % n]
        }
    }

    fn proto_lc(&self) -> String {
        self.protocol.to_lowercase()
    }

    /// The services file for lb-agent (v1/Service + EndpointSlice, as kubectl prints them).
    pub fn specs(&self) -> Vec<ServiceSpec> {
        (0..self.services)
            .map(|i| {
                let mut s = ServiceSpec::new(
                    &Self::name(i),
                    vec![PortSpec::new(
                        &self.proto_lc(),
                        self.port,
                        self.target_port,
                        self.protocol,
                    )],
                );
                s.namespace = "bench".into();
                s.cluster_ips = vec![Self::vip(i).into()];
                s.endpoints = self
                    .endpoints(i)
                    .into_iter()
                    .map(|p| EndpointSpec::ready(self.pods[p].0, &self.pods[p].1))
                    .collect();
                s
            })
            .collect()
    }

    /// The order of the service ports in KUBE-SERVICES. kube-proxy writes them in Go map
    /// order (effectively random), so a service's rule sits on average halfway down the
    /// chain; the hot ones are spread evenly through it to give the same average.
    pub fn chain_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (self.hot..self.services).collect();
        let (n, k) = (self.services, self.hot.max(1));
        for j in (0..self.hot).rev() {
            let pos = (j * n / k + n / (2 * k)).min(order.len());
            order.insert(pos, j);
        }
        order
    }

    /// `ns/name:port` as kube-proxy names a service port.
    fn port_name(&self, i: usize) -> String {
        format!("bench/{}:{}", Self::name(i), self.proto_lc())
    }

    /// iptables-restore input of kube-proxy's iptables mode for this plan (nat and filter
    /// tables, as `iptables-save` shows them on a kube-proxy node, 1.28+).
    pub fn iptables(&self) -> String {
        let mut rules = IptablesRules::default();
        for i in self.chain_order() {
            self.iptables_service(i, &mut rules);
        }
        rules.file()
    }

    /// Service port `i`'s chains: its KUBE-SERVICES rule, its KUBE-SVC chain choosing an
    /// endpoint, and a KUBE-SEP chain per endpoint.
    fn iptables_service(&self, i: usize, out: &mut IptablesRules) {
        let p = self.proto_lc();
        let IptablesRules {
            chains,
            rules,
            svc_rules,
        } = out;
        let spn = self.port_name(i);
        let vip = Self::vip(i);
        let svc = format!("KUBE-SVC-{}", hash_name(&format!("{spn}{p}")));
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p {p} -m comment --comment \"{spn} cluster IP\" \
             -m {p} --dport {} -j {svc}",
            self.port
        );
        let _ = writeln!(
            svc_rules,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p {p} -m comment --comment \"{spn} \
             cluster IP\" -m {p} --dport {} -j KUBE-MARK-MASQ",
            self.port
        );
        let eps = self.endpoints(i);
        for (k, &e) in eps.iter().enumerate() {
            let ep = format!("{}:{}", self.pods[e].0, self.target_port);
            let sep = format!("KUBE-SEP-{}", hash_name(&format!("{spn}{p}{ep}")));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            // kube-proxy: endpoint k of n is taken with probability 1/(n-k); the last
            // one unconditionally.
            let left = eps.len() - k;
            if left > 1 {
                let _ = writeln!(
                    svc_rules,
                    "-A {svc} -m comment --comment \"{spn} -> {ep}\" -m statistic --mode \
                     random --probability {:.11} -j {sep}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(
                    svc_rules,
                    "-A {svc} -m comment --comment \"{spn} -> {ep}\" -j {sep}"
                );
            }
            let _ = writeln!(
                svc_rules,
                "-A {sep} -s {}/32 -m comment --comment \"{spn}\" -j KUBE-MARK-MASQ",
                self.pods[e].0
            );
            let _ = writeln!(
                svc_rules,
                "-A {sep} -p {p} -m comment --comment \"{spn}\" -m {p} -j DNAT \
                 --to-destination {ep}"
            );
        }
    }

    /// `nft -f` input of kube-proxy's nftables mode for this plan (table `ip kube-proxy`).
    /// Hook priorities are numeric (dstnat = -100, srcnat = 100; kube-proxy's
    /// `dstnat - 10` is -110): Debian 12's nft 1.0.6 refuses the named forms on some hooks.
    pub fn nftables(&self) -> String {
        let mut s = String::new();
        s.push_str(NFT_TABLE);
        let _ = writeln!(
            s,
            "add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \
             \"Reject traffic to invalid ports of ClusterIPs\"\n\
             add rule ip kube-proxy cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop \
             comment \"Drop traffic to unallocated ClusterIPs\""
        );
        for i in 0..self.services {
            self.nftables_service(i, &mut s);
        }
        s
    }

    /// Service port `i`'s chain choosing an endpoint, an endpoint chain per endpoint, and
    /// its elements in the cluster-ips set and the service-ips map.
    fn nftables_service(&self, i: usize, s: &mut String) {
        let p = self.proto_lc();
        let vip = Self::vip(i);
        let name = Self::name(i);
        let sp = format!("bench/{name}/{p}/{p}");
        let svc = format!("service-{}-{sp}", &hash_name(&sp)[..8]);
        let _ = writeln!(s, "add chain ip kube-proxy {svc}");
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {svc} ip daddr {vip} {p} dport {} ip saddr != \
             {CLUSTER_CIDR} jump mark-for-masquerade",
            self.port
        );
        let eps = self.endpoints(i);
        let mut vmap = Vec::new();
        for (k, &e) in eps.iter().enumerate() {
            let ip = self.pods[e].0;
            let ep_name = format!("{sp}__{ip}/{}", self.target_port);
            let chain = format!("endpoint-{}-{ep_name}", &hash_name(&ep_name)[..8]);
            let _ = writeln!(s, "add chain ip kube-proxy {chain}");
            let _ = writeln!(
                s,
                "add rule ip kube-proxy {chain} ip saddr {ip} jump mark-for-masquerade"
            );
            let _ = writeln!(
                s,
                "add rule ip kube-proxy {chain} meta l4proto {p} dnat to {ip}:{}",
                self.target_port
            );
            vmap.push(format!("{k} : goto {chain}"));
        }
        let _ = writeln!(
            s,
            "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
            eps.len(),
            vmap.join(" , ")
        );
        let _ = writeln!(s, "add element ip kube-proxy cluster-ips {{ {vip} }}");
        let _ = writeln!(
            s,
            "add element ip kube-proxy service-ips {{ {vip} . {p} . {} : goto {svc} }}",
            self.port
        );
    }
}

/// kube-proxy's table with its fixed sets, maps, chains and rules, which every service's
/// chains hang off.
const NFT_TABLE: &str = "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n\
             add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n\
             add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }\n\
             add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n\
             add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n\
             add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }\n\
             add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }\n\
             add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }\n\
             add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }\n\
             add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }\n\
             add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n\
             add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }\n\
             add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }\n\
             add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n\
             add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
             add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n\
             add chain ip kube-proxy firewall-check\n\
             add chain ip kube-proxy service-endpoints-check\n\
             add chain ip kube-proxy nodeport-endpoints-check\n\
             add chain ip kube-proxy cluster-ips-check\n\
             add chain ip kube-proxy services\n\
             add chain ip kube-proxy masquerading\n\
             add chain ip kube-proxy mark-for-masquerade\n\
             add chain ip kube-proxy reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }\n\
             add rule ip kube-proxy filter-prerouting ct state new jump firewall-check\n\
             add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check\n\
             add rule ip kube-proxy filter-input ct state new jump service-endpoints-check\n\
             add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check\n\
             add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check\n\
             add rule ip kube-proxy filter-output ct state new jump service-endpoints-check\n\
             add rule ip kube-proxy filter-output ct state new jump firewall-check\n\
             add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check\n\
             add rule ip kube-proxy nat-prerouting jump services\n\
             add rule ip kube-proxy nat-output jump services\n\
             add rule ip kube-proxy nat-postrouting jump masquerading\n\
             add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
             add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
             add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\
             add rule ip kube-proxy reject-chain reject\n\
             add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
             add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n\
             add rule ip kube-proxy masquerading mark set mark xor 0x4000\n\
             add rule ip kube-proxy masquerading masquerade fully-random\n\
             add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
             add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n";

/// What [`Plan::iptables`] writes per service port, gathered per place in the file.
#[derive(Default)]
struct IptablesRules {
    /// `:CHAIN - [0:0]` declarations of the KUBE-SVC and KUBE-SEP chains.
    chains: String,
    /// KUBE-SERVICES' rules, in chain order.
    rules: String,
    /// The KUBE-SVC and KUBE-SEP chains' rules.
    svc_rules: String,
}

impl IptablesRules {
    /// The whole iptables-restore file: kube-proxy's fixed chains around the services'.
    fn file(&self) -> String {
        let Self {
            chains,
            rules,
            svc_rules,
        } = self;
        format!(
        "*filter\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-FIREWALL - [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         :KUBE-KUBELET-CANARY - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-PROXY-CANARY - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A INPUT -j KUBE-FIREWALL\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -j KUBE-FIREWALL\n\
         -A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n\
         *nat\n\
         :KUBE-KUBELET-CANARY - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-PROXY-CANARY - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         {chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         {rules}\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         {svc_rules}\
         COMMIT\n"
    )
    }
}

/// 16 characters of base32 over a hash of `s`, as kube-proxy names its chains (it uses
/// SHA-256; any stable hash gives names of the same shape and length).
fn hash_name(s: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        s.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let bits = (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x8422_2325));
    (0..16)
        .map(|k| ALPHABET[((bits >> (5 * k)) & 31) as usize] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(services: usize, hot: usize) -> Plan {
        Plan {
            services,
            hot,
            protocol: "UDP",
            port: 80,
            target_port: 8080,
            pods: vec![
                (Ipv4Addr::new(198, 18, 1, 1), "pod-1".into()),
                (Ipv4Addr::new(198, 18, 1, 2), "pod-2".into()),
            ],
        }
    }

    #[test]
    fn chain_order_is_a_permutation_with_hot_services_spread() {
        let p = plan(1000, 8);
        let o = p.chain_order();
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        let pos: Vec<usize> = (0..8)
            .map(|j| {
                o.iter()
                    .position(|&x| x == j)
                    .expect("hot service in order")
            })
            .collect();
        let mean = pos.iter().sum::<usize>() as f64 / 8.0;
        assert!((mean - 500.0).abs() < 60.0, "hot services at {pos:?}");
    }

    #[test]
    fn iptables_rules_have_kube_proxy_shape() {
        let t = plan(3, 1).iptables();
        assert_eq!(t.matches("-j KUBE-SVC-").count(), 3);
        assert_eq!(t.matches("-j DNAT --to-destination").count(), 4);
        assert_eq!(
            t.matches("-m statistic --mode random --probability 0.50000000000")
                .count(),
            1
        );
        assert!(t.contains("-j MASQUERADE --random-fully"));
        assert!(t.contains("! -s 198.18.1.0/24 -d 198.19.0.1/32 -p udp"));
    }

    /// Both rulesets load into a real namespace's netfilter as generated (the kernel and
    /// the tools are the judges of the syntax), and read back with kube-proxy's chains.
    #[test]
    fn rulesets_load_into_a_namespace() {
        struct Ns(String);
        impl Drop for Ns {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .status();
            }
        }
        let ns = Ns(format!("xdplb-kp-test-{}", std::process::id()));
        crate::netns::ip(&["netns", "add", &ns.0]).expect("ip netns add (needs root)");
        let dir = std::env::temp_dir().join(&ns.0);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let p = plan(5, 2);
        let ipt = dir.join("iptables.rules");
        std::fs::write(&ipt, p.iptables()).expect("writing iptables rules");
        crate::netns::run(crate::netns::in_ns(&ns.0, "iptables-restore").arg(&ipt))
            .expect("iptables-restore accepts the rules");
        let saved =
            crate::netns::ns_run(&ns.0, &["iptables-save", "-t", "nat"]).expect("iptables-save");
        assert_eq!(saved.matches("-j DNAT").count(), 7, "{saved}");
        let nft = dir.join("nftables.rules");
        std::fs::write(&nft, p.nftables()).expect("writing nftables rules");
        crate::netns::run(crate::netns::in_ns(&ns.0, "nft").arg("-f").arg(&nft))
            .expect("nft -f accepts the rules");
        let listed = crate::netns::ns_run(
            &ns.0,
            &["nft", "list", "map", "ip", "kube-proxy", "service-ips"],
        )
        .expect("nft list map");
        assert_eq!(listed.matches(": goto service-").count(), 5, "{listed}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nftables_rules_use_verdict_maps() {
        let t = plan(2, 1).nftables();
        assert!(t.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(t.contains("numgen random mod 1 vmap { 0 : goto endpoint-"));
        assert_eq!(
            t.matches("add element ip kube-proxy service-ips").count(),
            2
        );
    }
}
