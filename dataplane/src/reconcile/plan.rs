//! Planning, as pure functions: desired state and the [`Shadow`] in, the
//! map writes that take the kernel from one to the other out, in an order
//! where every state in between is safe for packets in flight. The rules,
//! each a unit test in `tests.rs`, follow from what the data path does
//! (`dataplane-ebpf/src/lb.rs`, `decap.rs`):
//!
//! - A backend slot is written before the service entry's count exposes
//!   it, and the count shrinks before slots beyond it are deleted: a
//!   lookup never lands on an empty slot.
//! - A `live` pair is written before any slot exposes its backend, and is
//!   removed once no slot of the frontend exposes it any more: a new
//!   connection never picks a backend whose pair is gone (it would be
//!   reset at its next packet), and conntrack and affinity entries to a
//!   removed backend die at their next packet after the plan.
//! - A ClusterIP's `vips` entry is written after the service entry of its
//!   first frontend and removed before the service entry of its last one.
//!   The data path drops traffic to a ClusterIP in `vips` that has no
//!   frontend for the port; these orders, and writing the frontends a
//!   plan keeps or adds before removing the others, mean no state in
//!   between has a ClusterIP in `vips` without any frontend, and a
//!   frontend that stays is translated throughout.
//! - A PublicIP is accepted (`peer_ips`) before a peer points at it, and
//!   peers are removed before their PublicIP is refused.
//! - A CNI pod's port entry (`pod_ports_v1`) is written before its
//!   endpoint entry and removed after it.
//! - Only what differs is written: an unchanged input plans nothing, and a
//!   Service's plan touches that Service's frontends and ClusterIPs only.

use std::collections::{BTreeMap, BTreeSet};

use dataplane_common::{
    EndpointInfo, EndpointKey, MaglevKey, NodeConfig, PeerInfo, PodPortInfo, SVC_F_AFFINITY,
    SVC_F_EMPTY_DROPS, SVC_F_ETP_LOCAL, SVC_F_EXTERNAL, SvcInfo, SvcKey,
};

use super::{
    desired::{FrontendState, Frontends, Peers, Pods},
    state::{
        BackendAddr, MapState, Shadow, addr, backend_key, endpoint_key, live_key, peer_ip_info,
        peer_ip_key, pod_port_key, vip_info, vip_key,
    },
};
use crate::{
    bpf::MapOp,
    services::{ServiceName, TrafficPolicy},
};

/// The node config, if it differs.
pub fn node(want: &NodeConfig, cur: &MapState) -> Vec<MapOp> {
    if cur.node.as_ref() == Some(want) {
        Vec::new()
    } else {
        vec![MapOp::NodeConfig(*want)]
    }
}

/// The peer maps: `want` is every remote subnet.
pub fn peers(want: &Peers, cur: &MapState) -> Vec<MapOp> {
    let mut want_ips: BTreeMap<[u8; 4], u32> = BTreeMap::new();
    for p in want.values() {
        *want_ips.entry(p.public_ip.octets()).or_default() += 1;
    }
    let mut ops = Vec::new();
    // Accept a new sender before sending to it...
    for (ip, n) in &want_ips {
        if cur.peer_ips.get(ip) != Some(n) {
            ops.push(MapOp::PutPeerIp(peer_ip_key(*ip), peer_ip_info(*n)));
        }
    }
    for (net, p) in want {
        let info = PeerInfo {
            public_ip: p.public_ip.octets(),
            vtep_mac: p.vtep_mac,
            _pad: [0; 2],
        };
        if cur.peers.get(net) != Some(&info) {
            ops.push(MapOp::PutPeer(*net, info));
        }
    }
    // ...and stop sending to a removed subnet before refusing its sender.
    for net in cur.peers.keys().filter(|n| !want.contains_key(n)) {
        ops.push(MapOp::DelPeer(*net));
    }
    for ip in cur.peer_ips.keys().filter(|ip| !want_ips.contains_key(*ip)) {
        ops.push(MapOp::DelPeerIp(peer_ip_key(*ip)));
    }
    ops
}

