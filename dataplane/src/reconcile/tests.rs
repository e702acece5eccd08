//! The reconciler against an in-memory kernel: write order, write counts,
//! resyncs and recovery from failed writes. No root, no BPF.
//!
//! [`Fake`] keeps the maps as the kernel would and a copy of them after
//! every write, so a test can check that every state a packet could see
//! in between is safe ([`check_transition`]), not only the end state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane_common::{
    AffinityKey, Backend, EndpointInfo, EndpointKey, NODE_CFG_BPF_LOG, NODE_CFG_READY, NodeConfig,
    PROTO_TCP, PROTO_UDP, PeerInfo, PeerIpInfo, PeerIpKey, PodPortInfo, PodPortKey, SVC_F_AFFINITY,
    SvcKey,
};
use ipnet::Ipv4Net;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{
    FrontendState, Frontends, MapState, Peer, Peers, PodEntry, Pods, Reconciler, Resync, Sink,
    desired::{self, NodeFacts},
    plan,
    state::addr,
};
use crate::{
    bpf::{MapError, MapOp, PeerEntries, ServiceEntries},
    services::ServiceName,
};

// ---------------------------------------------------------------- fake

/// The maps as the kernel holds them.
#[derive(Default)]
struct Fake {
    kernel: MapState,
    affinity: BTreeSet<(u32, [u8; 4])>,
    endpoints: BTreeMap<[u8; 4], EndpointInfo>,
    /// Writes that took effect, in order.
    applied: Vec<MapOp>,
    /// `kernel` after each of them (when `snapshots`).
    states: Vec<MapState>,
    snapshots: bool,
    /// Calls to `apply` so far; the one with this index fails.
    calls: usize,
    fail_at: Option<usize>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            snapshots: true,
            ..Fake::default()
        }
    }

    /// Forgets the writes seen so far (the state stays).
    fn take_ops(&mut self) -> Vec<MapOp> {
        self.states.clear();
        std::mem::take(&mut self.applied)
    }

    /// Makes the `n`th `apply` call from now fail.
    fn fail_in(&mut self, n: usize) {
        self.fail_at = Some(self.calls + n);
    }
}

impl Sink for Fake {
    fn apply(&mut self, op: &MapOp) -> Result<(), MapError> {
        let call = self.calls;
        self.calls += 1;
        if self.fail_at == Some(call) {
            return Err(MapError::Full);
        }
        let k = &self.kernel;
        let exists = match op {
            MapOp::DelPeerIp(key) => k.peer_ips.contains_key(&key.public_ip),
            MapOp::DelPeer(net) => k.peers.contains_key(net),
            MapOp::DelService(key) => k.services.contains_key(key),
            MapOp::DelBackend(key) => k.slot(key.svc_id, key.slot).is_some(),
            MapOp::DelVip(key) => k.vips.contains_key(&key.vip),
            MapOp::DelLive(key) => k.live.contains(&(key.svc_id, addr(&key.backend))),
            MapOp::DelSvcStats(_) => false,
            MapOp::DelMaglev(key) => k.maglev.contains_key(&key.svc_id),
            MapOp::DelAffinity(key) => self.affinity.remove(&(key.svc_id, key.client)),
            MapOp::DelEndpoint(key) => self.endpoints.remove(&key.ip).is_some(),
            MapOp::DelPodPort(key) => k.pod_ports.contains_key(&key.ifindex),
            MapOp::PutEndpoint(key, v) => {
                self.endpoints.insert(key.ip, *v);
                true
            }
            _ => true,
        };
        // A delete of a missing key is seen by the reconciler as done.
        if exists {
            self.kernel.record(op);
        }
        self.applied.push(*op);
        if self.snapshots {
            self.states.push(self.kernel.clone());
        }
        if exists {
            Ok(())
        } else {
            Err(MapError::NotFound)
        }
    }

    fn peer_entries(&self) -> Result<PeerEntries, MapError> {
        Ok(PeerEntries {
            peers: self.kernel.peers.iter().map(|(k, v)| (*k, *v)).collect(),
            peer_ips: self
                .kernel
                .peer_ips
                .iter()
                .map(|(ip, n)| (PeerIpKey { public_ip: *ip }, PeerIpInfo { leases: *n }))
                .collect(),
        })
    }

    fn service_entries(&self) -> Result<ServiceEntries, MapError> {
        let k = &self.kernel;
        Ok(ServiceEntries {
            services: k.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: k
                .slots
                .iter()
                .map(|((id, slot), b)| (super::state::backend_key(*id, *slot), *b))
                .collect(),
            vips: k
                .vips
                .iter()
                .map(|(v, n)| (super::state::vip_key(*v), super::state::vip_info(*n)))
                .collect(),
            live: k
                .live
                .iter()
                .map(|(id, a)| super::state::live_key(*id, *a))
                .collect(),
            affinity: self
                .affinity
                .iter()
                .map(|(svc_id, client)| AffinityKey {
                    svc_id: *svc_id,
                    client: *client,
                })
                .collect(),
        })
    }

