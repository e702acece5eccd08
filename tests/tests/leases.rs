//! The etcd control plane against a real etcd: network config, subnet
//! leases (flannel's format and acquisition order), renewal and
//! re-acquisition, and the peer watch. Each test starts its own etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dataplane::config::{LoadConfigError, NetworkConfig, load};
use dataplane::etcd::{Event, ListWatch, Prefix, Update, list_then_watch};
use dataplane::lease::{
    self, Lease, LeaseAttrs, LeaseError, LeaseEvent, acquire, subnet_key, vtep_mac_for,
};
use dataplane::peers::{OwnNode, PeerPolicy, PeerUpdate, PeerWatchStats, watch_peers};
use etcd_client::{Client, GetOptions, KeyValue, PutOptions};
use ipnet::Ipv4Net;
use tests::etcd::Etcd;
use tokio::sync::{mpsc, watch};

const PREFIX: &str = "/coreos.com/network";
const WAIT: Duration = Duration::from_secs(10);

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn attrs_for(ip: Ipv4Addr) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: ip,
        backend_type: "vxlan".into(),
        vni: 1,
        vtep_mac: vtep_mac_for(ip),
    }
}

fn node(i: u8) -> LeaseAttrs {
    attrs_for(Ipv4Addr::new(192, 168, 64, i))
}

async fn setup(config: &str) -> (Etcd, Client, NetworkConfig) {
    let etcd = Etcd::start().expect("starting etcd");
    let mut client = etcd.client().await.unwrap();
    client
        .put(format!("{PREFIX}/config"), config, None)
        .await
        .unwrap();
    let cfg = load(&mut client, PREFIX).await.unwrap();
    (etcd, client, cfg)
}

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

async fn recv<T>(rx: &mut mpsc::Receiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for an update")
        .expect("channel closed")
}

async fn value_of(client: &mut Client, key: &str) -> Option<(Vec<u8>, i64)> {
    let resp = client.get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.lease()))
}

/// Remaining TTL of an etcd lease; -1 when etcd no longer knows it.
async fn ttl_of(client: &mut Client, id: i64) -> i64 {
    client.lease_time_to_live(id, None).await.unwrap().ttl()
}

