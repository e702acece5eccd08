//! Connection tracking of ClusterIP flows: the entry's lifecycle as pure
//! functions, used by the BPF programs on every packet and by the agent's
//! sweeper, and unit-tested on the host.
//!
//! The model is netfilter's as kube-proxy configures it
//! (`nf_conntrack_tcp_loose=1`, ctstate INVALID dropped, the established
//! and close_wait timeouts kube-proxy sets), reduced to what can be told
//! from TCP flags alone: there is no sequence-number window check.
//!
//! | state | entered on | timeout (default) |
//! |---|---|---|
//! | `syn_sent` | a SYN with no entry | 120 s |
//! | `syn_recv` | the SYN-ACK from the backend | 60 s |
//! | `established` | the client's ACK of the SYN-ACK; or an ACK with no entry (loose pickup) | 24 h |
//! | `fin_wait` | the first FIN, from either side | 120 s |
//! | `close_wait` | an ACK (no FIN) from the other side after that FIN | 1 h |
//! | `time_wait` | both FINs seen | 120 s |
//! | `close` | a RST from either side | 10 s |
//! | `udp_unreplied` | a datagram with no entry | 30 s |
//! | `udp_replied` | a datagram back from the backend | 120 s |
//!
//! Every packet of a flow restarts its state's timeout. An entry whose
//! timeout has passed is expired: the data path treats it as absent, and
//! the sweeper removes it.

use crate::{Backend, CtKey, PROTO_TCP, RnatEntry};

/// TCP flag bits (the 14th byte of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// `CtEntry::flags`: a FIN came from the client (original direction).
pub const CT_F_FIN_ORIG: u8 = 1 << 0;
/// `CtEntry::flags`: a FIN came from the backend (reply direction).
pub const CT_F_FIN_REPLY: u8 = 1 << 1;
/// `CtEntry::flags`: a packet came back from the backend (netfilter's
/// SEEN_REPLY). Entries without it are the first to go under pressure.
pub const CT_F_SEEN_REPLY: u8 = 1 << 2;
/// `CtEntry::flags`: picked up mid-stream (a TCP segment without SYN and
/// without an entry), not opened by a SYN seen here.
pub const CT_F_PICKED_UP: u8 = 1 << 3;
/// `CtEntry::flags`: copied from the previous release's `ct_v1` at an
/// upgrade (its state then is assumed, not seen).
pub const CT_F_MIGRATED: u8 = 1 << 4;
/// `CtEntry::flags`: a north-south flow (from outside to a NodePort,
/// externalIP or LoadBalancer IP); its replies leave through the underlay
/// towards the client.
pub const CT_F_NORTH_SOUTH: u8 = 1 << 5;

/// Last-seen is written only when it is at least this old (or the state
/// changes): a cache-line write per packet would cost more than the
/// lookup. Timeouts are whole seconds, so this costs at most one second
/// of precision.
pub const REFRESH_NS: u64 = 1_000_000_000;

const NS_PER_S: u64 = 1_000_000_000;

/// The state of a tracked flow (`CtEntry::state`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtState {
    SynSent = 1,
    SynRecv = 2,
    Established = 3,
    FinWait = 4,
    CloseWait = 5,
    TimeWait = 6,
    Close = 7,
    UdpUnreplied = 8,
    UdpReplied = 9,
}

impl CtState {
    pub const ALL: &'static [CtState] = &[
        CtState::SynSent,
        CtState::SynRecv,
        CtState::Established,
        CtState::FinWait,
        CtState::CloseWait,
        CtState::TimeWait,
        CtState::Close,
        CtState::UdpUnreplied,
        CtState::UdpReplied,
    ];

    /// The state stored as `n`; `None` for a value no release wrote.
    #[inline(always)]
    pub const fn from_u8(n: u8) -> Option<CtState> {
        Some(match n {
            1 => CtState::SynSent,
            2 => CtState::SynRecv,
            3 => CtState::Established,
            4 => CtState::FinWait,
            5 => CtState::CloseWait,
            6 => CtState::TimeWait,
            7 => CtState::Close,
            8 => CtState::UdpUnreplied,
            9 => CtState::UdpReplied,
            _ => return None,
        })
    }

    /// As `dataplane conntrack list` prints it (netfilter's names).
    pub const fn name(self) -> &'static str {
        match self {
            CtState::SynSent => "syn_sent",
            CtState::SynRecv => "syn_recv",
            CtState::Established => "established",
            CtState::FinWait => "fin_wait",
            CtState::CloseWait => "close_wait",
            CtState::TimeWait => "time_wait",
            CtState::Close => "close",
            CtState::UdpUnreplied => "udp_unreplied",
            CtState::UdpReplied => "udp_replied",
        }
    }
}

