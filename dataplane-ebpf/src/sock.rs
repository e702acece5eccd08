//! ClusterIPs for the node's own processes, balanced at the socket (as
//! Cilium's socket LB does): `connect()` and UDP `sendmsg()` to a
//! ClusterIP:port are given a backend's address before any packet
//! exists, so no packet of theirs needs NAT or conntrack; `recvmsg()`
//! and `getpeername()` show the ClusterIP:port again.
//!
//! The programs are attached to a cgroup (`--cgroup-path`) that other
//! network namespaces' processes share (the tests run several agents on
//! one machine, all on the root cgroup): each first checks that the
//! socket is in this agent's namespace ([`ours`]) and otherwise allows
//! the call untouched. Nothing else is ever refused.
//!
//! The backend is chosen as for a pod's new connection
//! ([`lb::pick_backend`]: the Service's slots, which hold its ready
//! endpoints, else its serving-terminating ones, and for
//! internalTrafficPolicy Local only this node's; affinity ClientIP), the
//! client being the node's gateway address, the source the node's
//! packets to pods carry. A Service without a usable backend, or a
//! ClusterIP on a port it does not define, is refused with ECONNREFUSED.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use dataplane_common::{
    Backend, NodeConfig, PROTO_TCP, PROTO_UDP, SockFwdKey, SockRnatEntry, SockRnatKey, Stat,
    SvcInfo, SvcKey,
};

use crate::{
    ct, lb,
    maps::{SERVICES, SOCK_FWD, SOCK_RNAT},
    stats::count,
};

/// Return value: go on with the call.
const ALLOW: i32 = 1;
/// Return value: fail the call (with the error set by `bpf_set_retval`).
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// This node's configuration, if the socket is in this agent's network
/// namespace.
#[inline(always)]
fn ours(ctx: &SockAddrContext) -> Option<&'static NodeConfig> {
    let cfg = crate::node_config()?;
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    (cfg.netns_cookie != 0 && cookie == cfg.netns_cookie).then_some(cfg)
}

/// The call the hook runs for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Connect,
    /// `sendmsg()` / `sendto()` with an address (UDP).
    Sendmsg,
}

/// cgroup connect4 and sendmsg4.
#[inline(always)]
pub fn to_service(ctx: &SockAddrContext, call: Call) -> i32 {
    let Some(cfg) = ours(ctx) else {
        return ALLOW;
    };
    // SAFETY: the context the kernel handed us.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let key = SvcKey {
        vip: sa.user_ip4.to_ne_bytes(),
        port: (sa.user_port as u16).to_ne_bytes(),
        proto,
        _pad: 0,
    };
    // SAFETY: plain data, copied out.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        if lb::is_vip(key.vip) {
            count(Stat::SockRejectUndefinedPort, 0);
            return refuse();
        }
        return ALLOW;
    };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(b) = backend(ctx, cfg, &svc, &key, cookie, call) else {
        count(Stat::SockRejectNoBackend, 0);
        return refuse();
    };
    sa.user_ip4 = u32::from_ne_bytes(b.ip);
    sa.user_port = u32::from(u16::from_ne_bytes(b.port));
    let rk = SockRnatKey {
        cookie,
        backend_ip: b.ip,
        backend_port: b.port,
        _pad: [0; 2],
    };
    let rv = SockRnatEntry {
        vip: key.vip,
        vport: key.port,
        _pad: [0; 2],
    };
    if SOCK_RNAT.insert(rk, rv, 0).is_err() {
        count(Stat::SockMapFull, 0);
    }
    count(Stat::SockLb, 0);
    ALLOW
}

/// The backend for this call: an unconnected UDP socket keeps the one it
/// had for this frontend while it is live (its datagrams are one flow, as
/// conntrack would keep them); otherwise a new choice.
#[inline(always)]
fn backend(
    ctx: &SockAddrContext,
    cfg: &NodeConfig,
    svc: &SvcInfo,
    key: &SvcKey,
    cookie: u64,
    call: Call,
) -> Option<Backend> {
    if svc.count == 0 {
        return None;
    }
    let now = ct::now();
    if call == Call::Connect {
        return lb::pick_backend(ctx, svc, cfg.gateway, now);
    }
    let fk = SockFwdKey {
        cookie,
        vip: key.vip,
        vport: key.port,
        _pad: [0; 2],
    };
    // SAFETY: plain data, copied out.
    if let Some(b) = unsafe { SOCK_FWD.get(fk) }.copied()
        && lb::is_live(svc.id, &b)
    {
        return Some(b);
    }
    let b = lb::pick_backend(ctx, svc, cfg.gateway, now)?;
    if SOCK_FWD.insert(fk, b, 0).is_err() {
        count(Stat::SockMapFull, 0);
    }
    Some(b)
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: plain helper call, allowed at connect4 and sendmsg4.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REFUSE
}

/// cgroup recvmsg4 and getpeername4: a backend address this socket was
/// sent to in place of a ClusterIP is shown as that ClusterIP. These
/// hooks cannot refuse.
#[inline(always)]
pub fn from_service(ctx: &SockAddrContext) -> i32 {
    if ours(ctx).is_none() {
        return ALLOW;
    }
    // SAFETY: the context the kernel handed us.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rk = SockRnatKey {
        cookie,
        backend_ip: sa.user_ip4.to_ne_bytes(),
        backend_port: (sa.user_port as u16).to_ne_bytes(),
        _pad: [0; 2],
    };
    // SAFETY: plain data, copied out.
    if let Some(r) = unsafe { SOCK_RNAT.get(rk) }.copied() {
        sa.user_ip4 = u32::from_ne_bytes(r.vip);
        sa.user_port = u32::from(u16::from_ne_bytes(r.vport));
    }
    ALLOW
}