/// One Service: `want` is all its frontends on this node (empty when it
/// is gone). Frontends it owned and no longer has are removed; frontends
/// of other Services are not looked at.
pub fn service(owner: &ServiceName, want: &Frontends, cur: &Shadow) -> Vec<MapOp> {
    let maps = &cur.maps;
    let removed: Vec<(SvcKey, SvcInfo)> = cur
        .owners
        .of(owner)
        .filter(|k| !want.contains_key(k))
        .filter_map(|k| maps.services.get(k).map(|i| (*k, *i)))
        .collect();

    // ClusterIP refcounts once this plan is applied (north-south
    // frontends have none).
    let cluster_ip = |i: &SvcInfo| i.flags & SVC_F_EXTERNAL == 0;
    let mut delta: BTreeMap<[u8; 4], i64> = BTreeMap::new();
    for (k, i) in &removed {
        if cluster_ip(i) {
            *delta.entry(k.vip).or_default() -= 1;
        }
    }
    for (k, st) in want {
        let was = maps.services.get(k).is_some_and(cluster_ip);
        let is = st.north_south.is_none();
        if !is && !was {
            continue;
        }
        // Every ClusterIP kept is checked too: an earlier plan may have
        // stopped before its refcount was written.
        *delta.entry(k.vip).or_default() += i64::from(is) - i64::from(was);
    }
    let (mut vips_first, mut vips_last) = (Vec::new(), Vec::new());
    for (vip, d) in delta {
        let after = (i64::from(maps.frontends_of_vip(&vip)) + d).max(0);
        let after = u32::try_from(after).unwrap_or(u32::MAX);
        match (after, maps.vips.get(&vip)) {
            (0, Some(_)) => vips_first.push(MapOp::DelVip(vip_key(vip))),
            (0, None) => {}
            (n, now) if now != Some(&n) => vips_last.push(MapOp::PutVip(vip_key(vip), vip_info(n))),
            _ => {}
        }
    }

    let mut ops = vips_first;
    // Frontends that stay or come first, then those that go: a ClusterIP
    // that keeps frontends (a port renumbered) always has one.
    let mut fresh = maps.fresh_ids();
    for (k, st) in want {
        let old = maps.services.get(k);
        // Ids of the frontends removed below are in use until then, so
        // `fresh` never hands one out here.
        let Some(id) = old.map(|i| i.id).or_else(|| fresh.next()) else {
            continue; // 2^32 frontends: cannot happen (the map holds 65,536)
        };
        set_frontend(&mut ops, maps, *k, old, id, st);
    }
    for (k, info) in &removed {
        remove_frontend(&mut ops, maps, k, info);
    }
    ops.extend(vips_last);
    ops
}

fn set_frontend(
    ops: &mut Vec<MapOp>,
    maps: &MapState,
    key: SvcKey,
    old: Option<&SvcInfo>,
    id: u32,
    want: &FrontendState,
) {
    let count = u32::try_from(want.backends.len()).unwrap_or(u32::MAX);
    let want_live: BTreeSet<BackendAddr> = want.backends.iter().map(addr).collect();
    let old_live: BTreeSet<BackendAddr> = maps.live_of(id).collect();
    for a in want_live.difference(&old_live) {
        ops.push(MapOp::PutLive(live_key(id, *a)));
    }
    let mut slots_changed = false;
    for (slot, b) in (0..count).zip(&want.backends) {
        if maps.slot(id, slot) != Some(b) {
            ops.push(MapOp::PutBackend(backend_key(id, slot), *b));
            slots_changed = true;
        }
    }
    let mut flags = if want.affinity_timeout_s.is_some() {
        SVC_F_AFFINITY
    } else {
        0
    };
    if let Some(policy) = want.north_south {
        flags |= SVC_F_EXTERNAL;
        if policy == TrafficPolicy::Local {
            flags |= SVC_F_ETP_LOCAL;
        }
        if want.empty_drops {
            flags |= SVC_F_EMPTY_DROPS;
        }
        // The table names slots, so it follows them (the data path
        // ignores an entry beyond the count meanwhile).
        if slots_changed || maps.maglev.get(&id) != Some(&count) {
            ops.push(MapOp::PutMaglev(MaglevKey { svc_id: id }, count));
        }
    } else if maps.maglev.contains_key(&id) {
        ops.push(MapOp::DelMaglev(MaglevKey { svc_id: id }));
    }
    let info = SvcInfo {
        id,
        count,
        flags,
        affinity_timeout_s: want.affinity_timeout_s.unwrap_or(0),
    };
    if old != Some(&info) {
        ops.push(MapOp::PutService(key, info));
    }
    for (slot, _) in maps.slots_from(id, count) {
        ops.push(MapOp::DelBackend(backend_key(id, slot)));
    }
    // Last: by now no slot below the count holds a removed backend.
    for a in old_live.difference(&want_live) {
        ops.push(MapOp::DelLive(live_key(id, *a)));
    }
}

fn remove_frontend(ops: &mut Vec<MapOp>, maps: &MapState, key: &SvcKey, info: &SvcInfo) {
    let id = info.id;
    // The entry first: nothing exposes the slots and pairs after it.
    ops.push(MapOp::DelService(*key));
    for a in maps.live_of(id) {
        ops.push(MapOp::DelLive(live_key(id, a)));
    }
    for (slot, _) in maps.slots_of(id) {
        ops.push(MapOp::DelBackend(backend_key(id, slot)));
    }
    if info.flags & SVC_F_EXTERNAL != 0 || maps.maglev.contains_key(&id) {
        ops.push(MapOp::DelMaglev(MaglevKey { svc_id: id }));
    }
    ops.push(MapOp::DelSvcStats(*key));
}