#[tokio::test]
async fn config_defaults_and_rejections_from_etcd() {
    let etcd = Etcd::start().unwrap();
    let mut client = etcd.client().await.unwrap();

    let e = load(&mut client, PREFIX).await.unwrap_err();
    assert!(matches!(e, LoadConfigError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("/coreos.com/network/config"), "{e}");

    client
        .put(format!("{PREFIX}/config"), CONFIG, None)
        .await
        .unwrap();
    let cfg = load(&mut client, PREFIX).await.unwrap();
    assert_eq!(cfg.network, net("10.244.0.0/16"));
    assert_eq!(cfg.subnet_len, 24);
    assert_eq!(cfg.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
    assert_eq!(cfg.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
    assert_eq!((cfg.backend.vni, cfg.backend.port), (1, 8472));
    // A trailing slash on the prefix means the same key.
    assert_eq!(
        load(&mut client, "/coreos.com/network/").await.unwrap(),
        cfg
    );

    for (json, field) in [
        (r#"{"Network":"10.244.0.0/16"}"#, "field Backend: missing"),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
            "field Backend.Type",
        ),
        (
            r#"{"Network":"10.244.0.0/29","Backend":{"Type":"vxlan"}}"#,
            "field Network",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
            "field SubnetLen: 31 is greater than 30",
        ),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#,
            "field Backend.GBP: VXLAN group-based policy is not supported",
        ),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
            "field Backend.DirectRouting: direct routing is not supported",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":17,"Backend":{"Type":"vxlan"}}"#,
            "field SubnetLen",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.1","Backend":{"Type":"vxlan"}}"#,
            "field SubnetMin",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMax":"10.245.1.0","Backend":{"Type":"vxlan"}}"#,
            "field SubnetMax",
        ),
        (
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#,
            "field EnableIPv6",
        ),
        ("not json", "not valid JSON"),
    ] {
        client
            .put(format!("{PREFIX}/config"), json, None)
            .await
            .unwrap();
        let e = load(&mut client, PREFIX).await.unwrap_err();
        assert!(matches!(e, LoadConfigError::Invalid { .. }), "{json}: {e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("network config /coreos.com/network/config: ") && msg.contains(field),
            "{json}: {msg}"
        );
    }
}

#[tokio::test]
async fn lease_is_flannel_bytes_under_an_etcd_lease() {
    let (_etcd, mut client, cfg) = setup(CONFIG).await;
    let attrs = LeaseAttrs {
        public_ip: "192.168.64.3".parse().unwrap(),
        backend_type: "vxlan".into(),
        vni: 1,
        vtep_mac: [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44],
    };
    let l = acquire(&mut client, PREFIX, &cfg, &attrs, None, lease::DEFAULT_TTL)
        .await
        .unwrap();
    assert!(cfg.contains_subnet(l.subnet));
    assert_eq!(l.ttl, lease::DEFAULT_TTL);
    let key = format!("/coreos.com/network/subnets/{}-24", l.subnet.addr());
    assert_eq!(subnet_key(PREFIX, l.subnet), key);
    let (value, lease_id) = value_of(&mut client, &key).await.expect("lease key");
    assert_eq!(
        String::from_utf8(value).unwrap(),
        r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
    );
    assert_eq!(lease_id, l.lease_id);
    let ttl = ttl_of(&mut client, lease_id).await;
    assert!(ttl > 24 * 3600 - 60 && ttl <= 24 * 3600, "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_acquires_get_distinct_subnets() {
    // A small pool so collisions are likely: 16 subnets for 10 nodes.
    let (etcd, _client, cfg) = setup(
        r#"{"Network":"10.9.0.0/16","SubnetMin":"10.9.10.0","SubnetMax":"10.9.25.0","Backend":{"Type":"vxlan"}}"#,
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(etcd.client().await.unwrap());
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let cfg = cfg.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                acquire(
                    &mut c,
                    PREFIX,
                    &cfg,
                    &node(10 + i as u8),
                    None,
                    Duration::from_secs(60),
                )
                .await
            })
        })
        .collect();
    let mut subnets = BTreeSet::new();
    for t in tasks {
        let l = t.await.unwrap().expect("acquire");
        assert!(
            cfg.contains_subnet(l.subnet),
            "{} outside the pool",
            l.subnet
        );
        assert!(subnets.insert(l.subnet), "{} handed out twice", l.subnet);
    }
    assert_eq!(subnets.len(), 10);

    let mut c = etcd.client().await.unwrap();
    let resp = c
        .get(
            format!("{PREFIX}/subnets/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(resp.kvs().len(), 10);
}

#[tokio::test]
async fn pool_exhaustion_is_a_clear_error() {
    let (_etcd, mut client, cfg) =
        setup(r#"{"Network":"10.5.0.0/28","SubnetLen":30,"Backend":{"Type":"vxlan"}}"#).await;
    let mut got = BTreeSet::new();
    for i in 1..=3 {
        let l = acquire(
            &mut client,
            PREFIX,
            &cfg,
            &node(i),
            None,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        got.insert(l.subnet);
    }
    assert_eq!(
        got,
        BTreeSet::from([net("10.5.0.4/30"), net("10.5.0.8/30"), net("10.5.0.12/30")])
    );
    let e = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &node(4),
        None,
        Duration::from_secs(60),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, LeaseError::PoolExhausted { .. }), "{e}");
    let msg = e.to_string();
    for part in [
        "10.5.0.0/28",
        "SubnetMin 10.5.0.4",
        "SubnetMax 10.5.0.12",
        "/30",
    ] {
        assert!(msg.contains(part), "{msg} lacks {part}");
    }
    // No etcd lease leaked by the failed attempt.
    let leases = client.leases().await.unwrap();
    assert_eq!(leases.leases().len(), 3);
}

#[tokio::test]
async fn restart_takes_back_the_same_subnet() {
    let (_etcd, mut client, cfg) = setup(CONFIG).await;
    let first = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &node(1),
        None,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    // Someone else exists too.
    let other = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &node(2),
        None,
        Duration::from_secs(60),
    )
    .await
    .unwrap();

    // "Restart" with a new VtepMAC and no subnet.env.
    let mut attrs = node(1);
    attrs.vtep_mac = [0x02, 0, 0, 0, 0, 0x42];
    let second = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &attrs,
        None,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(second.subnet, first.subnet);
    assert_ne!(second.lease_id, first.lease_id, "a fresh etcd lease");
    let (value, lease_id) = value_of(&mut client, &subnet_key(PREFIX, first.subnet))
        .await
        .unwrap();
    assert_eq!(LeaseAttrs::from_json(&value).unwrap(), attrs);
    assert_eq!(lease_id, second.lease_id);
    assert_eq!(
        ttl_of(&mut client, first.lease_id).await,
        -1,
        "old etcd lease revoked"
    );
    // The other node's lease is untouched.
    let (_, other_id) = value_of(&mut client, &subnet_key(PREFIX, other.subnet))
        .await
        .unwrap();
    assert_eq!(other_id, other.lease_id);
}