    fn endpoint_entries(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>, MapError> {
        Ok(self
            .endpoints
            .iter()
            .map(|(ip, v)| (EndpointKey { ip: *ip }, *v))
            .collect())
    }

    fn pod_port_entries(&self) -> Result<Vec<(PodPortKey, PodPortInfo)>, MapError> {
        Ok(self
            .kernel
            .pod_ports
            .iter()
            .map(|(i, v)| (PodPortKey { ifindex: *i }, *v))
            .collect())
    }
}

// ---------------------------------------------------------------- helpers

fn key(vip: [u8; 4], port: u16, proto: u8) -> SvcKey {
    SvcKey {
        vip,
        port: port.to_be_bytes(),
        proto,
        _pad: 0,
    }
}

const VIP: [u8; 4] = [10, 96, 0, 10];

fn be(last: u8) -> Backend {
    Backend {
        ip: [10, 244, 2, last],
        port: 8080u16.to_be_bytes(),
        _pad: [0; 2],
    }
}

fn fe(backends: &[u8]) -> FrontendState {
    FrontendState {
        backends: backends.iter().map(|b| be(*b)).collect(),
        affinity_timeout_s: None,
        north_south: None,
        empty_drops: false,
    }
}

fn svc(name: &str) -> ServiceName {
    ServiceName::new("default", name)
}

fn fronts(list: &[(SvcKey, FrontendState)]) -> Frontends {
    list.iter().cloned().collect()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn peer(ip: [u8; 4]) -> Peer {
    Peer {
        public_ip: Ipv4Addr::from(ip),
        vtep_mac: [2, 0xdb, ip[0], ip[1], ip[2], ip[3]],
    }
}

/// What the maps hold, without the shadow's bookkeeping (id allocator).
type Contents = (
    Option<NodeConfig>,
    BTreeMap<Ipv4Net, PeerInfo>,
    BTreeMap<[u8; 4], u32>,
    BTreeMap<SvcKey, dataplane_common::SvcInfo>,
    BTreeMap<(u32, u32), Backend>,
    BTreeSet<(u32, super::state::BackendAddr)>,
    BTreeMap<[u8; 4], u32>,
);

fn contents(m: &MapState) -> Contents {
    (
        m.node,
        m.peers.clone(),
        m.peer_ips.clone(),
        m.services.clone(),
        m.slots.clone(),
        m.live.clone(),
        m.vips.clone(),
    )
}

fn is_empty(m: &MapState) -> bool {
    contents(m) == contents(&MapState::default())
}

fn position(ops: &[MapOp], f: impl Fn(&MapOp) -> bool) -> usize {
    ops.iter()
        .position(f)
        .unwrap_or_else(|| panic!("op not found in {ops:#?}"))
}

fn counts(ops: &[MapOp]) -> (usize, usize) {
    let deletes = ops.iter().filter(|o| o.is_delete()).count();
    (ops.len() - deletes, deletes)
}

/// Runs one reconcile step and checks every state it passed through.
fn step(
    f: &mut Fake,
    run: impl FnOnce(&mut Fake) -> Result<(), super::ReconcileError>,
) -> Vec<MapOp> {
    f.take_ops();
    let before = f.kernel.clone();
    run(f).unwrap();
    check_transition(&before, &f.states, &f.kernel);
    f.take_ops()
}

/// A map state, short enough to read in a failure message.
fn brief(m: &MapState) -> String {
    let mut out = String::new();
    for (k, i) in &m.services {
        let slots: Vec<u8> = m.slots_of(i.id).map(|(_, b)| b.ip[3]).collect();
        let live: Vec<u8> = m.live_of(i.id).map(|a| a.0[3]).collect();
        out += &format!(
            "  {}: id {} count {} slots {slots:?} live {live:?}\n",
            crate::bpf::maps::Frontend(k),
            i.id,
            i.count
        );
    }
    out += &format!("  vips {:?}\n  orphans {:?}\n", m.vips, m.orphans());
    out
}

/// The rules of `plan`'s module doc, checked on every state between
/// `before` and `after`.
fn check_transition(before: &MapState, states: &[MapState], after: &MapState) {
    for (i, now) in states.iter().enumerate() {
        let at = || format!("after write {i}:\n{}", brief(now));
        for (k, info) in &now.services {
            for slot in 0..info.count {
                let b = now.slot(info.id, slot);
                let b =
                    b.unwrap_or_else(|| panic!("slot {slot} of {k:?} exposed but empty; {}", at()));
                // Every exposed backend is live: a new connection that
                // picks it is never reset for want of its pair.
                assert!(
                    now.live.contains(&(info.id, addr(b))),
                    "{b:?} exposed while not live; {}",
                    at()
                );
            }
        }
        let vips_with_frontend: BTreeSet<[u8; 4]> = now.services.keys().map(|k| k.vip).collect();
        for vip in now.vips.keys() {
            assert!(
                vips_with_frontend.contains(vip),
                "ClusterIP {vip:?} in vips without a frontend (dropped); {}",
                at()
            );
        }
        for k in before.services.keys() {
            if after.services.contains_key(k) {
                assert!(
                    now.services.contains_key(k),
                    "{k:?} missing midway; {}",
                    at()
                );
                assert!(
                    now.vips.contains_key(&k.vip),
                    "{k:?}'s ClusterIP missing midway; {}",
                    at()
                );
            }
        }
        for (n, p) in &now.peers {
            assert!(
                now.peer_ips.contains_key(&p.public_ip),
                "peer {n} points at a PublicIP that is not accepted; {}",
                at()
            );
        }
        for n in before.peers.keys() {
            if after.peers.contains_key(n) {
                assert!(
                    now.peers.contains_key(n),
                    "peer {n} missing midway; {}",
                    at()
                );
            }
        }
    }
}

/// What the service maps must hold for these Services, ids aside.
fn assert_services_match(kernel: &MapState, want: &BTreeMap<ServiceName, Frontends>) {
    let mut vips: BTreeMap<[u8; 4], u32> = BTreeMap::new();
    let mut n = 0;
    for fronts in want.values() {
        for (k, st) in fronts {
            n += 1;
            *vips.entry(k.vip).or_default() += 1;
            let info = kernel
                .services
                .get(k)
                .unwrap_or_else(|| panic!("{k:?} missing"));
            assert_eq!(info.count as usize, st.backends.len(), "{k:?}");
            assert_eq!(info.affinity_timeout_s, st.affinity_timeout_s.unwrap_or(0));
            assert_eq!(
                info.flags & SVC_F_AFFINITY != 0,
                st.affinity_timeout_s.is_some()
            );
            let slots: Vec<Backend> = kernel.slots_of(info.id).map(|(_, b)| *b).collect();
            assert_eq!(slots, st.backends, "slots of {k:?}");
            let live: BTreeSet<_> = kernel.live_of(info.id).collect();
            let want_live: BTreeSet<_> = st.backends.iter().map(addr).collect();
            assert_eq!(live, want_live, "live pairs of {k:?}");
        }
    }
    assert_eq!(kernel.services.len(), n, "no other frontends");
    assert_eq!(kernel.vips, vips, "ClusterIP refcounts");
    let ids: BTreeSet<u32> = kernel.services.values().map(|i| i.id).collect();
    assert_eq!(ids.len(), n, "one id per frontend");
    assert!(
        kernel.slots.keys().all(|(id, _)| ids.contains(id)),
        "no stray slots"
    );
    assert!(
        kernel.live.iter().all(|(id, _)| ids.contains(id)),
        "no stray pairs"
    );
}

// ---------------------------------------------------------------- services

#[test]
fn new_service_writes_live_then_slots_then_entry_then_clusterip() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let want = fronts(&[
        (key(VIP, 80, PROTO_TCP), fe(&[1, 2, 3])),
        (key(VIP, 443, PROTO_TCP), fe(&[1, 2, 3])),
    ]);
    let ops = step(&mut f, |f| r.set_service(f, &svc("web"), &want));
    // The count the e2e test `ten_thousand_services_then_one_more` bounds
    // (<= 16): 2 frontends x (3 live pairs + 3 slots + 1 entry) + one
    // ClusterIP write for both.
    assert_eq!(counts(&ops), (15, 0), "{ops:#?}");
    for k in [key(VIP, 80, PROTO_TCP), key(VIP, 443, PROTO_TCP)] {
        let entry = position(&ops, |o| matches!(o, MapOp::PutService(x, _) if *x == k));
        let MapOp::PutService(_, info) = ops[entry] else {
            unreachable!()
        };
        for b in [1, 2, 3] {
            let live = position(
                &ops,
                |o| matches!(o, MapOp::PutLive(l) if l.svc_id == info.id && l.backend == be(b)),
            );
            let slot = position(
                &ops,
                |o| matches!(o, MapOp::PutBackend(s, x) if s.svc_id == info.id && *x == be(b)),
            );
            assert!(live < slot && slot < entry, "{ops:#?}");
        }
    }
    let vip = position(&ops, |o| matches!(o, MapOp::PutVip(..)));
    assert_eq!(vip, ops.len() - 1, "the ClusterIP is exposed last");
    assert_eq!(f.kernel.vips[&VIP], 2);
    assert_services_match(&f.kernel, &[(svc("web"), want)].into());
}

#[test]
fn unchanged_input_writes_nothing() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let want = fronts(&[(key(VIP, 80, PROTO_TCP), fe(&[1, 2]))]);
    step(&mut f, |f| r.set_service(f, &svc("web"), &want));
    assert!(step(&mut f, |f| r.set_service(f, &svc("web"), &want)).is_empty());
    assert!(plan::service(&svc("web"), &want, r.shadow()).is_empty());

