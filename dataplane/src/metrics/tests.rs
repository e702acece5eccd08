use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dataplane_common::{Counter, PROTO_TCP, Stat, SvcCounters, SvcKey};
use hyper::StatusCode;

use super::{
    EventKind, Metrics, ReadyPart,
    datapath::Snapshot,
    http::{STUCK_AFTER, health, readiness},
};
use crate::bpf::MapFill;

/// The value of the sample `name` (with its labels exactly as encoded).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn snapshot() -> Snapshot {
    Snapshot {
        stats: vec![
            (
                Stat::Encapsulated,
                Counter {
                    packets: 7,
                    bytes: 700,
                },
            ),
            (
                Stat::DropFib,
                Counter {
                    packets: 2,
                    bytes: 120,
                },
            ),
        ],
        services: vec![(
            SvcKey {
                vip: [10, 96, 0, 10],
                port: 80u16.to_be_bytes(),
                proto: PROTO_TCP,
                _pad: 0,
            },
            SvcCounters {
                new_flows: 5,
                packets: 50,
                bytes: 5000,
                rejections: 3,
            },
        )],
        fill: vec![MapFill {
            name: "ct_v1".into(),
            kind: "LruHash".into(),
            entries: 12,
            max_entries: 262_144,
        }],
    }
}

#[test]
fn the_data_path_is_read_at_every_scrape_under_stable_names() {
    let m = Metrics::new();
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let r = reads.clone();
    m.datapath.set_source(move || {
        let n = r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut s = snapshot();
        // Moves between scrapes, as the maps do.
        s.stats[0].1.packets += n;
        s
    });
    let text = m.encode();
    assert_eq!(
        sample(&text, r#"dataplane_packets_total{outcome="encapsulated"}"#),
        Some(7.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"dataplane_bytes_total{outcome="drop_fib"}"#),
        Some(120.0)
    );
    assert_eq!(
        sample(&text, r#"dataplane_drops_total{reason="drop_fib"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"dataplane_drops_total{reason="encapsulated"}"#),
        None,
        "only drops are drops"
    );
    assert_eq!(
        sample(
            &text,
            r#"dataplane_service_new_flows_total{frontend="10.96.0.10:80/TCP"}"#
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"dataplane_service_rejections_total{frontend="10.96.0.10:80/TCP"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, r#"dataplane_map_entries{map="ct_v1"}"#),
        Some(12.0)
    );
    assert_eq!(
        sample(&text, r#"dataplane_map_capacity{map="ct_v1"}"#),
        Some(262_144.0)
    );
    assert!(text.contains("# TYPE dataplane_packets counter"), "{text}");
    assert!(text.ends_with("# EOF\n"), "a complete OpenMetrics message");
    // Read again, not a copy: the next scrape sees the maps move.
    let text = m.encode();
    assert_eq!(
        sample(&text, r#"dataplane_packets_total{outcome="encapsulated"}"#),
        Some(8.0)
    );
}

#[test]
fn without_pins_the_data_path_is_left_out() {
    let text = Metrics::new().encode();
    assert!(!text.contains("dataplane_packets"), "{text}");
    assert!(text.contains("dataplane_lease_renewals_total 0"), "{text}");
}

#[test]
fn the_agent_reports_through_named_calls() {
    let m = Metrics::new();
    let expires = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    m.lease_renewed(expires);
    m.lease_renewed(expires);
    m.lease_renewal_failed();
    m.etcd_reconnected("peers");
    m.watch_relisted("services");
    m.watch_relisted("services");
    m.set_watch_up("peers", true);
    m.observe_apply(EventKind::Peers, Duration::from_micros(300));
    m.observe_apply(EventKind::Services, Duration::from_millis(20));
    m.error();
    let text = m.encode();
    for (name, want) in [
        ("dataplane_lease_renewals_total", 2.0),
        ("dataplane_lease_renewal_failures_total", 1.0),
        ("dataplane_lease_expiry_timestamp_seconds", 2e9),
        (r#"dataplane_etcd_reconnects_total{watch="peers"}"#, 1.0),
        (
            r#"dataplane_etcd_watch_relists_total{watch="services"}"#,
            2.0,
        ),
        (r#"dataplane_etcd_watch_up{watch="peers"}"#, 1.0),
        (r#"dataplane_etcd_events_total{kind="peers"}"#, 1.0),
        (
            r#"dataplane_reconcile_apply_seconds_count{kind="peers"}"#,
            1.0,
        ),
        // 300 µs falls in the bucket up to 400 µs, not in the one to 200.
        (
            r#"dataplane_reconcile_apply_seconds_bucket{le="0.0002",kind="peers"}"#,
            0.0,
        ),
        (
            r#"dataplane_reconcile_apply_seconds_bucket{le="0.0004",kind="peers"}"#,
            1.0,
        ),
        (
            r#"dataplane_reconcile_apply_seconds_bucket{le="0.0128",kind="services"}"#,
            0.0,
        ),
        (
            r#"dataplane_reconcile_apply_seconds_bucket{le="0.0256",kind="services"}"#,
            1.0,
        ),
        ("dataplane_agent_errors_total", 1.0),
    ] {
        assert_eq!(sample(&text, name), Some(want), "{name} in\n{text}");
    }
    assert_eq!(m.lease_expiry(), Some(expires));
    assert!(m.last_etcd_event().is_some());
    assert_eq!(m.etcd_connected(), Some(true));
    m.set_watch_up("services", false);
    assert_eq!(m.etcd_connected(), Some(false), "one watch retrying");
}

#[test]
fn ready_only_with_lease_programs_and_both_listings_applied() {
    let m = Metrics::new();
    let (code, body) = readiness(&m);
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no subnet lease held"), "{body}");
    for part in [
        ReadyPart::Lease,
        ReadyPart::Attached,
        ReadyPart::PeersSynced,
    ] {
        m.set_ready(part, true);
    }
    let (code, body) = readiness(&m);
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "not ready: service maps not synced with etcd\n");
    assert!(m.encode().contains("dataplane_ready 0"));
    m.set_ready(ReadyPart::ServicesSynced, true);
    assert_eq!(readiness(&m), (StatusCode::OK, "ready\n".to_string()));
    assert!(m.encode().contains("dataplane_ready 1"));
    m.lease_lost();
    assert_eq!(readiness(&m).0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        sample(&m.encode(), "dataplane_lease_losses_total"),
        Some(1.0)
    );
}

#[test]
fn healthy_unless_the_event_loop_stopped_turning() {
    let m = Metrics::new();
    assert_eq!(health(&m).0, StatusCode::OK, "waiting at start-up is fine");
    m.loop_turned();
    assert_eq!(health(&m).0, StatusCode::OK);
    let long_ago = SystemTime::now() - STUCK_AFTER - Duration::from_secs(5);
    m.loop_turned_ms.store(
        crate::status::record::unix_ms(long_ago),
        std::sync::atomic::Ordering::Relaxed,
    );
    let (code, body) = health(&m);
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("event loop stuck"), "{body}");
}