/// Which way a packet goes through a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client -> ClusterIP (the forward entry's key).
    Orig,
    /// Backend -> client (the reverse-NAT entry's key).
    Reply,
}

/// Per-state timeouts in seconds: the single entry of
/// [`crate::map_names::CT_CONFIG`], written by the agent from its flags.
/// A zero field means the default (so a map nobody wrote yet still works).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtTimeouts {
    pub tcp_syn_sent: u32,
    pub tcp_syn_recv: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_close_wait: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    pub udp_unreplied: u32,
    pub udp_replied: u32,
    pub _pad: u32,
}

impl CtTimeouts {
    /// netfilter's defaults, with the two kube-proxy sets
    /// (`--conntrack-tcp-timeout-established` 24 h,
    /// `--conntrack-tcp-timeout-close-wait` 1 h).
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn_sent: 120,
        tcp_syn_recv: 60,
        tcp_established: 86_400,
        tcp_fin_wait: 120,
        tcp_close_wait: 3_600,
        tcp_time_wait: 120,
        tcp_close: 10,
        udp_unreplied: 30,
        udp_replied: 120,
        _pad: 0,
    };

    /// The timeout of `state` in seconds (the default where unset).
    #[inline(always)]
    pub const fn secs(&self, state: CtState) -> u32 {
        let (set, default) = match state {
            CtState::SynSent => (self.tcp_syn_sent, Self::DEFAULT.tcp_syn_sent),
            CtState::SynRecv => (self.tcp_syn_recv, Self::DEFAULT.tcp_syn_recv),
            CtState::Established => (self.tcp_established, Self::DEFAULT.tcp_established),
            CtState::FinWait => (self.tcp_fin_wait, Self::DEFAULT.tcp_fin_wait),
            CtState::CloseWait => (self.tcp_close_wait, Self::DEFAULT.tcp_close_wait),
            CtState::TimeWait => (self.tcp_time_wait, Self::DEFAULT.tcp_time_wait),
            CtState::Close => (self.tcp_close, Self::DEFAULT.tcp_close),
            CtState::UdpUnreplied => (self.udp_unreplied, Self::DEFAULT.udp_unreplied),
            CtState::UdpReplied => (self.udp_replied, Self::DEFAULT.udp_replied),
        };
        if set == 0 { default } else { set }
    }
}

/// A flow's forward key reversed onto its backend: the key of its
/// reverse-NAT entry (backend -> client, or -> the hairpin address).
#[inline(always)]
pub fn reply_key(fwd: &CtKey, backend: &Backend, snat: [u8; 4]) -> CtKey {
    CtKey {
        saddr: backend.ip,
        daddr: if snat == [0; 4] { fwd.saddr } else { snat },
        sport: backend.port,
        dport: fwd.sport,
        proto: fwd.proto,
        _pad: [0; 3],
    }
}

/// The reverse-NAT key of the flow `fwd` stored as `e`: [`reply_key`],
/// with the SNAT port in place of the client's when the flow has one
/// (NodePort, externalTrafficPolicy Cluster).
#[inline(always)]
pub fn entry_reply_key(fwd: &CtKey, e: &crate::CtEntry) -> CtKey {
    let mut k = reply_key(fwd, &e.backend, e.snat);
    if e.snat_port != [0; 2] {
        k.dport = e.snat_port;
    }
    k
}

/// The forward key of the flow a reverse-NAT entry belongs to.
#[inline(always)]
pub fn forward_key(r: &RnatEntry, proto: u8) -> CtKey {
    CtKey {
        saddr: r.client,
        daddr: r.vip,
        sport: r.client_port,
        dport: r.vport,
        proto,
        _pad: [0; 3],
    }
}

/// What a TCP segment that finds no (live) entry does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpNew {
    /// A SYN (no ACK, FIN or RST): a new connection, `syn_sent`.
    Open,
    /// An ACK without SYN, FIN or RST (data, keep-alive): picked up as
    /// `established`, as `nf_conntrack_tcp_loose=1` does.
    Pickup,
    /// Anything else (RST, FIN, SYN-ACK, no flags): netfilter's INVALID,
    /// which kube-proxy drops.
    Invalid,
}

