//! Service sets for the ClusterIP benchmark, written two ways: kube-proxy's
//! iptables nat table (as `iptables-restore` input, the structure of
//! pkg/proxy/iptables/proxier.go: KUBE-SERVICES -> KUBE-SVC-* with
//! `statistic --mode random` -> KUBE-SEP-* DNAT, with the KUBE-MARK-MASQ
//! and KUBE-POSTROUTING rules), and as Service + EndpointSlice manifests
//! for `dataplane apply`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// One ClusterIP service, TCP port 80 -> 8080, with its endpoints.
#[derive(Clone, Debug)]
pub struct BenchService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub endpoints: Vec<Ipv4Addr>,
}

pub const SVC_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;

/// The i-th filler service: VIP 10.96.0.0 + 1 + i, endpoints in
/// 10.250.0.0/16 (never contacted).
pub fn filler(i: u32) -> BenchService {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i);
    let ep =
        |k: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + (i * 3 + k) % 65_000 + 1);
    BenchService {
        name: format!("fill-{i:05}"),
        vip,
        endpoints: vec![ep(0), ep(1), ep(2)],
    }
}

/// A measured service: VIP in 10.100.0.0/16, real endpoints.
pub fn target(n: u32, endpoints: &[Ipv4Addr]) -> BenchService {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + 1 + n);
    BenchService {
        name: format!("target-{n:05}"),
        vip,
        endpoints: endpoints.to_vec(),
    }
}

/// kube-proxy's chain name suffix: 16 base32 characters of a hash of the
/// service port (kube-proxy: sha256 of "ns/name:port" + protocol).
fn chain_hash(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut out = String::with_capacity(16);
    for round in 0..2u8 {
        for b in s.bytes().chain([round]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut x = h;
        for _ in 0..8 {
            out.push(A[(x & 31) as usize] as char);
            x >>= 5;
        }
    }
    out
}

/// The whole nat table for these services, as kube-proxy's full sync
/// writes it. `cluster_cidr` is the pod network (`! -s` masquerade rule).
pub fn iptables_nat(services: &[BenchService], cluster_cidr: &str) -> String {
    iptables_nat_with_nodeports(services, &[], cluster_cidr, |_| true)
}

/// A NodePort Service (kube-proxy's iptables mode): its ClusterIP rules
/// plus KUBE-NODEPORTS -> KUBE-EXT-* (KUBE-MARK-MASQ, then KUBE-SVC-*; with
/// `externalTrafficPolicy: Local`, KUBE-SVL-* over the node's own
/// endpoints and no masquerade for external clients).
#[derive(Clone, Debug)]
pub struct NodePortService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub node_port: u16,
    /// `externalTrafficPolicy: Local`.
    pub local: bool,
    pub endpoints: Vec<Ipv4Addr>,
}

/// kube-proxy's nat table with `services` (ClusterIP) and `nodeports`, as
/// one node's kube-proxy writes it: `is_local` says which endpoints run on
/// this node (KUBE-SVL-* of `externalTrafficPolicy: Local` Services).
pub fn iptables_nat_with_nodeports(
    services: &[BenchService],
    nodeports: &[NodePortService],
    cluster_cidr: &str,
    is_local: impl Fn(Ipv4Addr) -> bool,
) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut svc_rules = String::new();
    let mut np_rules = String::new();
    for np in nodeports {
        nodeport_rules(
            np,
            cluster_cidr,
            &is_local,
            &mut chains,
            &mut svc_rules,
            &mut np_rules,
            &mut rules,
        );
    }
    for s in services {
        let port_name = format!("default/{}:http", s.name);
        let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{port_name}tcp")));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            svc_rules,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {SVC_PORT} -j {svc_chain}",
            vip = s.vip
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {cluster_cidr} -d {vip}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {SVC_PORT} -j KUBE-MARK-MASQ",
            vip = s.vip
        );
        let n = s.endpoints.len();
        for (k, ep) in s.endpoints.iter().enumerate() {
            let sep = format!(
                "KUBE-SEP-{}",
                chain_hash(&format!("{port_name}tcp{ep}:{TARGET_PORT}"))
            );
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = n - k;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{port_name} -> {ep}:{TARGET_PORT}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{port_name} -> {ep}:{TARGET_PORT}\" -j {sep}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {ep}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{port_name}\" -m tcp -j DNAT --to-destination {ep}:{TARGET_PORT}"
            );
        }
    }
    let mut t = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n",
    );
    t.push_str(&chains);
    t.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    t.push_str(&svc_rules);
    t.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    t.push_str(&np_rules);
    t.push_str(&rules);
    t.push_str("COMMIT\n");
    t
}

/// Service + EndpointSlice manifests (YAML) for `dataplane apply`.
pub fn manifests(services: &[BenchService]) -> String {
    let mut y = String::new();
    for s in services {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {vip}\n  ports:\n  - name: http\n    protocol: TCP\n    port: {SVC_PORT}\n    targetPort: {TARGET_PORT}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abc\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - name: http\n    protocol: TCP\n    port: {TARGET_PORT}\nendpoints:\n",
            name = s.name,
            vip = s.vip
        );
        for ep in &s.endpoints {
            let _ = write!(
                y,
                "  - addresses: [\"{ep}\"]\n    conditions:\n      ready: true\n"
            );
        }
    }
    y
}