/// Slots and `live` pairs of ids no service entry carries (a plan that
/// failed half way left them). Nothing exposes them, so any order is safe.
pub fn orphans(cur: &MapState) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for &id in cur.orphans() {
        for a in cur.live_of(id) {
            ops.push(MapOp::DelLive(live_key(id, a)));
        }
        for (slot, _) in cur.slots_of(id) {
            ops.push(MapOp::DelBackend(backend_key(id, slot)));
        }
    }
    ops
}

/// Frontends in the maps that no Service owns (adopted from an earlier
/// run, their Service gone or changed meanwhile), with the ClusterIP
/// refcounts made right: a ClusterIP left without frontends goes before
/// its last service entry, refcounts that stay are written after.
pub fn unowned(cur: &Shadow) -> Vec<MapOp> {
    let maps = &cur.maps;
    let removed: Vec<(SvcKey, SvcInfo)> = maps
        .services
        .iter()
        .filter(|(k, _)| cur.owners.owner(k).is_none())
        .map(|(k, i)| (*k, *i))
        .collect();
    let mut gone: BTreeMap<[u8; 4], u32> = BTreeMap::new();
    for (k, i) in &removed {
        if i.flags & SVC_F_EXTERNAL == 0 {
            *gone.entry(k.vip).or_default() += 1;
        }
    }
    // Every ClusterIP in `vips` or losing a frontend: an adopted refcount
    // may be wrong too.
    let vips: BTreeSet<[u8; 4]> = maps.vips.keys().chain(gone.keys()).copied().collect();
    let (mut ops, mut vips_last) = (Vec::new(), Vec::new());
    for vip in vips {
        let after = maps
            .frontends_of_vip(&vip)
            .saturating_sub(gone.get(&vip).copied().unwrap_or(0));
        match (after, maps.vips.get(&vip)) {
            (0, Some(_)) => ops.push(MapOp::DelVip(vip_key(vip))),
            (0, None) => {}
            (n, now) if now != Some(&n) => vips_last.push(MapOp::PutVip(vip_key(vip), vip_info(n))),
            _ => {}
        }
    }
    for (k, info) in &removed {
        remove_frontend(&mut ops, maps, k, info);
    }
    ops.extend(vips_last);
    ops
}

/// Learnt endpoints whose port (host-side ifindex) is no longer on the
/// bridge: delivering to a stale ifindex would drop the traffic of
/// whichever pod gets the address next. Registered entries (CNI pods, in
/// `cur.pods`) are never taken for learnt ones.
pub fn stale_endpoints(
    ports: &BTreeSet<u32>,
    cur: &MapState,
    entries: &[(EndpointKey, EndpointInfo)],
) -> Vec<MapOp> {
    entries
        .iter()
        .filter(|(k, _)| !cur.pods.contains_key(&k.ip))
        .filter(|(_, v)| !ports.contains(&v.ifindex))
        .map(|(k, _)| MapOp::DelEndpoint(*k))
        .collect()
}

/// The CNI pods' entries: `endpoints_v1` (registered) and `pod_ports_v1`
/// made equal to `want`. Removals first: an endpoint entry before its
/// port's, so nothing is delivered to a port that is no longer guarded.
/// Then a port's entry before the endpoint entry that names it, so the data
/// path never finds a registered endpoint on an unguarded port (it would
/// take it for a learnt one). An address that moves to another port (DEL,
/// then ADD of a new pod given the same address) is one overwrite of its
/// endpoint entry.
pub fn pods(want: &Pods, cur: &MapState) -> Vec<MapOp> {
    let want_ports: BTreeMap<u32, PodPortInfo> = want
        .values()
        .map(|p| (p.endpoint.ifindex, p.port))
        .collect();
    let mut ops = Vec::new();
    for ip in cur.pods.keys() {
        if !want.contains_key(ip) {
            ops.push(MapOp::DelEndpoint(endpoint_key(*ip)));
        }
    }
    for ifindex in cur.pod_ports.keys() {
        if !want_ports.contains_key(ifindex) {
            ops.push(MapOp::DelPodPort(pod_port_key(*ifindex)));
        }
    }
    for (ifindex, port) in &want_ports {
        if cur.pod_ports.get(ifindex) != Some(port) {
            ops.push(MapOp::PutPodPort(pod_port_key(*ifindex), *port));
        }
    }
    for (ip, p) in want {
        if cur.pods.get(ip) != Some(&p.endpoint) {
            ops.push(MapOp::PutEndpoint(endpoint_key(*ip), p.endpoint));
        }
    }
    ops
}