/// netfilter's `tcp_conntracks` row for "no connection" (sNO).
#[inline(always)]
pub const fn tcp_new(flags: u8) -> TcpNew {
    if flags & (TCP_RST | TCP_FIN) != 0 {
        TcpNew::Invalid
    } else if flags & TCP_SYN != 0 {
        if flags & TCP_ACK == 0 {
            TcpNew::Open
        } else {
            TcpNew::Invalid
        }
    } else if flags & TCP_ACK != 0 {
        TcpNew::Pickup
    } else {
        TcpNew::Invalid
    }
}

/// The state and flags a new entry starts with, for a packet in the
/// original direction that finds none (`Invalid` TCP segments make none).
#[inline(always)]
pub const fn initial(proto: u8, tcp_flags: u8) -> Option<(CtState, u8)> {
    if proto != PROTO_TCP {
        return Some((CtState::UdpUnreplied, 0));
    }
    match tcp_new(tcp_flags) {
        TcpNew::Open => Some((CtState::SynSent, 0)),
        TcpNew::Pickup => Some((CtState::Established, CT_F_PICKED_UP)),
        TcpNew::Invalid => None,
    }
}

/// What a packet of a tracked (live) flow does to its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The entry's new state and flags (possibly unchanged).
    To(CtState, u8),
    /// A SYN from the client on a closed flow (`time_wait`, `close`):
    /// the tuple is reused by a new connection. The old entry goes and
    /// the packet opens a new flow, with a new backend choice, as
    /// netfilter does when it reopens a connection.
    Reopen,
}

/// The TCP state machine: `state`/`flags` of the entry, a segment with
/// `tcp` flags going `dir`.
#[inline(always)]
pub const fn tcp_step(state: CtState, flags: u8, dir: Dir, tcp: u8) -> Step {
    let (my_fin, other_fin) = match dir {
        Dir::Orig => (CT_F_FIN_ORIG, CT_F_FIN_REPLY),
        Dir::Reply => (CT_F_FIN_REPLY, CT_F_FIN_ORIG),
    };
    let flags = match dir {
        Dir::Reply => flags | CT_F_SEEN_REPLY,
        Dir::Orig => flags,
    };
    let syn = tcp & TCP_SYN != 0;
    let ack = tcp & TCP_ACK != 0;
    let fin = tcp & TCP_FIN != 0;
    let is_orig = matches!(dir, Dir::Orig);
    if matches!(state, CtState::TimeWait | CtState::Close) && is_orig && syn && !ack {
        return Step::Reopen;
    }
    if tcp & TCP_RST != 0 {
        return Step::To(CtState::Close, flags);
    }
    let to = match state {
        CtState::SynSent if !is_orig && syn && ack => CtState::SynRecv,
        CtState::SynRecv if is_orig && fin => return Step::To(CtState::FinWait, flags | my_fin),
        CtState::SynRecv if is_orig && ack && !syn => CtState::Established,
        CtState::Established if fin => return Step::To(CtState::FinWait, flags | my_fin),
        CtState::FinWait | CtState::CloseWait if fin => {
            let flags = flags | my_fin;
            if flags & other_fin != 0 {
                return Step::To(CtState::TimeWait, flags);
            }
            return Step::To(state, flags);
        }
        // The other side acknowledges the FIN (without sequence numbers,
        // its first ACK after the FIN is taken for that) and may go on
        // sending: half-closed, kube-proxy's 1 h close_wait.
        CtState::FinWait if ack && flags & other_fin != 0 => CtState::CloseWait,
        s => s,
    };
    Step::To(to, flags)
}

/// UDP: unreplied until a datagram comes back.
#[inline(always)]
pub const fn udp_step(state: CtState, flags: u8, dir: Dir) -> (CtState, u8) {
    match dir {
        Dir::Reply => (CtState::UdpReplied, flags | CT_F_SEEN_REPLY),
        Dir::Orig => (state, flags),
    }
}

/// How long since `last_seen_ns` at `now_ns` (0 if the clock reads
/// earlier, as another CPU's stamp can).
#[inline(always)]
pub const fn idle_ns(last_seen_ns: u64, now_ns: u64) -> u64 {
    now_ns.saturating_sub(last_seen_ns)
}