    let peers: Peers = [(net("10.244.2.0/24"), peer([192, 168, 0, 2]))].into();
    step(&mut f, |f| r.set_peers(f, &peers, Resync::Incremental));
    assert!(step(&mut f, |f| r.set_peers(f, &peers, Resync::Incremental)).is_empty());
    assert!(
        step(&mut f, |f| r.set_peers(f, &peers, Resync::Full)).is_empty(),
        "a full resync of a kernel that is right writes nothing"
    );

    let cfg = NodeConfig {
        flags: NODE_CFG_READY,
        ..Default::default()
    };
    assert_eq!(step(&mut f, |f| r.set_node(f, &cfg)).len(), 1);
    assert!(step(&mut f, |f| r.set_node(f, &cfg)).is_empty());
}

#[test]
fn replacing_a_backend_costs_one_live_delete_and_no_count_write() {
    // bpf_packets' removed_backend_flows_die_at_their_next_packet relies on
    // this: no conntrack scan, one live_v1 delete ends a's flows.
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let k = key(VIP, 80, PROTO_TCP);
    step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(k, fe(&[7]))]))
    });
    let id = r.shadow().maps.services[&k].id;
    let ops = step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(k, fe(&[8]))]))
    });
    assert_eq!(
        ops,
        vec![
            MapOp::PutLive(super::state::live_key(id, addr(&be(8)))),
            MapOp::PutBackend(super::state::backend_key(id, 0), be(8)),
            MapOp::DelLive(super::state::live_key(id, addr(&be(7)))),
        ]
    );
}

#[test]
fn shrinking_lowers_the_count_before_deleting_slots_and_ends_flows_last() {
    // The benchmark's "changed service (endpoints 3 -> 2)".
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let k = key(VIP, 80, PROTO_TCP);
    step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(k, fe(&[1, 2, 3]))]))
    });
    // The first backend goes: the others move down a slot.
    let ops = step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(k, fe(&[2, 3]))]))
    });
    assert!(
        matches!(ops.last(), Some(MapOp::DelLive(l)) if l.backend == be(1)),
        "{ops:#?}"
    );
    let count = position(
        &ops,
        |o| matches!(o, MapOp::PutService(_, i) if i.count == 2),
    );
    let del = position(&ops, |o| matches!(o, MapOp::DelBackend(s) if s.slot == 2));
    assert!(count < del, "{ops:#?}");
    assert_eq!(
        counts(&ops),
        (3, 2),
        "2 slots rewritten + count; pair + slot 2"
    );
    // The last backend goes: nothing moves.
    let ops = step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(k, fe(&[2]))]))
    });
    assert_eq!(counts(&ops), (1, 2), "{ops:#?}");
    // Growing writes the slot before the count exposes it.
    let ops = step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(k, fe(&[2, 4]))]))
    });
    let slot = position(
        &ops,
        |o| matches!(o, MapOp::PutBackend(s, _) if s.slot == 1),
    );
    let count = position(
        &ops,
        |o| matches!(o, MapOp::PutService(_, i) if i.count == 2),
    );
    let live = position(
        &ops,
        |o| matches!(o, MapOp::PutLive(l) if l.backend == be(4)),
    );
    assert!(live < slot && slot < count, "{ops:#?}");
}

#[test]
fn clusterip_goes_before_its_last_frontend_and_stays_for_the_others() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let (http, dns) = (key(VIP, 80, PROTO_TCP), key(VIP, 53, PROTO_UDP));
    step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(http, fe(&[1])), (dns, fe(&[1]))]))
    });
    // One port goes: the ClusterIP's refcount drops, the entry stays.
    let ops = step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(http, fe(&[1]))]))
    });
    assert!(
        !ops.iter().any(|o| matches!(o, MapOp::DelVip(_))),
        "{ops:#?}"
    );
    assert_eq!(f.kernel.vips[&VIP], 1);
    assert!(ops.contains(&MapOp::DelSvcStats(dns)));
    // The Service goes: the ClusterIP leaves vips first, so no state in
    // between has it in vips without a frontend (all its traffic dropped).
    let ops = step(&mut f, |f| r.set_service(f, &svc("a"), &Frontends::new()));
    let vip = position(&ops, |o| matches!(o, MapOp::DelVip(_)));
    let entry = position(&ops, |o| matches!(o, MapOp::DelService(_)));
    let live = position(&ops, |o| matches!(o, MapOp::DelLive(_)));
    assert!(vip < entry && entry < live, "{ops:#?}");
    assert!(f.kernel.services.is_empty() && f.kernel.vips.is_empty());
    assert!(f.kernel.slots.is_empty() && f.kernel.live.is_empty());
    assert!(!r.owns_frontends(&svc("a")));
}