/// The rules of one NodePort Service (pkg/proxy/iptables/proxier.go's
/// shape: KUBE-SERVICES for the ClusterIP, KUBE-NODEPORTS -> KUBE-EXT-*,
/// KUBE-SVC-* (and KUBE-SVL-* for the Local policy) -> KUBE-SEP-* DNAT).
fn nodeport_rules(
    np: &NodePortService,
    cluster_cidr: &str,
    is_local: &impl Fn(Ipv4Addr) -> bool,
    chains: &mut String,
    svc_rules: &mut String,
    np_rules: &mut String,
    rules: &mut String,
) {
    let port_name = format!("default/{}:p{}", np.name, np.port);
    let hash = chain_hash(&format!("{port_name}tcp"));
    let (svc, svl, ext) = (
        format!("KUBE-SVC-{hash}"),
        format!("KUBE-SVL-{hash}"),
        format!("KUBE-EXT-{hash}"),
    );
    let _ = writeln!(chains, ":{svc} - [0:0]\n:{ext} - [0:0]");
    if np.local {
        let _ = writeln!(chains, ":{svl} - [0:0]");
    }
    let _ = writeln!(
        svc_rules,
        "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {port} -j {svc}",
        vip = np.vip,
        port = np.port
    );
    let _ = writeln!(
        np_rules,
        "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{port_name}\" -m tcp --dport {} -j {ext}",
        np.node_port
    );
    if np.local {
        let _ = writeln!(
            rules,
            "-A {ext} -s {cluster_cidr} -m comment --comment \"pod traffic for {port_name} external destinations\" -j {svc}\n\
             -A {ext} -m comment --comment \"masquerade LOCAL traffic for {port_name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ\n\
             -A {ext} -m comment --comment \"route LOCAL traffic for {port_name} external destinations\" -m addrtype --src-type LOCAL -j {svc}\n\
             -A {ext} -j {svl}"
        );
    } else {
        let _ = writeln!(
            rules,
            "-A {ext} -m comment --comment \"masquerade traffic for {port_name} external destinations\" -j KUBE-MARK-MASQ\n\
             -A {ext} -j {svc}"
        );
    }
    let _ = writeln!(
        rules,
        "-A {svc} ! -s {cluster_cidr} -d {vip}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ",
        vip = np.vip,
        port = np.port
    );
    let sep_of = |ep: Ipv4Addr| {
        format!(
            "KUBE-SEP-{}",
            chain_hash(&format!("{port_name}tcp{ep}:{}", np.target_port))
        )
    };
    // Probabilities over a chain's endpoints: 1/n, 1/(n-1), ..., then the last.
    let spread = |rules: &mut String, chain: &str, eps: &[Ipv4Addr]| {
        for (k, ep) in eps.iter().enumerate() {
            let left = eps.len() - k;
            let sep = sep_of(*ep);
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {chain} -m comment --comment \"{port_name} -> {ep}:{}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    np.target_port,
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {chain} -m comment --comment \"{port_name} -> {ep}:{}\" -j {sep}",
                    np.target_port
                );
            }
        }
    };
    spread(rules, &svc, &np.endpoints);
    if np.local {
        let local: Vec<Ipv4Addr> = np
            .endpoints
            .iter()
            .copied()
            .filter(|e| is_local(*e))
            .collect();
        // With no local endpoint the chain stays empty: kube-proxy drops
        // such packets in the filter table (KUBE-EXTERNAL-SERVICES), which
        // this nat-only table leaves out.
        spread(rules, &svl, &local);
    }
    for ep in &np.endpoints {
        let sep = sep_of(*ep);
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {sep} -s {ep}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p tcp -m comment --comment \"{port_name}\" -m tcp -j DNAT --to-destination {ep}:{}",
            np.target_port
        );
    }
}

/// NodePort Services + EndpointSlices (YAML) for `dataplane apply`: `type:
/// NodePort`, the explicit `nodePort`, `externalTrafficPolicy`.
pub fn nodeport_manifests(nps: &[NodePortService]) -> String {
    let mut y = String::new();
    for s in nps {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: {vip}\n  externalTrafficPolicy: {etp}\n  ports:\n  - name: p{port}\n    protocol: TCP\n    port: {port}\n    targetPort: {tp}\n    nodePort: {np}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abc\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - name: p{port}\n    protocol: TCP\n    port: {tp}\nendpoints:\n",
            name = s.name,
            vip = s.vip,
            etp = if s.local { "Local" } else { "Cluster" },
            port = s.port,
            tp = s.target_port,
            np = s.node_port,
        );
        for ep in &s.endpoints {
            let _ = write!(
                y,
                "  - addresses: [\"{ep}\"]\n    conditions:\n      ready: true\n"
            );
        }
    }
    y
}
