//! `dataplane status` output: a table for people (default) and JSON for
//! scripts (`--output json`, the [`NodeStatus`] as it is).

use std::{fmt::Write as _, time::Duration};

use super::{NodeStatus, record::from_unix_ms, short_duration};

/// `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table.
    Human,
    /// The whole status as one JSON object.
    Json,
}

/// The JSON form.
pub fn json(st: &NodeStatus) -> String {
    serde_json::to_string_pretty(st).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn ago(now: std::time::SystemTime, ms: u64) -> String {
    match now.duration_since(from_unix_ms(ms)) {
        Ok(d) => format!("{} ago", short_duration(d)),
        Err(_) => "just now".into(),
    }
}

fn percent(entries: u64, max: u32) -> f64 {
    if max == 0 {
        0.0
    } else {
        100.0 * entries as f64 / f64::from(max)
    }
}

/// The table form.
pub fn human(st: &NodeStatus, now: std::time::SystemTime) -> String {
    let mut o = String::new();
    let age = st
        .agent
        .record_age_s
        .map(|s| short_duration(Duration::from_secs_f64(s.max(0.0))));
    // The agent first: whether what follows is live.
    if let (false, Some(pid)) = (st.agent.running, st.agent.starting_pid) {
        let _ = writeln!(
            o,
            "Agent:      STARTING (pid {pid}): no status yet, it is waiting for etcd, a network \
             config or a lease{}",
            if st.record.is_some() {
                "; below is the last status of an earlier run"
            } else {
                ""
            }
        );
    }
    match (&st.record, st.agent.running) {
        (_, false) if st.agent.starting_pid.is_some() => {}
        (Some(r), true) => {
            let _ = writeln!(
                o,
                "Agent:      running (pid {}), status written {} ago",
                r.pid,
                age.as_deref().unwrap_or("?")
            );
        }
        (Some(r), false) => {
            let _ = writeln!(
                o,
                "Agent:      NOT RUNNING (pid {} is gone); its last status is {} old. The data path \
                 runs on the pinned maps, but nothing follows etcd until an agent is back",
                r.pid,
                age.as_deref().unwrap_or("?")
            );
        }
        (None, _) => {
            let _ = writeln!(
                o,
                "Agent:      NOT RUNNING or never ran: {}",
                st.agent
                    .record_error
                    .as_deref()
                    .unwrap_or("no status record")
            );
        }
    }
    if let Some(r) = &st.record {
        let n = &r.node;
        let _ = writeln!(
            o,
            "Node:       subnet {} in {}, PublicIP {}, VtepMAC {}",
            n.subnet, n.network, n.public_ip, n.vtep_mac
        );
        let _ = writeln!(
            o,
            "            underlay {} (decap {}), bridge {}, MTU {}",
            n.underlay, n.decap, n.bridge, n.mtu
        );
        let lease = match (r.lease.held, st.lease_left_s) {
            (false, _) => "NOT HELD (being re-acquired)".to_string(),
            (true, Some(s)) if s >= 0.0 => {
                format!("held, {} left", short_duration(Duration::from_secs_f64(s)))
            }
            (true, Some(s)) => format!(
                "EXPIRED {} ago unless renewed since",
                short_duration(Duration::from_secs_f64(-s))
            ),
            (true, None) => "held".to_string(),
        };
        let _ = writeln!(o, "Lease:      {lease}");
        let conn = match r.etcd.connected {
            Some(true) => "connected",
            Some(false) => "DISCONNECTED (retrying)",
            None => "not watching yet",
        };
        let last = r
            .etcd
            .last_event_at_ms
            .map(|ms| format!("last event {}", ago(now, ms)))
            .unwrap_or_else(|| "no event yet".into());
        let _ = writeln!(
            o,
            "etcd:       {conn}, {last} ({})",
            r.etcd.endpoints.join(",")
        );
        let ready = if r.not_ready.is_empty() {
            "yes".to_string()
        } else {
            format!("no: {}", r.not_ready.join(", "))
        };
        let _ = writeln!(o, "Ready:      {ready}");
        let _ = writeln!(o, "Errors:     {} recovered from", r.errors);

        let _ = writeln!(o, "\nPEERS ({})", r.peers.len());
        if !r.peers.is_empty() {
            let _ = writeln!(
                o,
                "{:<20} {:<16} {:<18} SINCE",
                "SUBNET", "PUBLIC IP", "VTEP MAC"
            );
            for p in &r.peers {
                let _ = writeln!(
                    o,
                    "{:<20} {:<16} {:<18} {}",
                    p.subnet,
                    p.public_ip,
                    p.vtep_mac,
                    ago(now, p.since_ms)
                );
            }
        }
        let _ = writeln!(o, "\nSERVICES ({})", r.services.len());
        if !r.services.is_empty() {
            let _ = writeln!(o, "{:<40} {:>9} {:>15}", "NAME", "FRONTENDS", "READY/TOTAL");
            for s in &r.services {
                let _ = writeln!(
                    o,
                    "{:<40} {:>9} {:>15}",
                    s.name,
                    s.frontends,
                    format!("{}/{}", s.ready, s.total)
                );
            }
        }
    }

    let _ = writeln!(o);
    match &st.conntrack {
        Some(ct) => {
            let _ = writeln!(
                o,
                "Conntrack:  {} of {} entries ({:.1}%)",
                ct.entries,
                ct.max_entries,
                percent(ct.entries, ct.max_entries)
            );
        }
        None => {
            let _ = writeln!(o, "Conntrack:  unknown (no pinned conntrack map)");
        }
    }
    if !st.maps.is_empty() {
        let _ = writeln!(o, "\nMAPS");
        let _ = writeln!(
            o,
            "{:<16} {:<10} {:>10} {:>10} {:>7}",
            "NAME", "TYPE", "ENTRIES", "CAPACITY", "USE"
        );
        for m in &st.maps {
            let _ = writeln!(
                o,
                "{:<16} {:<10} {:>10} {:>10} {:>6.1}%",
                m.name,
                m.kind,
                m.entries,
                m.max_entries,
                percent(m.entries, m.max_entries)
            );
        }
    }
    let dropped: Vec<_> = st.drops.iter().filter(|d| d.packets > 0).collect();
    let _ = writeln!(o, "\nDROPS ({} reasons seen)", dropped.len());
    if !dropped.is_empty() {
        let _ = writeln!(o, "{:<28} {:>12} {:>16}", "REASON", "PACKETS", "BYTES");
        for d in dropped {
            let _ = writeln!(o, "{:<28} {:>12} {:>16}", d.reason, d.packets, d.bytes);
        }
    }
    let _ = writeln!(o, "\nPROGRAMS ({} attached)", st.programs.len());
    if !st.programs.is_empty() {
        let _ = writeln!(
            o,
            "{:<15} {:<12} {:<20} {:>8} PIN",
            "PROGRAM", "HOOK", "DEVICE", "PROG ID"
        );
        for p in &st.programs {
            let dev = match &p.iface {
                Some(n) => format!("{n} ({})", p.ifindex),
                // The cgroup socket programs have no device.
                None if p.hook == "cgroup" => "-".to_owned(),
                None => format!("ifindex {}", p.ifindex),
            };
            let _ = writeln!(
                o,
                "{:<15} {:<12} {:<20} {:>8} {}",
                p.program, p.hook, dev, p.program_id, p.pin
            );
        }
    }
    if !st.problems.is_empty() {
        let _ = writeln!(o, "\nCould not read:");
        for p in &st.problems {
            let _ = writeln!(o, "  {p}");
        }
    }
    o
}