#[test]
fn a_port_change_keeps_the_clusterip_and_never_reuses_the_id_at_once() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let (old, new) = (key(VIP, 80, PROTO_TCP), key(VIP, 8080, PROTO_TCP));
    step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(old, fe(&[1]))]))
    });
    let old_id = r.shadow().maps.services[&old].id;
    let ops = step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(new, fe(&[1]))]))
    });
    assert!(
        !ops.iter()
            .any(|o| matches!(o, MapOp::PutVip(..) | MapOp::DelVip(_))),
        "one frontend out, one in: the refcount stays 1: {ops:#?}"
    );
    let new_id = r.shadow().maps.services[&new].id;
    assert_ne!(old_id, new_id, "the removed frontend's id was still in use");
    // The released id is the next one handed out.
    let other = key([10, 96, 0, 11], 80, PROTO_TCP);
    step(&mut f, |f| {
        r.set_service(f, &svc("b"), &fronts(&[(other, fe(&[2]))]))
    });
    assert_eq!(r.shadow().maps.services[&other].id, old_id);
}

#[test]
fn one_service_among_thousands_costs_writes_for_itself_only() {
    let mut f = Fake::new();
    f.snapshots = false;
    let mut r = Reconciler::new();
    let vip = |i: u32| [10, 97, (i / 250) as u8, (i % 250 + 1) as u8];
    for i in 0..2000 {
        let want = fronts(&[(key(vip(i), 80, PROTO_TCP), fe(&[1, 2, 3]))]);
        r.set_service(&mut f, &svc(&format!("bulk-{i}")), &want)
            .unwrap();
    }
    f.take_ops();
    let k = key(vip(1234), 80, PROTO_TCP);
    let id = r.shadow().maps.services[&k].id;
    let before = r.writes();
    r.set_service(&mut f, &svc("bulk-1234"), &fronts(&[(k, fe(&[1, 2]))]))
        .unwrap();
    let ops = f.take_ops();
    assert_eq!(counts(&ops), (1, 2), "{ops:#?}");
    let after = r.writes();
    assert_eq!(
        (
            after.updates - before.updates,
            after.deletes - before.deletes
        ),
        (1, 2)
    );
    for op in &ops {
        let ok = match op {
            MapOp::PutService(x, _) => *x == k,
            MapOp::DelBackend(b) => b.svc_id == id,
            MapOp::DelLive(l) => l.svc_id == id,
            _ => false,
        };
        assert!(ok, "{op} is not about bulk-1234");
    }
    // A new Service among them: its own writes only.
    let new = fronts(&[
        (key([10, 98, 0, 1], 80, PROTO_TCP), fe(&[1, 2, 3])),
        (key([10, 98, 0, 1], 443, PROTO_TCP), fe(&[1, 2, 3])),
    ]);
    r.set_service(&mut f, &svc("one-more"), &new).unwrap();
    assert_eq!(counts(&f.take_ops()), (15, 0));
}

#[test]
fn affinity_is_written_with_the_entry() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let k = key(VIP, 80, PROTO_TCP);
    let mut st = fe(&[1]);
    st.affinity_timeout_s = Some(10_800);
    step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(k, st.clone())]))
    });
    let info = f.kernel.services[&k];
    assert_eq!(
        (info.flags, info.affinity_timeout_s),
        (SVC_F_AFFINITY, 10_800)
    );
    st.affinity_timeout_s = None;
    let ops = step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(k, st.clone())]))
    });
    assert_eq!(ops.len(), 1, "only the entry: {ops:#?}");
    assert_eq!(f.kernel.services[&k].flags, 0);
}

#[test]
fn a_frontend_claimed_by_two_services_is_not_removed_by_the_loser() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let k = key(VIP, 80, PROTO_TCP);
    step(&mut f, |f| {
        r.set_service(f, &svc("a"), &fronts(&[(k, fe(&[1]))]))
    });
    step(&mut f, |f| {
        r.set_service(f, &svc("b"), &fronts(&[(k, fe(&[2]))]))
    });
    assert_eq!(f.kernel.slots[&(f.kernel.services[&k].id, 0)], be(2));
    let ops = step(&mut f, |f| r.set_service(f, &svc("a"), &Frontends::new()));
    assert!(ops.is_empty(), "b has it now: {ops:#?}");
    assert!(f.kernel.services.contains_key(&k));
    step(&mut f, |f| r.set_service(f, &svc("b"), &Frontends::new()));
    assert!(f.kernel.services.is_empty() && f.kernel.vips.is_empty());
}

// ---------------------------------------------------------------- peers

#[test]
fn peer_ips_are_accepted_before_peers_point_at_them_and_refused_after() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let (n2, n3) = (net("10.244.2.0/24"), net("10.244.3.0/24"));
    let (ip2, ip3) = ([192, 168, 0, 2], [192, 168, 0, 3]);
    let ops = step(&mut f, |f| {
        r.set_peers(f, &[(n2, peer(ip2))].into(), Resync::Incremental)
    });
    assert!(
        matches!(ops[..], [MapOp::PutPeerIp(..), MapOp::PutPeer(..)]),
        "{ops:#?}"
    );
    // The node behind 10.244.2.0/24 moves to another PublicIP.
    let ops = step(&mut f, |f| {
        r.set_peers(f, &[(n2, peer(ip3))].into(), Resync::Incremental)
    });
    assert_eq!(
        ops,
        vec![
            MapOp::PutPeerIp(PeerIpKey { public_ip: ip3 }, PeerIpInfo { leases: 1 }),
            MapOp::PutPeer(
                n2,
                PeerInfo {
                    public_ip: ip3,
                    vtep_mac: peer(ip3).vtep_mac,
                    _pad: [0; 2]
                }
            ),
            MapOp::DelPeerIp(PeerIpKey { public_ip: ip2 }),
        ]
    );
    // Two leases on one PublicIP (a node re-leasing): counted.
    step(&mut f, |f| {
        r.set_peers(
            f,
            &[(n2, peer(ip3)), (n3, peer(ip3))].into(),
            Resync::Incremental,
        )
    });
    assert_eq!(f.kernel.peer_ips[&ip3], 2);
    let ops = step(&mut f, |f| {
        r.set_peers(f, &Peers::new(), Resync::Incremental)
    });
    let last_peer = ops
        .iter()
        .rposition(|o| matches!(o, MapOp::DelPeer(_)))
        .unwrap();
    let ip = position(&ops, |o| matches!(o, MapOp::DelPeerIp(_)));
    assert!(last_peer < ip, "{ops:#?}");
    assert!(f.kernel.peers.is_empty() && f.kernel.peer_ips.is_empty());
}