/// Whether an entry in `state` last seen at `last_seen_ns` has timed out
/// at `now_ns` (both `bpf_ktime_get_ns`, CLOCK_MONOTONIC). A state no
/// release wrote is expired.
#[inline(always)]
pub const fn is_expired(state: u8, last_seen_ns: u64, now_ns: u64, t: &CtTimeouts) -> bool {
    match CtState::from_u8(state) {
        Some(s) => idle_ns(last_seen_ns, now_ns) > t.secs(s) as u64 * NS_PER_S,
        None => true,
    }
}

/// Whether a flow in `state` may give up its NAT port to a new flow
/// (the SNAT port allocators take over such ports): it is closed
/// (TIME_WAIT, CLOSE; netfilter reuses such tuples too) or expired.
#[inline(always)]
pub const fn releases_port(state: u8, last_seen_ns: u64, now_ns: u64, t: &CtTimeouts) -> bool {
    state == CtState::TimeWait as u8
        || state == CtState::Close as u8
        || is_expired(state, last_seen_ns, now_ns, t)
}

/// The write a packet makes to a live entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observe {
    /// Nothing changed and last-seen is recent enough: no write.
    Keep,
    /// Write these.
    Write {
        state: CtState,
        flags: u8,
        last_seen_ns: u64,
    },
    /// See [`Step::Reopen`].
    Reopen,
}

/// A packet of `proto` (TCP flags `tcp`) going `dir` through a live entry
/// (`state`, `flags`, `last_seen_ns`) at `now_ns`.
#[inline(always)]
pub const fn observe(
    state: CtState,
    flags: u8,
    last_seen_ns: u64,
    proto: u8,
    dir: Dir,
    tcp: u8,
    now_ns: u64,
) -> Observe {
    let (to, to_flags) = if proto == PROTO_TCP {
        match tcp_step(state, flags, dir, tcp) {
            Step::To(s, f) => (s, f),
            Step::Reopen => return Observe::Reopen,
        }
    } else {
        udp_step(state, flags, dir)
    };
    let changed = to as u8 != state as u8 || to_flags != flags;
    if !changed && idle_ns(last_seen_ns, now_ns) < REFRESH_NS {
        return Observe::Keep;
    }
    Observe::Write {
        state: to,
        flags: to_flags,
        // Never move the stamp backwards (another CPU may be ahead).
        last_seen_ns: if now_ns > last_seen_ns {
            now_ns
        } else {
            last_seen_ns
        },
    }
}

/// Under pressure, which entries go first (lower first); `None` for the
/// ones that never do: established TCP and UDP flows both sides have
/// spoken in. netfilter's early_drop spares "assured" flows the same way;
/// closing flows go here too, before any established one.
#[inline(always)]
pub const fn evict_rank(state: u8, flags: u8) -> Option<u8> {
    let Some(state) = CtState::from_u8(state) else {
        return Some(0);
    };
    let replied = flags & CT_F_SEEN_REPLY != 0;
    Some(match state {
        CtState::Close => 0,
        CtState::TimeWait => 1,
        CtState::SynSent | CtState::UdpUnreplied => 2,
        CtState::SynRecv => 3,
        CtState::Established | CtState::UdpReplied if !replied => 3,
        CtState::FinWait => 4,
        CtState::CloseWait => 5,
        CtState::Established | CtState::UdpReplied => return None,
    })
}

/// Early drop starts when the table holds more than this share (percent)
/// of its entries after expired ones are gone...
pub const EARLY_DROP_ABOVE_PCT: u64 = 90;
/// ...and removes candidates until it holds this share.
pub const EARLY_DROP_TARGET_PCT: u64 = 85;

/// How many entries early drop should remove from a table holding
/// `live` of `max` entries.
#[inline(always)]
pub const fn early_drop_budget(live: u64, max: u64) -> u64 {
    if live * 100 <= max * EARLY_DROP_ABOVE_PCT {
        return 0;
    }
    live.saturating_sub(max * EARLY_DROP_TARGET_PCT / 100)
}

