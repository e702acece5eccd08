//! TCP/IP counters of a network namespace (`/proc/net/snmp` and
//! `/proc/net/netstat` as a process inside it sees them, named as `nstat`
//! names them: `TcpRetransSegs`, `TcpExtTCPOFOQueue`), and the per-CPU
//! backlog drops of `/proc/net/softnet_stat` (machine-wide). The benchmark
//! takes them before and after a bulk run to say where retransmissions
//! come from: loss on the path, reordering, or spurious retransmission.

use std::collections::BTreeMap;

use anyhow::Context as _;

use crate::netns::NetNs;

pub type Counters = BTreeMap<String, u64>;

/// The counters the bulk runs report: the sender's view of its
/// retransmissions (what triggered them, whether they were undone as
/// spurious), and the receiver's view of what arrived (out of order,
/// duplicates, pruned or dropped from its queues).
pub const SENDER: &[(&str, &str)] = &[
    ("TcpRetransSegs", "segments retransmitted"),
    (
        "TcpExtTCPFastRetrans",
        "fast retransmits (SACK/dupack triggered)",
    ),
    (
        "TcpExtTCPSackRecovery",
        "SACK recovery episodes (loss or reordering inferred from SACK)",
    ),
    (
        "TcpExtTCPLostRetransmit",
        "retransmissions lost again (true loss)",
    ),
    ("TcpExtTCPTimeouts", "retransmission timeouts"),
    (
        "TcpExtTCPSACKReorder",
        "reordering detected from SACK (a hole filled later)",
    ),
    ("TcpExtTCPTSReorder", "reordering detected from timestamps"),
    (
        "TcpExtTCPDSACKRecv",
        "D-SACKs received: a retransmission was a duplicate (spurious)",
    ),
    (
        "TcpExtTCPDSACKOfoRecv",
        "D-SACKs received for out-of-order duplicates",
    ),
    (
        "TcpExtTCPDSACKUndo",
        "recoveries undone because D-SACKs showed them spurious",
    ),
    ("TcpExtTCPFullUndo", "recoveries fully undone (spurious)"),
    ("TcpExtTCPPartialUndo", "recoveries partially undone"),
    ("TcpExtTCPLossUndo", "loss recoveries undone"),
    (
        "TcpExtTCPSpuriousRtxHostQueues",
        "retransmits skipped: the original still in a host queue",
    ),
];

pub const RECEIVER: &[(&str, &str)] = &[
    ("TcpInSegs", "segments received"),
    ("TcpExtTCPOFOQueue", "segments queued out of order"),
    (
        "TcpExtTCPOFOMerge",
        "out-of-order segments merged (overlap)",
    ),
    (
        "TcpExtTCPOFODrop",
        "out-of-order segments dropped (no memory)",
    ),
    (
        "TcpExtTCPDSACKOldSent",
        "D-SACKs sent: a segment arrived twice",
    ),
    (
        "TcpExtTCPDSACKOfoSent",
        "D-SACKs sent for out-of-order duplicates",
    ),
    ("TcpExtTCPRcvQDrop", "segments dropped: receive queue full"),
    ("TcpExtPruneCalled", "receive queue pruned"),
    ("TcpExtRcvPruned", "segments dropped by pruning"),
    ("TcpExtTCPRcvCollapsed", "segments collapsed to save memory"),
    (
        "TcpExtTCPBacklogDrop",
        "segments dropped: socket backlog full",
    ),
    ("TcpInErrs", "segments received with errors (checksum)"),
];

/// Every counter of `/proc/net/snmp` and `/proc/net/netstat` in `ns`.
pub fn snapshot(ns: &NetNs) -> anyhow::Result<Counters> {
    let text = ns
        .sh("cat /proc/net/snmp /proc/net/netstat")
        .context("reading /proc/net/{snmp,netstat}")?;
    Ok(parse(&text))
}

/// `/proc/net/snmp` and `/proc/net/netstat` hold pairs of lines: names
/// (`TcpExt: SyncookiesSent ...`) then values (`TcpExt: 0 ...`).
fn parse(text: &str) -> Counters {
    let mut out = Counters::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((p1, n)), Some((p2, v))) = (names.split_once(':'), values.split_once(':')) else {
            continue;
        };
        if p1 != p2 {
            continue;
        }
        for (name, value) in n.split_whitespace().zip(v.split_whitespace()) {
            // Some snmp fields are signed (Tcp MaxConn -1): skip those.
            if let Ok(x) = value.parse::<u64>() {
                out.insert(format!("{p1}{name}"), x);
            }
        }
    }
    out
}

/// `after - before` per counter (counters that went backwards give 0).
pub fn delta(before: &Counters, after: &Counters) -> Counters {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .collect()
}

/// Packets the kernel dropped because a CPU's input backlog
/// (`netdev_max_backlog`) was full, summed over CPUs (second column of
/// `/proc/net/softnet_stat`, hexadecimal; not per namespace).
pub fn softnet_dropped() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|x| u64::from_str_radix(x, 16).ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_of_lines_become_named_counters() {
        let c = parse(
            "Tcp: RtoAlgorithm MaxConn RetransSegs\nTcp: 1 -1 42\n\
             TcpExt: TCPOFOQueue TCPSACKReorder\nTcpExt: 7 3\n",
        );
        assert_eq!(c.get("TcpRetransSegs"), Some(&42));
        assert_eq!(c.get("TcpExtTCPOFOQueue"), Some(&7));
        assert_eq!(c.get("TcpExtTCPSACKReorder"), Some(&3));
        assert_eq!(c.get("TcpMaxConn"), None);
        let mut b = c.clone();
        b.insert("TcpRetransSegs".into(), 50);
        assert_eq!(delta(&c, &b)["TcpRetransSegs"], 8);
        assert_eq!(delta(&b, &c)["TcpRetransSegs"], 0);
    }
}
