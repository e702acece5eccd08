use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use super::{DropCount, NodeStatus, record::*, render, short_duration};
use crate::bpf::{MapFill, PinnedProgram};

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dp-status-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn record(now: SystemTime) -> StatusRecord {
    StatusRecord {
        version: VERSION,
        pid: std::process::id(),
        start_ticks: process_start_ticks(std::process::id()).unwrap(),
        started_at_ms: unix_ms(now - Duration::from_secs(3600)),
        written_at_ms: unix_ms(now - Duration::from_secs(4)),
        pin_path: "/sys/fs/bpf/dataplane".into(),
        node: NodeRecord {
            subnet: "10.244.1.0/24".into(),
            network: "10.244.0.0/16".into(),
            public_ip: "192.168.77.1".into(),
            vtep_mac: "02:aa:bb:cc:dd:01".into(),
            underlay: "eth0".into(),
            bridge: "cni0".into(),
            decap: "tc".into(),
            mtu: 1450,
        },
        lease: LeaseRecord {
            held: true,
            expires_at_ms: Some(unix_ms(now + Duration::from_secs(2 * 3600 + 5 * 60 + 30))),
        },
        etcd: EtcdRecord {
            endpoints: vec!["http://10.0.0.1:2379".into()],
            connected: Some(true),
            last_event_at_ms: Some(unix_ms(now - Duration::from_secs(42))),
        },
        not_ready: vec![],
        peers: vec![PeerRecord {
            subnet: "10.244.2.0/24".into(),
            public_ip: "192.168.77.2".into(),
            vtep_mac: "02:aa:bb:cc:dd:02".into(),
            since_ms: unix_ms(now - Duration::from_secs(125)),
        }],
        services: vec![ServiceRecord {
            name: "default/web".into(),
            frontends: 2,
            ready: 3,
            total: 4,
        }],
        errors: 1,
    }
}

#[test]
fn the_start_time_is_counted_from_the_last_parenthesis() {
    // A command name with spaces and a parenthesis of its own.
    let stat =
        "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 2 0 987654 1000 200";
    assert_eq!(parse_start_ticks(stat), Some(987_654));
    assert_eq!(parse_start_ticks("4242 (x) S 1 2"), None, "cut short");
    let mine = process_start_ticks(std::process::id());
    assert!(mine.is_some_and(|t| t > 0));
    assert_eq!(process_start_ticks(u32::MAX), None, "no such process");
}