#[tokio::test]
async fn hint_is_honoured_when_free_and_fitting() {
    let (_etcd, mut client, cfg) = setup(CONFIG).await;
    let hint = net("10.244.77.0/24");
    let a = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &node(1),
        Some(hint),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(a.subnet, hint);
    // Taken by node 1: node 2 asking for it gets another one.
    let b = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &node(2),
        Some(hint),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_ne!(b.subnet, hint);
    assert!(cfg.contains_subnet(b.subnet));
    // A hint outside the config is ignored.
    for bad in ["10.244.0.0/24", "10.245.3.0/24", "10.244.3.0/25"] {
        let c = acquire(
            &mut client,
            PREFIX,
            &cfg,
            &node(3),
            Some(net(bad)),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert!(cfg.contains_subnet(c.subnet), "{bad} -> {}", c.subnet);
        client
            .delete(subnet_key(PREFIX, c.subnet), None)
            .await
            .unwrap();
    }
    // Our own old lease wins over the hint (flannel's order).
    let d = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &node(1),
        Some(net("10.244.99.0/24")),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(d.subnet, hint);
}

#[tokio::test]
async fn garbage_and_foreign_entries_do_not_stop_acquire() {
    let (_etcd, mut client, cfg) = setup(
        r#"{"Network":"10.7.0.0/16","SubnetMin":"10.7.1.0","SubnetMax":"10.7.2.0","Backend":{"Type":"vxlan"}}"#,
    )
    .await;
    client
        .put(format!("{PREFIX}/subnets/garbage"), "x", None)
        .await
        .unwrap();
    // A garbage value still occupies its subnet.
    client
        .put(format!("{PREFIX}/subnets/10.7.1.0-24"), "not json", None)
        .await
        .unwrap();
    let l = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &node(1),
        Some(net("10.7.1.0/24")),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(l.subnet, net("10.7.2.0/24"));
}

/// A lease written the way flannel writes it.
async fn flannel_put(client: &mut Client, subnet: Ipv4Net, ip: &str, mac: &str, ttl: i64) -> i64 {
    let id = client.lease_grant(ttl, None).await.unwrap().id();
    let value = format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    );
    client
        .put(
            subnet_key(PREFIX, subnet),
            value,
            Some(PutOptions::new().with_lease(id)),
        )
        .await
        .unwrap();
    id
}

fn start_watch(
    client: &Client,
) -> (
    mpsc::Receiver<PeerUpdate>,
    Arc<PeerWatchStats>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let policy = PeerPolicy {
        network: net("10.244.0.0/16"),
        subnet_len: 24,
        own: None,
    };
    start_watch_with(client, policy)
}