#[test]
fn a_full_resync_removes_what_the_kernel_has_and_the_shadow_does_not() {
    let mut f = Fake::new();
    // An earlier run (or missed events) left these.
    let mut earlier = Reconciler::new();
    let stale: Peers = [
        (net("10.244.9.0/24"), peer([192, 168, 0, 9])),
        (net("10.244.2.0/24"), peer([192, 168, 0, 2])),
    ]
    .into();
    earlier
        .set_peers(&mut f, &stale, Resync::Incremental)
        .unwrap();
    let want: Peers = [(net("10.244.2.0/24"), peer([192, 168, 0, 2]))].into();
    // A new agent knows nothing of them; an incremental sync writes what
    // it wants and removes nothing.
    let mut r = Reconciler::new();
    let ops = step(&mut f, |f| r.set_peers(f, &want, Resync::Incremental));
    assert!(!ops.iter().any(MapOp::is_delete), "{ops:#?}");
    assert!(f.kernel.peers.contains_key(&net("10.244.9.0/24")));
    // A full one removes them, and leaves the entry that is right alone.
    let mut r = Reconciler::new();
    let ops = step(&mut f, |f| r.set_peers(f, &want, Resync::Full));
    assert_eq!(
        ops,
        vec![
            MapOp::DelPeer(net("10.244.9.0/24")),
            MapOp::DelPeerIp(PeerIpKey {
                public_ip: [192, 168, 0, 9]
            }),
        ]
    );
    assert_eq!(r.shadow().maps.peers, f.kernel.peers);
}

// ---------------------------------------------------------------- start-up, ports

/// An earlier run's state: Services a (two frontends), b, c, an orphan
/// slot and pair under id 77, an affinity entry. Returns the ids.
fn earlier_run(f: &mut Fake) -> BTreeMap<SvcKey, u32> {
    let mut earlier = Reconciler::new();
    earlier
        .set_service(
            f,
            &svc("a"),
            &fronts(&[
                (key(VIP, 80, PROTO_TCP), fe(&[1, 2])),
                (key(VIP, 53, PROTO_UDP), fe(&[3])),
            ]),
        )
        .unwrap();
    for (name, last) in [("b", 11), ("c", 12)] {
        earlier
            .set_service(
                f,
                &svc(name),
                &fronts(&[(key([10, 96, 0, last], 80, PROTO_TCP), fe(&[last]))]),
            )
            .unwrap();
    }
    f.kernel
        .record(&MapOp::PutBackend(super::state::backend_key(77, 0), be(9)));
    f.kernel
        .record(&MapOp::PutLive(super::state::live_key(77, addr(&be(9)))));
    f.affinity.insert((0, [10, 244, 1, 5]));
    f.take_ops();
    f.kernel.services.iter().map(|(k, i)| (*k, i.id)).collect()
}

#[test]
fn a_restart_adopts_service_state_and_keeps_every_id() {
    let mut f = Fake::new();
    let ids = earlier_run(&mut f);
    let mut r = Reconciler::new();
    let ops = step(&mut f, |f| r.adopt_services(f).map(|n| assert_eq!(n, 4)));
    assert!(ops.is_empty(), "adopting writes nothing: {ops:#?}");
    assert_eq!(r.shadow().maps.orphans(), &BTreeSet::from([77]));

    // While the agent was away: a gained a backend on port 80, c was
    // deleted, d was created; b is unchanged.
    let mut want: BTreeMap<ServiceName, Frontends> = BTreeMap::new();
    want.insert(
        svc("a"),
        fronts(&[
            (key(VIP, 80, PROTO_TCP), fe(&[1, 2, 6])),
            (key(VIP, 53, PROTO_UDP), fe(&[3])),
        ]),
    );
    want.insert(
        svc("b"),
        fronts(&[(key([10, 96, 0, 11], 80, PROTO_TCP), fe(&[11]))]),
    );
    want.insert(
        svc("d"),
        fronts(&[(key([10, 96, 0, 13], 80, PROTO_TCP), fe(&[13]))]),
    );
    let a = step(&mut f, |f| r.set_service(f, &svc("a"), &want[&svc("a")]));
    // Only the difference: the new backend's pair and slot, the count.
    assert_eq!(counts(&a), (3, 0), "{a:#?}");
    let b = step(&mut f, |f| r.set_service(f, &svc("b"), &want[&svc("b")]));
    assert!(b.is_empty(), "an unchanged Service writes nothing: {b:#?}");
    step(&mut f, |f| r.set_service(f, &svc("d"), &want[&svc("d")]));
    for (k, id) in &ids {
        if k.vip != [10, 96, 0, 12] {
            assert_eq!(f.kernel.services[k].id, *id, "{k:?} kept its id");
        }
    }
    let d = f.kernel.services[&key([10, 96, 0, 13], 80, PROTO_TCP)].id;
    assert!(
        !ids.values().any(|i| *i == d) && d != 77,
        "a new frontend gets an id no adopted entry carries ({d})"
    );

    // c goes, ClusterIP first.
    let gone = step(&mut f, |f| r.remove_unowned(f).map(|n| assert_eq!(n, 1)));
    let vip = position(
        &gone,
        |o| matches!(o, MapOp::DelVip(k) if k.vip == [10, 96, 0, 12]),
    );
    let entry = position(&gone, |o| matches!(o, MapOp::DelService(_)));
    assert!(vip < entry, "{gone:#?}");
    step(&mut f, |f| r.remove_orphans(f).map(|_| ()));
    assert_services_match(&f.kernel, &want);
    assert_eq!(
        f.affinity.len(),
        1,
        "affinity stays: its ids are still valid"
    );
    // Nothing left to do.
    assert!(step(&mut f, |f| r.remove_unowned(f).map(|_| ())).is_empty());
}