/// Defines [`CtGc`] from one list, as `stats!` does for `Stat`.
macro_rules! ct_gc {
    ($( $variant:ident = $num:literal, $name:literal, $meaning:literal; )*) => {
        /// The sweeper's counters: indexes of
        /// [`crate::map_names::CT_GC`] (u64 each), written by the agent,
        /// readable while it is down. Stable numbers, never reused.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum CtGc {
            $( #[doc = $meaning] $variant = $num, )*
        }

        impl CtGc {
            pub const ALL: &'static [CtGc] = &[$(CtGc::$variant),*];

            pub const fn name(self) -> &'static str {
                match self { $(CtGc::$variant => $name,)* }
            }

            pub const fn meaning(self) -> &'static str {
                match self { $(CtGc::$variant => $meaning,)* }
            }
        }
    };
}

ct_gc! {
    Sweeps = 0, "ct_sweeps", "sweeps of the conntrack table run";
    Expired = 1, "ct_evict_expired", "flows removed (both directions) because their state's timeout passed";
    EarlyDrop = 2, "ct_evict_early_drop", "unestablished or closing flows removed because the table was more than 90% full";
    OrphanReply = 3, "ct_evict_orphan_reply", "reverse-NAT entries removed because no live flow pointed at them (two sweeps in a row)";
    Flushed = 4, "ct_flushed", "flows removed by `dataplane conntrack flush`";
    // 5 and 6 were migration counts before the first release; the
    // migration framework (dataplane::bpf::migrate) logs them instead.
    Entries = 7, "ct_entries", "flows in the table at the last sweep (a gauge)";
    LastSweepUnix = 8, "ct_last_sweep_unix", "wall-clock time of the last sweep, seconds since 1970 (a gauge)";
    MasqExpired = 9, "masq_evict_expired", "masqueraded flows removed (both directions) because their state's timeout passed";
    MasqOrphanReply = 10, "masq_evict_orphan_reply", "masquerade reverse entries removed because no live flow pointed at them (two sweeps in a row)";
    MasqEntries = 11, "masq_entries", "masqueraded flows in the table at the last sweep (a gauge)";
    MasqFlushed = 12, "masq_flushed", "masqueraded flows removed by `dataplane conntrack flush`";
}

/// Size of [`crate::map_names::CT_GC`]; room for later counters.
pub const CT_GC_LEN: u32 = 16;