fn start_watch_with(
    client: &Client,
    policy: PeerPolicy,
) -> (
    mpsc::Receiver<PeerUpdate>,
    Arc<PeerWatchStats>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (tx, rx) = mpsc::channel(64);
    let stats = Arc::new(PeerWatchStats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(watch_peers(
        client.clone(),
        PREFIX,
        policy,
        tx,
        stats.clone(),
        stop_rx,
    ));
    (rx, stats, stop_tx, task)
}

#[tokio::test]
async fn flannel_writer_appears_and_disappears() {
    let (_etcd, mut client, cfg) = setup(CONFIG).await;
    let ours = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &node(1),
        None,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let (mut rx, stats, stop, task) = start_watch(&client);

    // The snapshot includes our own lease.
    let PeerUpdate::Snapshot(snap) = recv(&mut rx).await else {
        panic!("first update must be a snapshot")
    };
    assert_eq!(snap, BTreeMap::from([(ours.subnet, node(1))]));

    let s = net("10.244.200.0/24");
    let id = flannel_put(&mut client, s, "192.168.64.9", "c6:d2:32:6f:8f:44", 60).await;
    let expected = LeaseAttrs {
        public_ip: "192.168.64.9".parse().unwrap(),
        backend_type: "vxlan".into(),
        vni: 1,
        vtep_mac: [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44],
    };
    assert_eq!(recv(&mut rx).await, PeerUpdate::Upsert(s, expected));

    // flannel's lease goes away (as on expiry): the peer is removed.
    client.lease_revoke(id).await.unwrap();
    assert_eq!(recv(&mut rx).await, PeerUpdate::Remove(s));
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 0);
    assert!(stats.events.load(Ordering::Relaxed) >= 2);

    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn garbage_is_skipped_counted_and_never_drops_good_peers() {
    let (_etcd, mut client, _cfg) = setup(CONFIG).await;
    let a = net("10.244.1.0/24");
    let b = net("10.244.2.0/24");
    flannel_put(&mut client, a, "192.168.64.1", "02:00:00:00:00:01", 60).await;
    // Bad entries present before the watch starts.
    client
        .put(format!("{PREFIX}/subnets/nonsense"), "{}", None)
        .await
        .unwrap();
    client
        .put(format!("{PREFIX}/subnets/10.244.3.0-24"), "garbage", None)
        .await
        .unwrap();

    let (mut rx, stats, stop, task) = start_watch(&client);
    let PeerUpdate::Snapshot(snap) = recv(&mut rx).await else {
        panic!("first update must be a snapshot")
    };
    assert_eq!(snap.keys().copied().collect::<Vec<_>>(), vec![a]);
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 2);

    // More garbage while watching: a bad key, a bad value on a new key, a
    // half-valid value; then a good lease. The next update must be the good
    // lease: nothing in between, certainly no removal of `a`.
    client
        .put(format!("{PREFIX}/subnets/10.244.4.0-99"), "{}", None)
        .await
        .unwrap();
    client
        .put(format!("{PREFIX}/subnets/10.244.5.0-24"), "[1,2]", None)
        .await
        .unwrap();
    client
        .put(
            format!("{PREFIX}/subnets/10.244.6.0-24"),
            r#"{"PublicIP":"192.168.64.6","BackendType":"vxlan","BackendData":{"VtepMAC":"zz"}}"#,
            None,
        )
        .await
        .unwrap();
    client
        .delete(format!("{PREFIX}/subnets/nonsense"), None)
        .await
        .unwrap();
    flannel_put(&mut client, b, "192.168.64.2", "02:00:00:00:00:02", 60).await;
    match recv(&mut rx).await {
        PeerUpdate::Upsert(s, attrs) => {
            assert_eq!(s, b);
            assert_eq!(attrs.public_ip, Ipv4Addr::new(192, 168, 64, 2));
        }
        other => panic!("expected Upsert of {b}, got {other:?}"),
    }
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 5);

    // Garbage written over a good lease: that lease is gone, and only it.
    client
        .put(subnet_key(PREFIX, a), "garbage", None)
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, PeerUpdate::Remove(a));
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 6);
    // Garbage over garbage: nothing more.
    client
        .put(subnet_key(PREFIX, a), "still garbage", None)
        .await
        .unwrap();
    flannel_put(&mut client, a, "192.168.64.1", "02:00:00:00:00:01", 60).await;
    assert!(matches!(recv(&mut rx).await, PeerUpdate::Upsert(s, _) if s == a));
    assert_eq!(stats.resyncs.load(Ordering::Relaxed), 0);

    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The skip counters: subnet, overlap, PublicIP, skipped now.
fn skipped(stats: &PeerWatchStats) -> [u64; 4] {
    [
        stats.skipped_subnet.load(Ordering::Relaxed),
        stats.skipped_overlap.load(Ordering::Relaxed),
        stats.skipped_public_ip.load(Ordering::Relaxed),
        stats.skipped_now.load(Ordering::Relaxed),
    ]
}