#[test]
fn an_adopted_frontend_dropped_from_its_service_goes_and_its_clusterip_stays() {
    let mut f = Fake::new();
    let ids = earlier_run(&mut f);
    let mut r = Reconciler::new();
    r.adopt_services(&mut f).unwrap();
    // a lost port 53 while the agent was away; b and c are unchanged.
    let a = fronts(&[(key(VIP, 80, PROTO_TCP), fe(&[1, 2]))]);
    assert!(step(&mut f, |f| r.set_service(f, &svc("a"), &a)).is_empty());
    for (name, last) in [("b", 11), ("c", 12)] {
        let want = fronts(&[(key([10, 96, 0, last], 80, PROTO_TCP), fe(&[last]))]);
        assert!(step(&mut f, |f| r.set_service(f, &svc(name), &want)).is_empty());
    }
    let ops = step(&mut f, |f| r.remove_unowned(f).map(|n| assert_eq!(n, 1)));
    assert!(
        !ops.iter().any(|o| matches!(o, MapOp::DelVip(_))),
        "{ops:#?}"
    );
    let entry = position(&ops, |o| matches!(o, MapOp::DelService(_)));
    let refcount = position(
        &ops,
        |o| matches!(o, MapOp::PutVip(k, v) if k.vip == VIP && v.frontends == 1),
    );
    assert!(
        entry < refcount,
        "the refcount drops after the entry: {ops:#?}"
    );
    assert_eq!(f.kernel.vips[&VIP], 1);
    assert_eq!(
        f.kernel.services[&key(VIP, 80, PROTO_TCP)].id,
        ids[&key(VIP, 80, PROTO_TCP)]
    );
}

#[test]
fn adopting_repairs_a_wrong_clusterip_refcount() {
    let mut f = Fake::new();
    earlier_run(&mut f);
    // A ClusterIP without frontends, and a refcount off by one.
    f.kernel.record(&MapOp::PutVip(
        super::state::vip_key([10, 96, 0, 99]),
        super::state::vip_info(1),
    ));
    f.kernel.record(&MapOp::PutVip(
        super::state::vip_key([10, 96, 0, 11]),
        super::state::vip_info(3),
    ));
    let mut r = Reconciler::new();
    r.adopt_services(&mut f).unwrap();
    for (name, last) in [("b", 11), ("c", 12)] {
        let want = fronts(&[(key([10, 96, 0, last], 80, PROTO_TCP), fe(&[last]))]);
        r.set_service(&mut f, &svc(name), &want).unwrap();
    }
    r.remove_unowned(&mut f).unwrap();
    let vips: BTreeMap<[u8; 4], u32> = [([10, 96, 0, 11], 1), ([10, 96, 0, 12], 1)].into();
    assert_eq!(f.kernel.vips, vips);
}

#[test]
fn endpoints_on_ports_that_are_gone_are_forgotten() {
    let mut f = Fake::new();
    let ep = |ifindex| EndpointInfo {
        ifindex,
        ..Default::default()
    };
    f.endpoints.insert([10, 244, 1, 5], ep(7));
    f.endpoints.insert([10, 244, 1, 6], ep(8));
    let mut r = Reconciler::new();
    assert_eq!(r.prune_endpoints(&mut f, &[7].into()).unwrap(), 1);
    assert_eq!(f.endpoints.keys().collect::<Vec<_>>(), [&[10, 244, 1, 5]]);
    assert_eq!(r.prune_endpoints(&mut f, &[7].into()).unwrap(), 0);
}

fn pod(ip: [u8; 4], ifindex: u32) -> ([u8; 4], PodEntry) {
    let mac = [2, 0, 0, 0, 0, ip[3]];
    (
        ip,
        PodEntry {
            endpoint: EndpointInfo {
                ifindex,
                mac,
                gw_mac: [2, 0xaa, 0, 0, 0, ifindex as u8],
            },
            port: PodPortInfo {
                ip,
                mac,
                _pad: [0; 2],
            },
        },
    )
}

#[test]
fn cni_pods_guard_their_port_before_their_endpoint_exists() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let want: Pods = [pod([10, 244, 1, 5], 20), pod([10, 244, 1, 6], 21)].into();
    r.set_pods(&mut f, &want).unwrap();
    for (ip, p) in &want {
        let port_at = position(
            &f.applied,
            |o| matches!(o, MapOp::PutPodPort(k, _) if k.ifindex == p.endpoint.ifindex),
        );
        let ep_at = position(
            &f.applied,
            |o| matches!(o, MapOp::PutEndpoint(k, _) if k.ip == *ip),
        );
        assert!(port_at < ep_at, "{:#?}", f.applied);
    }
    assert_eq!(f.endpoints.len(), 2);
    assert_eq!(f.kernel.pod_ports.len(), 2);
    // Unchanged: nothing written.
    let n = f.applied.len();
    r.set_pods(&mut f, &want).unwrap();
    assert_eq!(f.applied.len(), n);

    // One goes: its endpoint entry before its port's.
    let one: Pods = [pod([10, 244, 1, 6], 21)].into();
    r.set_pods(&mut f, &one).unwrap();
    let new = &f.applied[n..];
    assert_eq!(
        new,
        [
            MapOp::DelEndpoint(EndpointKey {
                ip: [10, 244, 1, 5]
            }),
            MapOp::DelPodPort(PodPortKey { ifindex: 20 }),
        ]
    );

    // Its address comes back on another port: one overwrite of the
    // endpoint entry, the old port's guard gone.
    let moved: Pods = [pod([10, 244, 1, 6], 30)].into();
    let n = f.applied.len();
    r.set_pods(&mut f, &moved).unwrap();
    let new = &f.applied[n..];
    assert!(
        matches!(new[0], MapOp::DelPodPort(k) if k.ifindex == 21),
        "{new:#?}"
    );
    assert!(
        matches!(new[1], MapOp::PutPodPort(k, _) if k.ifindex == 30),
        "{new:#?}"
    );
    assert!(
        matches!(new[2], MapOp::PutEndpoint(k, v) if k.ip == [10, 244, 1, 6] && v.ifindex == 30)
    );
    assert_eq!(new.len(), 3);
    assert_eq!(f.endpoints[&[10, 244, 1, 6]].ifindex, 30);
}

#[test]
fn pruning_never_removes_registered_endpoints() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    // A learnt entry on bridge port 7, one on a port that is gone, and a
    // CNI pod (its port is not a bridge port).
    f.endpoints.insert(
        [10, 244, 1, 9],
        EndpointInfo {
            ifindex: 7,
            ..Default::default()
        },
    );
    f.endpoints.insert(
        [10, 244, 1, 10],
        EndpointInfo {
            ifindex: 8,
            ..Default::default()
        },
    );
    r.set_pods(&mut f, &[pod([10, 244, 1, 5], 20)].into())
        .unwrap();
    assert_eq!(r.prune_endpoints(&mut f, &[7].into()).unwrap(), 1);
    let left: Vec<_> = f.endpoints.keys().copied().collect();
    assert_eq!(left, [[10, 244, 1, 5], [10, 244, 1, 9]]);
}