const _: () = {
    let mut i = 0;
    while i < CtGc::ALL.len() {
        assert!((CtGc::ALL[i] as u32) < CT_GC_LEN);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PROTO_UDP;

    const S: u64 = NS_PER_S;

    fn step(state: CtState, flags: u8, dir: Dir, tcp: u8) -> (CtState, u8) {
        match tcp_step(state, flags, dir, tcp) {
            Step::To(s, f) => (s, f),
            Step::Reopen => panic!("reopen from {state:?}"),
        }
    }

    #[test]
    fn closed_or_expired_flows_release_their_port() {
        let t = CtTimeouts::DEFAULT;
        let now = 1_000 * S;
        for s in [CtState::TimeWait, CtState::Close] {
            assert!(releases_port(s as u8, now, now, &t), "{s:?}");
        }
        for s in [
            CtState::SynSent,
            CtState::Established,
            CtState::FinWait,
            CtState::CloseWait,
            CtState::UdpUnreplied,
            CtState::UdpReplied,
        ] {
            assert!(!releases_port(s as u8, now - S, now, &t), "{s:?}");
        }
        // Idle past its timeout: released whatever the state.
        let est = t.secs(CtState::Established) as u64 * S;
        assert!(releases_port(
            CtState::Established as u8,
            now,
            now + est + S,
            &t
        ));
        assert!(!releases_port(
            CtState::Established as u8,
            now,
            now + est - S,
            &t
        ));
        // A state no release wrote.
        assert!(releases_port(250, now, now, &t));
    }

    #[test]
    fn a_whole_tcp_connection() {
        use CtState::*;
        use Dir::*;
        let (mut s, mut f) = initial(PROTO_TCP, TCP_SYN).unwrap();
        assert_eq!((s, f), (SynSent, 0));
        let walk: &[(Dir, u8, CtState)] = &[
            (Orig, TCP_SYN, SynSent), // retransmitted SYN
            (Reply, TCP_SYN | TCP_ACK, SynRecv),
            (Orig, TCP_ACK, Established),
            (Orig, TCP_ACK, Established),
            (Reply, TCP_ACK, Established),
            (Orig, TCP_FIN | TCP_ACK, FinWait),
            (Orig, TCP_FIN | TCP_ACK, FinWait), // retransmitted FIN
            (Reply, TCP_ACK, CloseWait),
            (Reply, TCP_ACK, CloseWait), // the server keeps sending
            (Reply, TCP_FIN | TCP_ACK, TimeWait),
            (Orig, TCP_ACK, TimeWait),
        ];
        for (i, &(dir, tcp, want)) in walk.iter().enumerate() {
            (s, f) = step(s, f, dir, tcp);
            assert_eq!(s, want, "step {i}: {dir:?} {tcp:#x}");
        }
        assert_eq!(f, CT_F_FIN_ORIG | CT_F_FIN_REPLY | CT_F_SEEN_REPLY);
    }

    #[test]
    fn fins_crossing_and_resets() {
        use CtState::*;
        use Dir::*;
        // Both sides close at once: FIN, FIN -> time_wait without close_wait.
        let (s, f) = step(Established, CT_F_SEEN_REPLY, Reply, TCP_FIN | TCP_ACK);
        assert_eq!(s, FinWait);
        assert_eq!(step(s, f, Orig, TCP_FIN | TCP_ACK).0, TimeWait);
        // A RST from either side, in any state, closes.
        for st in [SynSent, SynRecv, Established, FinWait, CloseWait, TimeWait] {
            assert_eq!(step(st, 0, Orig, TCP_RST).0, Close, "{st:?}");
            assert_eq!(step(st, 0, Reply, TCP_RST | TCP_ACK).0, Close, "{st:?}");
        }
        // The SYN-ACK counts only from the backend.
        assert_eq!(step(SynSent, 0, Orig, TCP_SYN | TCP_ACK).0, SynSent);
        // An established flow ignores a stray SYN (netfilter: ignore).
        assert_eq!(step(Established, 0, Orig, TCP_SYN).0, Established);
    }

    #[test]
    fn a_syn_on_a_closed_flow_reopens_it() {
        for st in [CtState::TimeWait, CtState::Close] {
            assert_eq!(tcp_step(st, 0, Dir::Orig, TCP_SYN), Step::Reopen);
            // Not from the backend, and not a SYN-ACK.
            assert_ne!(tcp_step(st, 0, Dir::Reply, TCP_SYN), Step::Reopen);
            assert_ne!(tcp_step(st, 0, Dir::Orig, TCP_SYN | TCP_ACK), Step::Reopen);
        }
        for st in [CtState::SynSent, CtState::Established, CtState::FinWait] {
            assert_ne!(tcp_step(st, 0, Dir::Orig, TCP_SYN), Step::Reopen);
        }
    }

    #[test]
    fn segments_without_an_entry_as_netfilter_with_loose_pickup() {
        assert_eq!(tcp_new(TCP_SYN), TcpNew::Open);
        assert_eq!(tcp_new(TCP_ACK), TcpNew::Pickup);
        assert_eq!(tcp_new(TCP_ACK | 0x08), TcpNew::Pickup); // PSH|ACK: data
        for invalid in [
            TCP_RST,
            TCP_RST | TCP_ACK,
            TCP_FIN | TCP_ACK,
            TCP_SYN | TCP_ACK,
            TCP_SYN | TCP_FIN,
            0,
        ] {
            assert_eq!(tcp_new(invalid), TcpNew::Invalid, "{invalid:#x}");
            assert_eq!(initial(PROTO_TCP, invalid), None);
        }
        assert_eq!(
            initial(PROTO_TCP, TCP_ACK),
            Some((CtState::Established, CT_F_PICKED_UP))
        );
        assert_eq!(initial(PROTO_UDP, 0), Some((CtState::UdpUnreplied, 0)));
    }

    #[test]
    fn udp_is_unreplied_until_an_answer() {
        let (s, f) = udp_step(CtState::UdpUnreplied, 0, Dir::Orig);
        assert_eq!(s, CtState::UdpUnreplied);
        let (s, f) = udp_step(s, f, Dir::Reply);
        assert_eq!((s, f), (CtState::UdpReplied, CT_F_SEEN_REPLY));
        assert_eq!(udp_step(s, f, Dir::Orig).0, CtState::UdpReplied);
    }

    #[test]
    fn timeouts_per_state_with_defaults_for_unset_fields() {
        let t = CtTimeouts::default();
        assert_eq!(t.secs(CtState::Established), 86_400);
        assert_eq!(t.secs(CtState::CloseWait), 3_600);
        assert_eq!(t.secs(CtState::Close), 10);
        assert_eq!(t.secs(CtState::UdpUnreplied), 30);
        assert_eq!(t.secs(CtState::UdpReplied), 120);
        let t = CtTimeouts {
            tcp_time_wait: 2,
            ..CtTimeouts::default()
        };
        assert_eq!(t.secs(CtState::TimeWait), 2);
        let tw = CtState::TimeWait as u8;
        assert!(!is_expired(tw, 10 * S, 12 * S, &t), "exactly 2 s: not yet");
        assert!(is_expired(tw, 10 * S, 12 * S + 1, &t));
        assert!(!is_expired(tw, 10 * S, 9 * S, &t), "clock behind the stamp");
        assert!(
            !is_expired(CtState::Established as u8, 0, 86_400 * S, &t),
            "24 h default"
        );
        assert!(is_expired(0, 10 * S, 10 * S, &t), "unknown state");
    }

    #[test]
    fn last_seen_is_written_coarsely() {
        use CtState::*;
        let est = |last, now, tcp| {
            observe(
                Established,
                CT_F_SEEN_REPLY,
                last,
                PROTO_TCP,
                Dir::Orig,
                tcp,
                now,
            )
        };
        assert_eq!(est(10 * S, 10 * S + S / 2, TCP_ACK), Observe::Keep);
        assert_eq!(
            est(10 * S, 11 * S, TCP_ACK),
            Observe::Write {
                state: Established,
                flags: CT_F_SEEN_REPLY,
                last_seen_ns: 11 * S
            }
        );
        // A state change is written at once.
        assert_eq!(
            est(10 * S, 10 * S + 1, TCP_FIN | TCP_ACK),
            Observe::Write {
                state: FinWait,
                flags: CT_F_SEEN_REPLY | CT_F_FIN_ORIG,
                last_seen_ns: 10 * S + 1
            }
        );
        // Never backwards.
        assert_eq!(
            est(10 * S, 9 * S, TCP_RST),
            Observe::Write {
                state: Close,
                flags: CT_F_SEEN_REPLY,
                last_seen_ns: 10 * S
            }
        );
        assert_eq!(
            observe(Close, 0, 0, PROTO_TCP, Dir::Orig, TCP_SYN, S),
            Observe::Reopen
        );
    }

    #[test]
    fn pressure_spares_established_and_replied_flows() {
        let r = |s: CtState, f| evict_rank(s as u8, f);
        assert_eq!(r(CtState::Established, CT_F_SEEN_REPLY), None);
        assert_eq!(r(CtState::UdpReplied, CT_F_SEEN_REPLY), None);
        // Picked up and never answered: not assured, may go.
        assert_eq!(r(CtState::Established, CT_F_PICKED_UP), Some(3));
        assert!(r(CtState::Close, 0) < r(CtState::TimeWait, 0));
        assert!(r(CtState::TimeWait, 0) < r(CtState::SynSent, 0));
        assert!(r(CtState::SynSent, 0) < r(CtState::FinWait, CT_F_SEEN_REPLY));
        assert!(r(CtState::FinWait, 0) < r(CtState::CloseWait, 0));
        assert_eq!(evict_rank(0, 0), Some(0), "unknown state first");

        assert_eq!(early_drop_budget(90, 100), 0);
        assert_eq!(early_drop_budget(91, 100), 6);
        assert_eq!(early_drop_budget(100, 100), 15);
        assert_eq!(early_drop_budget(0, 0), 0);
    }

    #[test]
    fn reply_and_forward_keys_are_inverse() {
        let fwd = CtKey {
            saddr: [10, 244, 1, 5],
            daddr: [10, 96, 0, 10],
            sport: 40000u16.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let b = Backend {
            ip: [10, 244, 2, 7],
            port: 8080u16.to_be_bytes(),
            _pad: [0; 2],
        };
        let rk = reply_key(&fwd, &b, [0; 4]);
        assert_eq!(
            (rk.saddr, rk.daddr, rk.sport, rk.dport),
            (b.ip, fwd.saddr, b.port, fwd.sport)
        );
        let r = RnatEntry {
            vip: fwd.daddr,
            vport: fwd.dport,
            client_port: fwd.sport,
            client: fwd.saddr,
        };
        assert_eq!(forward_key(&r, PROTO_TCP), fwd);
        assert_eq!(
            reply_key(&fwd, &b, [169, 254, 77, 1]).daddr,
            [169, 254, 77, 1]
        );
    }
}