#[tokio::test]
async fn leases_that_cannot_be_right_are_skipped_counted_and_never_sent() {
    let (mut etcd, mut client, cfg) = setup(CONFIG).await;
    let ours = net("10.244.1.0/24");
    let good = net("10.244.2.0/24");
    flannel_put(&mut client, ours, "192.168.64.1", "02:00:00:00:00:01", 600).await;
    flannel_put(&mut client, good, "192.168.64.2", "02:00:00:00:00:02", 600).await;
    // Outside Network, wrong length, bad PublicIPs, our PublicIP elsewhere.
    flannel_put(
        &mut client,
        net("10.99.1.0/24"),
        "192.168.64.3",
        "02:00:00:00:00:03",
        600,
    )
    .await;
    flannel_put(
        &mut client,
        net("10.244.4.0/26"),
        "192.168.64.4",
        "02:00:00:00:00:04",
        600,
    )
    .await;
    flannel_put(
        &mut client,
        net("10.244.5.0/24"),
        "127.0.0.1",
        "02:00:00:00:00:05",
        600,
    )
    .await;
    flannel_put(
        &mut client,
        net("10.244.6.0/24"),
        "0.0.0.0",
        "02:00:00:00:00:06",
        600,
    )
    .await;
    flannel_put(
        &mut client,
        net("10.244.7.0/24"),
        "239.1.1.1",
        "02:00:00:00:00:07",
        600,
    )
    .await;
    flannel_put(
        &mut client,
        net("10.244.8.0/24"),
        "192.168.64.1",
        "02:00:00:00:00:08",
        600,
    )
    .await;
    // The same subnet as `good` under a dual-stack key, written later.
    let dual = format!("{PREFIX}/subnets/10.244.2.0-24&fd00:1::-64");
    let dual_value = r#"{"PublicIP":"192.168.64.9","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:09"}}"#;
    client.put(dual.clone(), dual_value, None).await.unwrap();

    let (_own_tx, own_rx) = watch::channel(ours);
    let policy = PeerPolicy {
        own: Some(OwnNode {
            public_ip: Ipv4Addr::new(192, 168, 64, 1),
            subnet: own_rx,
        }),
        ..PeerPolicy::for_network(&cfg)
    };
    let (mut rx, stats, stop, task) = start_watch_with(&client, policy);
    let PeerUpdate::Snapshot(snap) = recv(&mut rx).await else {
        panic!("first update must be a snapshot")
    };
    assert_eq!(snap.keys().copied().collect::<Vec<_>>(), vec![ours, good]);
    assert_eq!(
        snap[&good].public_ip,
        Ipv4Addr::new(192, 168, 64, 2),
        "the older lease"
    );
    assert_eq!(skipped(&stats), [2, 1, 4, 7]);
    assert_eq!(stats.malformed.load(Ordering::Relaxed), 0);

    // A re-list finds the same: nothing counted again.
    etcd.restart().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.resyncs.load(Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no re-list");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(skipped(&stats), [2, 1, 4, 7]);
    let mut client = etcd.client().await.unwrap();

    // The older lease goes: the newer one for the subnet takes over.
    client.delete(subnet_key(PREFIX, good), None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let u = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the dual-stack lease never took over")
            .unwrap();
        let attrs = match u {
            PeerUpdate::Upsert(s, a) if s == good => a,
            PeerUpdate::Snapshot(m) if m.contains_key(&good) => m[&good].clone(),
            _ => continue,
        };
        if attrs.public_ip == Ipv4Addr::new(192, 168, 64, 9) {
            break;
        }
    }
    assert_eq!(skipped(&stats), [2, 1, 4, 6]);
    // A new bad one while watching: skipped, no update sent.
    flannel_put(
        &mut client,
        net("10.244.10.0/23"),
        "192.168.64.10",
        "02:00:00:00:00:0a",
        600,
    )
    .await;
    flannel_put(
        &mut client,
        net("10.244.11.0/24"),
        "192.168.64.11",
        "02:00:00:00:00:0b",
        600,
    )
    .await;
    assert!(
        matches!(recv(&mut rx).await, PeerUpdate::Upsert(s, _) if s == net("10.244.11.0/24")),
        "the skipped lease sent nothing"
    );
    assert_eq!(skipped(&stats), [3, 1, 4, 7]);

    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn watch_resyncs_after_etcd_restart() {
    let (mut etcd, mut client, _cfg) = setup(CONFIG).await;
    let a = net("10.244.1.0/24");
    let b = net("10.244.2.0/24");
    flannel_put(&mut client, a, "192.168.64.1", "02:00:00:00:00:01", 600).await;
    let (mut rx, stats, stop, task) = start_watch(&client);
    assert!(matches!(recv(&mut rx).await, PeerUpdate::Snapshot(m) if m.len() == 1));

    etcd.restart().unwrap();
    // The watch breaks and re-lists; then it follows new writes again.
    let mut c2 = etcd.client().await.unwrap();
    flannel_put(&mut c2, b, "192.168.64.2", "02:00:00:00:00:02", 600).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let u = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("no update after restart")
            .unwrap();
        match u {
            PeerUpdate::Snapshot(m) if m.contains_key(&b) => break,
            PeerUpdate::Upsert(s, _) if s == b => break,
            _ => {}
        }
    }
    assert!(stats.resyncs.load(Ordering::Relaxed) >= 1);
    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

fn start_keeper(
    client: &Client,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    lease: Lease,
    margin: Duration,
) -> (
    mpsc::Receiver<LeaseEvent>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(8);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(lease::keep(
        client.clone(),
        PREFIX,
        cfg.clone(),
        attrs.clone(),
        lease,
        margin,
        tx,
        stop_rx,
    ));
    (rx, stop_tx, task)
}

#[tokio::test]
async fn renewal_keeps_the_key_past_several_ttls() {
    let (_etcd, mut client, cfg) = setup(CONFIG).await;
    let ttl = Duration::from_secs(3);
    let kept = acquire(&mut client, PREFIX, &cfg, &node(1), None, ttl)
        .await
        .unwrap();
    assert_eq!(kept.ttl, ttl);
    // Control: the same TTL without a keeper expires.
    let unkept = acquire(&mut client, PREFIX, &cfg, &node(2), None, ttl)
        .await
        .unwrap();

    let (mut events, stop, task) = start_keeper(
        &client,
        &cfg,
        &node(1),
        kept.clone(),
        Duration::from_secs(2),
    );
    tokio::time::sleep(Duration::from_secs(8)).await;

    let key = subnet_key(PREFIX, kept.subnet);
    let (_, id) = value_of(&mut client, &key)
        .await
        .expect("kept lease survives");
    assert_eq!(id, kept.lease_id, "renewed, not replaced");
    assert!(ttl_of(&mut client, id).await > 0);
    assert!(
        value_of(&mut client, &subnet_key(PREFIX, unkept.subnet))
            .await
            .is_none(),
        "control lease should have expired"
    );
    assert!(events.try_recv().is_err(), "no loss expected");

    // Shutdown does not revoke.
    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(value_of(&mut client, &key).await.is_some());
    assert!(ttl_of(&mut client, id).await > 0);
}

#[tokio::test]
async fn deleted_or_revoked_lease_is_reacquired() {
    let (_etcd, mut client, cfg) = setup(CONFIG).await;
    let first = acquire(
        &mut client,
        PREFIX,
        &cfg,
        &node(1),
        None,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let key = subnet_key(PREFIX, first.subnet);
    let (mut events, stop, task) = start_keeper(
        &client,
        &cfg,
        &node(1),
        first.clone(),
        Duration::from_secs(5),
    );
    // Let the keeper set up its watch.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Someone deletes our key.
    client.delete(key.as_str(), None).await.unwrap();
    let LeaseEvent::Reacquired(second) = recv(&mut events).await else {
        panic!("expected Reacquired")
    };
    assert_eq!(second.subnet, first.subnet, "same subnet back");
    assert_ne!(second.lease_id, first.lease_id);
    let (value, id) = value_of(&mut client, &key).await.expect("key back");
    assert_eq!(id, second.lease_id);
    assert_eq!(LeaseAttrs::from_json(&value).unwrap(), node(1));
    assert_eq!(
        ttl_of(&mut client, first.lease_id).await,
        -1,
        "old etcd lease revoked"
    );

    // Our etcd lease is revoked (as on expiry): the key goes with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.lease_revoke(second.lease_id).await.unwrap();
    let LeaseEvent::Reacquired(third) = recv(&mut events).await else {
        panic!("expected Reacquired")
    };
    assert_eq!(third.subnet, first.subnet);
    assert_eq!(value_of(&mut client, &key).await.unwrap().1, third.lease_id);

    // Someone overwrites our key with another node's lease under its own
    // etcd lease: the subnet is theirs now, we get another one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    flannel_put(
        &mut client,
        first.subnet,
        "192.168.64.50",
        "02:00:00:00:00:50",
        60,
    )
    .await;
    let LeaseEvent::Reacquired(fourth) = recv(&mut events).await else {
        panic!("expected Reacquired")
    };
    assert_ne!(fourth.subnet, first.subnet);
    assert!(cfg.contains_subnet(fourth.subnet));
    let (_, id) = value_of(&mut client, &subnet_key(PREFIX, fourth.subnet))
        .await
        .unwrap();
    assert_eq!(id, fourth.lease_id);

    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn agent_connect_reaches_etcd() {
    let etcd = Etcd::start().unwrap();
    let mut opts = etcd.options();
    // Without a scheme, as flannel users often write it.
    opts.endpoints = vec![etcd.endpoint.trim_start_matches("http://").to_string()];
    let mut c = dataplane::etcd::connect(&opts).await.unwrap();
    c.put("k", "v", None).await.unwrap();
}

/// The loop every watcher shares, on its own: a snapshot, then the events
/// after it in order (deletions decoded from the key alone), a new snapshot
/// when the revision it would watch from has been compacted, and `None`
/// once shutdown is requested.
#[tokio::test]
async fn list_then_watch_follows_and_relists_after_compaction() {
    let etcd = Etcd::start().unwrap();
    let mut client = etcd.client().await.unwrap();
    client.put("/lw/a", "1", None).await.unwrap();
    client.put("/lw0", "outside", None).await.unwrap();
    let decode = |kv: &KeyValue| {
        let key = kv.key_str().ok()?.to_string();
        (key != "/lw/skip").then(|| (key, kv.value_str().unwrap_or_default().to_string()))
    };
    let item = |k: &str, v: &str| (k.to_string(), v.to_string());
    let (stop, shutdown) = watch::channel(false);
    let mut w = list_then_watch(
        &client,
        "test keys",
        Prefix::new("/lw").range(),
        decode,
        shutdown.clone(),
    );
    let next = async |w: &mut ListWatch<_, _>| {
        tokio::time::timeout(WAIT, w.next())
            .await
            .expect("timed out waiting for an update")
    };

    let Some(Update::Snapshot(s)) = next(&mut w).await else {
        panic!("first update must be a snapshot")
    };
    assert_eq!(s.items, vec![item("/lw/a", "1")]);
    client.put("/lw/skip", "x", None).await.unwrap();
    client.put("/lw/b", "2", None).await.unwrap();
    client.delete("/lw/a", None).await.unwrap();
    assert_eq!(
        next(&mut w).await,
        Some(Update::Event(Event::Put(item("/lw/b", "2"))))
    );
    assert_eq!(
        next(&mut w).await,
        Some(Update::Event(Event::Delete(item("/lw/a", ""))))
    );

    // A second watcher lists, then (before it asks for the next update,
    // which is when it starts watching) the revisions after its snapshot
    // are compacted away: it must list again, and miss nothing.
    let mut late = list_then_watch(
        &client,
        "test keys",
        Prefix::new("/lw").range(),
        decode,
        shutdown,
    );
    let Some(Update::Snapshot(s)) = next(&mut late).await else {
        panic!("first update must be a snapshot")
    };
    assert_eq!(s.items, vec![item("/lw/b", "2")]);
    client.put("/lw/c", "3", None).await.unwrap();
    let rev = client
        .put("/lw/b", "22", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(rev, None).await.unwrap();
    let Some(Update::Snapshot(again)) = next(&mut late).await else {
        panic!("expected a new snapshot after compaction")
    };
    assert_eq!(again.items, vec![item("/lw/b", "22"), item("/lw/c", "3")]);
    assert_eq!(again.revision, rev);

    // The first watcher was never behind: it just sees the writes.
    assert_eq!(
        next(&mut w).await,
        Some(Update::Event(Event::Put(item("/lw/c", "3"))))
    );
    assert_eq!(
        next(&mut w).await,
        Some(Update::Event(Event::Put(item("/lw/b", "22"))))
    );

    stop.send(true).unwrap();
    assert_eq!(next(&mut w).await, None);
    assert_eq!(next(&mut late).await, None);
}