#[test]
fn a_record_is_written_whole_and_read_back() {
    let dir = scratch("rw");
    let path = dir.join("status.json");
    let now = SystemTime::now();
    let rec = record(now);
    rec.write(&path).unwrap();
    assert_eq!(StatusRecord::read(&path).unwrap(), rec);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["status.json"], "no temporary file left");
    assert!(writer_alive(&rec), "this process wrote it");
    let reused = StatusRecord {
        start_ticks: rec.start_ticks + 1,
        ..rec.clone()
    };
    assert!(!writer_alive(&reused), "same PID, another process");

    let old = StatusRecord {
        version: VERSION + 1,
        ..rec
    };
    old.write(&path).unwrap();
    let e = StatusRecord::read(&path).unwrap_err().to_string();
    assert!(e.contains(&format!("version {}", VERSION + 1)), "{e}");
    std::fs::write(&path, "{").unwrap();
    assert!(matches!(
        StatusRecord::read(&path),
        Err(RecordError::Malformed { .. })
    ));
    let e = StatusRecord::read(&dir.join("none.json")).unwrap_err();
    assert!(e.to_string().contains("no status record"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_record_path_follows_the_pin_path() {
    assert_eq!(
        record_path(Path::new("/sys/fs/bpf/dataplane")),
        Path::new("/run/dataplane/status%2Fsys%2Ffs%2Fbpf%2Fdataplane.json")
    );
}

fn with_pins(mut st: NodeStatus) -> NodeStatus {
    st.conntrack = Some(MapFill {
        name: "ct_v1".into(),
        kind: "LruHash".into(),
        entries: 131_072,
        max_entries: 262_144,
    });
    st.maps = vec![st.conntrack.clone().unwrap()];
    st.drops = vec![
        DropCount {
            reason: "drop_fib".into(),
            packets: 3,
            bytes: 300,
        },
        DropCount {
            reason: "drop_wrong_vni".into(),
            packets: 0,
            bytes: 0,
        },
    ];
    st.programs = vec![PinnedProgram {
        pin: "underlay_tc_2".into(),
        program: "from_underlay".into(),
        hook: "tcx ingress".into(),
        ifindex: 2,
        iface: Some("eth0".into()),
        program_id: 77,
    }];
    st
}

#[test]
fn the_table_says_what_runs_and_shows_every_part() {
    let now = SystemTime::now();
    let st = with_pins(NodeStatus::from_record(
        Path::new("/p"),
        Path::new("/run/dataplane/status.json"),
        Ok(record(now)),
        true,
        now,
    ));
    let out = render::human(&st, now);
    for want in [
        &format!(
            "Agent:      running (pid {}), status written 4s ago",
            std::process::id()
        ) as &str,
        "subnet 10.244.1.0/24 in 10.244.0.0/16, PublicIP 192.168.77.1, VtepMAC 02:aa:bb:cc:dd:01",
        "Lease:      held, 2h5m left",
        "etcd:       connected, last event 42s ago (http://10.0.0.1:2379)",
        "Ready:      yes",
        "10.244.2.0/24        192.168.77.2     02:aa:bb:cc:dd:02  2m5s ago",
        "default/web                                      2             3/4",
        "Conntrack:  131072 of 262144 entries (50.0%)",
        "drop_fib                                3              300",
        "from_underlay   tcx ingress  eth0 (2)                   77 underlay_tc_2",
    ] {
        assert!(out.contains(want), "{want:?} missing from\n{out}");
    }
    assert!(
        !out.contains("drop_wrong_vni"),
        "zero drops left out:\n{out}"
    );
    assert!(!out.contains("NOT RUNNING"));
}

#[test]
fn a_stopped_agent_is_said_so_with_the_age_of_its_record() {
    let now = SystemTime::now();
    let mut rec = record(now);
    rec.written_at_ms = unix_ms(now - Duration::from_secs(300));
    let st = with_pins(NodeStatus::from_record(
        Path::new("/p"),
        Path::new("/r"),
        Ok(rec),
        false,
        now,
    ));
    let out = render::human(&st, now);
    assert!(
        out.contains(&format!(
            "NOT RUNNING (pid {} is gone); its last status is 5m0s old",
            std::process::id()
        )),
        "{out}"
    );
    // The pinned part is shown all the same.
    assert!(out.contains("Conntrack:  131072 of 262144"), "{out}");

    let none = NodeStatus::from_record(
        Path::new("/p"),
        Path::new("/r"),
        Err(RecordError::Missing("/r".into())),
        false,
        now,
    );
    let out = render::human(&none, now);
    assert!(
        out.contains("NOT RUNNING or never ran: no status record at /r"),
        "{out}"
    );
}

#[test]
fn json_carries_the_same_status_for_scripts() {
    let now = SystemTime::now();
    let mut rec = record(now);
    rec.lease.expires_at_ms = Some(unix_ms(now - Duration::from_secs(10)));
    let st = with_pins(NodeStatus::from_record(
        Path::new("/p"),
        Path::new("/r"),
        Ok(rec),
        true,
        now,
    ));
    let text = render::json(&st);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["agent"]["running"], true);
    assert_eq!(v["record"]["node"]["subnet"], "10.244.1.0/24");
    assert_eq!(v["record"]["peers"][0]["public_ip"], "192.168.77.2");
    assert_eq!(v["record"]["services"][0]["ready"], 3);
    assert_eq!(v["conntrack"]["entries"], 131_072);
    assert_eq!(v["programs"][0]["hook"], "tcx ingress");
    let left = v["lease_left_s"].as_f64().unwrap();
    assert!((-11.0..-9.0).contains(&left), "expired 10 s ago: {left}");
    let back: NodeStatus = serde_json::from_str(&text).unwrap();
    assert_eq!(back, st);
    assert!(render::human(&st, now).contains("Lease:      EXPIRED 10s ago"));
}

#[test]
fn durations_are_short() {
    assert_eq!(short_duration(Duration::from_secs(59)), "59s");
    assert_eq!(short_duration(Duration::from_secs(61)), "1m1s");
    assert_eq!(short_duration(Duration::from_secs(3 * 3600 + 120)), "3h2m");
    assert_eq!(short_duration(Duration::from_secs(86_400 + 3600)), "1d1h");
}

#[test]
fn an_agent_that_holds_the_pins_but_wrote_nothing_yet_is_starting() {
    let now = SystemTime::now();
    let mut st = NodeStatus::from_record(
        Path::new("/p"),
        Path::new("/r"),
        Err(RecordError::Missing("/r".into())),
        false,
        now,
    );
    st.agent.starting_pid = Some(4242);
    let out = render::human(&st, now);
    assert!(
        out.starts_with("Agent:      STARTING (pid 4242): no status yet"),
        "{out}"
    );
    assert!(!out.contains("NOT RUNNING"), "{out}");
    assert!(!out.contains("earlier run"), "{out}");
    // An earlier run's record is shown as such.
    let mut old = record(now);
    old.pid = 1;
    let mut st = NodeStatus::from_record(Path::new("/p"), Path::new("/r"), Ok(old), false, now);
    st.agent.starting_pid = Some(4242);
    let out = render::human(&st, now);
    assert!(
        out.contains("below is the last status of an earlier run"),
        "{out}"
    );
    assert!(!out.contains("NOT RUNNING"), "{out}");
}