#[test]
fn a_restart_adopts_pod_entries_and_removes_the_unwanted() {
    let mut f = Fake::new();
    let mut old = Reconciler::new();
    old.set_pods(
        &mut f,
        &[pod([10, 244, 1, 5], 20), pod([10, 244, 1, 6], 21)].into(),
    )
    .unwrap();
    // A learnt entry stays out of it.
    f.endpoints.insert(
        [10, 244, 1, 9],
        EndpointInfo {
            ifindex: 7,
            ..Default::default()
        },
    );
    let mut r = Reconciler::new();
    r.adopt_pods(&mut f).unwrap();
    assert_eq!(r.shadow().maps.pods.len(), 2);
    assert_eq!(r.shadow().maps.pod_ports.len(), 2);
    // The restarted agent still has .5 (its device exists), not .6.
    let n = f.applied.len();
    r.set_pods(&mut f, &[pod([10, 244, 1, 5], 20)].into())
        .unwrap();
    assert_eq!(
        &f.applied[n..],
        [
            MapOp::DelEndpoint(EndpointKey {
                ip: [10, 244, 1, 6]
            }),
            MapOp::DelPodPort(PodPortKey { ifindex: 21 }),
        ]
    );
    assert!(f.endpoints.contains_key(&[10, 244, 1, 9]));
}

// ---------------------------------------------------------------- failures

#[test]
fn a_failed_write_stops_its_plan_and_the_next_one_finishes_the_job() {
    let (a, b) = (key(VIP, 80, PROTO_TCP), key([10, 96, 0, 11], 53, PROTO_UDP));
    let first = [(svc("x"), fronts(&[(a, fe(&[1, 2, 3]))]))];
    let second = [(svc("x"), fronts(&[(a, fe(&[3, 4])), (b, fe(&[5]))]))];
    // Fail at every write of the change in turn.
    let total = {
        let mut f = Fake::new();
        let mut r = Reconciler::new();
        r.set_service(&mut f, &first[0].0, &first[0].1).unwrap();
        f.take_ops();
        r.set_service(&mut f, &second[0].0, &second[0].1).unwrap();
        f.take_ops().len()
    };
    for n in 0..total {
        let mut f = Fake::new();
        let mut r = Reconciler::new();
        r.set_service(&mut f, &first[0].0, &first[0].1).unwrap();
        f.take_ops();
        let before = f.kernel.clone();
        f.fail_in(n);
        assert!(r.set_service(&mut f, &second[0].0, &second[0].1).is_err());
        assert_eq!(f.applied.len(), n, "stopped at the failure");
        assert_eq!(
            contents(&r.shadow().maps),
            contents(&f.kernel),
            "the shadow says what the kernel has"
        );
        // The next event (or tick) plans again from there.
        r.set_service(&mut f, &second[0].0, &second[0].1).unwrap();
        r.remove_orphans(&mut f).unwrap();
        check_transition(&before, &f.states, &f.kernel);
        assert_services_match(&f.kernel, &second.clone().into());
        assert_eq!(contents(&r.shadow().maps), contents(&f.kernel));
        // And back, with a failure again.
        f.take_ops();
        let before = f.kernel.clone();
        f.fail_in(n.min(3));
        let _ = r.set_service(&mut f, &svc("x"), &Frontends::new());
        r.set_service(&mut f, &svc("x"), &Frontends::new()).unwrap();
        r.remove_orphans(&mut f).unwrap();
        check_transition(&before, &f.states, &f.kernel);
        assert!(is_empty(&f.kernel), "failure at {n}: {:#?}", f.kernel);
    }
}

/// Random Services and changes, with failed writes and retries, checked at
/// every write; at the end the maps hold exactly what is wanted.
#[test]
fn random_changes_keep_every_state_safe() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let names: Vec<ServiceName> = (0..5).map(|i| svc(&format!("s{i}"))).collect();
    let ports = [(80, PROTO_TCP), (443, PROTO_TCP), (53, PROTO_UDP)];
    let mut want: BTreeMap<ServiceName, Frontends> = BTreeMap::new();
    let mut pending: BTreeSet<ServiceName> = BTreeSet::new();
    let mut checked = 0;
    for round in 0..400 {
        let i = rng.random_range(0..names.len());
        let name = &names[i];
        let vip = [10, 96, 0, 10 + i as u8];
        let mut fr = Frontends::new();
        for (port, proto) in ports {
            if rng.random_bool(0.6) {
                let mut pool: Vec<u8> = (1..=6).collect();
                let n = rng.random_range(0..=pool.len());
                let mut backends = Vec::new();
                for _ in 0..n {
                    backends.push(pool.swap_remove(rng.random_range(0..pool.len())));
                }
                let mut st = fe(&backends);
                if rng.random_bool(0.3) {
                    st.affinity_timeout_s = Some(rng.random_range(1..20_000));
                }
                fr.insert(key(vip, port, proto), st);
            }
        }
        // A failed plan may leave a state in between (that is what a retry
        // is for): transitions are checked from settled states only.
        let settled = pending.is_empty();
        f.take_ops();
        let before = f.kernel.clone();
        if rng.random_bool(0.25) {
            f.fail_in(rng.random_range(0..12));
        }
        match r.set_service(&mut f, name, &fr) {
            Ok(()) => {
                pending.remove(name);
            }
            Err(_) => {
                pending.insert(name.clone());
            }
        }
        f.fail_at = None;
        // The intermediate states of a failed plan are safe too, but only
        // measured against where the next plan leads; check the whole run
        // up to the end state of this round's retry.
        if rng.random_bool(0.5) || round == 399 {
            for p in std::mem::take(&mut pending) {
                let w = if p == *name {
                    fr.clone()
                } else {
                    want[&p].clone()
                };
                r.set_service(&mut f, &p, &w).unwrap();
            }
            r.remove_orphans(&mut f).unwrap();
        }
        want.insert(name.clone(), fr);
        if settled && pending.is_empty() {
            check_transition(&before, &f.states, &f.kernel);
            checked += 1;
        }
        assert_eq!(
            contents(&r.shadow().maps),
            contents(&f.kernel),
            "round {round}"
        );
    }
    assert!(pending.is_empty());
    assert!(checked > 200, "only {checked} transitions checked");
    assert_services_match(&f.kernel, &want);
}

/// Applies a plan's writes in another order, through the checker.
fn replay(ops: impl IntoIterator<Item = MapOp>, setup: &[MapOp]) {
    let mut f = Fake::new();
    for op in setup {
        f.apply(op).unwrap();
    }
    f.take_ops();
    let before = f.kernel.clone();
    for op in ops {
        let _ = f.apply(&op);
    }
    check_transition(&before, &f.states, &f.kernel);
}

#[test]
#[should_panic(expected = "exposed but empty")]
fn the_checker_catches_a_count_written_before_its_slots() {
    let r = Reconciler::new();
    let want = fronts(&[(key(VIP, 80, PROTO_TCP), fe(&[1, 2]))]);
    let mut ops = plan::service(&svc("a"), &want, r.shadow());
    let entry = position(&ops, |o| matches!(o, MapOp::PutService(..)));
    let op = ops.remove(entry);
    ops.insert(0, op);
    replay(ops, &[]);
}

#[test]
#[should_panic(expected = "without a frontend")]
fn the_checker_catches_a_clusterip_left_without_frontends() {
    let mut f = Fake::new();
    let mut r = Reconciler::new();
    let want = fronts(&[(key(VIP, 80, PROTO_TCP), fe(&[1]))]);
    r.set_service(&mut f, &svc("a"), &want).unwrap();
    let setup = f.take_ops();
    let mut ops = plan::service(&svc("a"), &Frontends::new(), r.shadow());
    // The ClusterIP last instead of first.
    ops.rotate_left(1);
    replay(ops, &setup);
}

#[test]
#[should_panic(expected = "not accepted")]
fn the_checker_catches_a_peer_before_its_public_ip() {
    let r = Reconciler::new();
    let want: Peers = [(net("10.244.2.0/24"), peer([192, 168, 0, 2]))].into();
    let mut ops = plan::peers(&want, &r.shadow().maps);
    ops.reverse();
    replay(ops, &[]);
}

// ---------------------------------------------------------------- desired

#[test]
fn node_config_carries_the_bpf_log_bit_only_when_asked() {
    let facts = NodeFacts {
        network: net("10.244.0.0/16"),
        subnet: net("10.244.3.0/24"),
        vni: 1,
        vxlan_port: 8472,
        public_ip: Ipv4Addr::new(192, 168, 0, 3),
        vtep_mac: [2, 0xdb, 192, 168, 0, 3],
        underlay_ifindex: 2,
        underlay_mac: [2, 0, 0, 0, 0, 3],
        bridge_ifindex: 5,
        bridge_mac: [2, 0xdc, 10, 244, 3, 1],
        host_ifindex: 7,
        host_mac: [2, 0xdd, 10, 244, 3, 1],
        netns_cookie: 0x1234_5678_9abc,
        bpf_log: false,
        ip_masq: false,
        nat_ports: (61000, 65535),
    };
    let c = desired::node_config(&facts);
    assert_eq!((c.nat_port_min, c.nat_port_max), (61000, 65535));
    assert_eq!(c.flags, NODE_CFG_READY);
    assert_eq!(
        (c.host_ifindex, c.host_mac, c.netns_cookie),
        (7, [2, 0xdd, 10, 244, 3, 1], 0x1234_5678_9abc)
    );
    assert_eq!(
        (
            c.subnet,
            c.gateway,
            c.network,
            c.subnet_prefix_len,
            c.network_prefix_len
        ),
        ([10, 244, 3, 0], [10, 244, 3, 1], [10, 244, 0, 0], 24, 16)
    );
    let c = desired::node_config(&NodeFacts {
        bpf_log: true,
        ..facts
    });
    assert_eq!(c.flags, NODE_CFG_READY | NODE_CFG_BPF_LOG);
    let c = desired::node_config(&NodeFacts {
        ip_masq: true,
        ..facts
    });
    assert_eq!(c.flags, NODE_CFG_READY | dataplane_common::NODE_CFG_IP_MASQ);
}

#[test]
fn frontends_are_keyed_in_network_byte_order() {
    use crate::services::{BackendAddr, Frontend, FrontendSpec, Proto};
    let f = Frontend {
        ip: Ipv4Addr::new(10, 96, 0, 10),
        port: 8080,
        proto: Proto::Udp,
    };
    let spec = FrontendSpec {
        service: svc("a"),
        port_name: String::new(),
        backends: vec![BackendAddr {
            ip: Ipv4Addr::new(10, 244, 2, 7),
            port: 53,
        }],
        affinity_timeout: Some(std::time::Duration::from_secs(u64::MAX)),
        north_south: None,
        empty_drops: false,
    };
    let got = desired::frontends(&[(f, spec)].into(), std::net::Ipv4Addr::UNSPECIFIED);
    let (k, st) = got.iter().next().unwrap();
    assert_eq!(*k, key([10, 96, 0, 10], 8080, PROTO_UDP));
    assert_eq!(k.port, [0x1f, 0x90]);
    assert_eq!(st.backends[0].port, [0, 53]);
    assert_eq!(
        st.affinity_timeout_s,
        Some(u32::MAX),
        "clamped, not wrapped"
    );
}

#[test]
fn peers_leave_out_our_own_lease_and_other_backends() {
    use crate::{
        lease::LeaseAttrs,
        peers::{PeerTable, PeerUpdate},
    };
    let attrs = |ip: [u8; 4], backend: &str| LeaseAttrs {
        public_ip: Ipv4Addr::from(ip),
        backend_type: backend.into(),
        vni: 1,
        vtep_mac: [2, 0xdb, ip[0], ip[1], ip[2], ip[3]],
    };
    let mut table = PeerTable::new();
    table.apply(PeerUpdate::Snapshot(
        [
            (net("10.244.1.0/24"), attrs([192, 168, 0, 1], "vxlan")),
            (net("10.244.2.0/24"), attrs([192, 168, 0, 2], "vxlan")),
            (net("10.244.3.0/24"), attrs([192, 168, 0, 3], "host-gw")),
        ]
        .into(),
    ));
    let got = desired::peers(&table, net("10.244.1.0/24"));
    assert_eq!(got, [(net("10.244.2.0/24"), peer([192, 168, 0, 2]))].into());
}
