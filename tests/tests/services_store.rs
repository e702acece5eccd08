//! Services, Endpoints and EndpointSlices in a real etcd: apply, list,
//! delete, and the watch every agent runs, including the property that
//! makes updates proportional to the change (one new service among 10,000
//! reports exactly that one service). Each test starts its own etcd.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dataplane::services::k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use dataplane::services::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use dataplane::services::{
    self, ApplyOutcome, BackendAddr, DEFAULT_PREFIX, Frontend, Kind, MAX_TXN_OPS, Object,
    ObjectRef, Proto, ServiceName, ServiceStore, StoreUpdate, parse_manifests,
};
use etcd_client::Client;
use tests::etcd::Etcd;
use tokio::sync::{mpsc, watch};

const MY_SERVICE: &str = include_str!("../fixtures/my-service.yaml");
const ONE_INVALID: &str = include_str!("../fixtures/one-invalid.yaml");
const KUBECTL_GET_NGINX: &str = include_str!("../fixtures/kubectl-get-nginx.yaml");
const WAIT: Duration = Duration::from_secs(20);

async fn setup() -> (Etcd, Client) {
    let etcd = Etcd::start().expect("starting etcd");
    let client = etcd.client().await.expect("etcd client");
    (etcd, client)
}

fn sn(name: &str) -> ServiceName {
    ServiceName::new("default", name)
}

/// A valid ClusterIP service `svc-<i>` with a unique ClusterIP.
fn service(i: u32) -> Object {
    let [_, _, a, b] = (0x0a60_0000u32 + i + 1).to_be_bytes();
    Object::Service(Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(Ipv4Addr::new(10, 96, a, b).to_string()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

async fn recv(rx: &mut mpsc::Receiver<StoreUpdate>) -> StoreUpdate {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a service update")
        .expect("service watch stopped")
}

/// Applies updates until one touches a service; returns what it touched.
async fn next_change(
    rx: &mut mpsc::Receiver<StoreUpdate>,
    store: &mut ServiceStore,
) -> BTreeSet<ServiceName> {
    loop {
        let touched = store.apply(recv(rx).await);
        if !touched.is_empty() {
            return touched;
        }
    }
}

struct Watcher {
    rx: mpsc::Receiver<StoreUpdate>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Watcher {
    fn start(client: &Client) -> Watcher {
        let (tx, rx) = mpsc::channel(1024);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(services::watch_services(
            client.clone(),
            DEFAULT_PREFIX.to_string(),
            tx,
            shutdown,
        ));
        Watcher { rx, stop, task }
    }

    async fn snapshot(&mut self) -> ServiceStore {
        match recv(&mut self.rx).await {
            StoreUpdate::Snapshot(s) => s,
            other => panic!("expected a snapshot first, got {other:?}"),
        }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("watch did not stop")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_then_list_gives_the_same_objects() {
    let (_etcd, mut client) = setup().await;
    let objs = parse_manifests(MY_SERVICE).unwrap();
    assert_eq!(objs.len(), 2);

    let summary = services::apply(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap();
    assert_eq!(summary.count(ApplyOutcome::Created), 2, "{summary:?}");
    let store = services::list(&mut client, DEFAULT_PREFIX).await.unwrap();
    // Listed in etcd key order: Endpoints, EndpointSlices, Services.
    let mut want = objs.clone();
    want.sort_by_key(|o| o.object_ref());
    assert_eq!(
        services::list_objects(&mut client, DEFAULT_PREFIX)
            .await
            .unwrap(),
        want
    );
    assert_eq!(store.malformed(), 0);

    // The frontend as a node would program it.
    let f = store.frontends_for(&sn("my-service"), &|_| false);
    let fe = Frontend {
        ip: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        proto: Proto::Tcp,
    };
    let backends: Vec<BackendAddr> = ["10.244.1.10", "10.244.2.10", "10.244.3.10"]
        .iter()
        .map(|ip| BackendAddr {
            ip: ip.parse().unwrap(),
            port: 9376,
        })
        .collect();
    assert_eq!(f[&fe].backends, backends);
    let summary_line = &store.summary()[0];
    assert_eq!(summary_line.cluster_ip, "10.96.0.10");
    assert_eq!(
        (summary_line.ready_endpoints, summary_line.total_endpoints),
        (3, 3)
    );

    // Re-applying the same file writes nothing (no revision, no events).
    let again = services::apply(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap();
    assert_eq!(again.count(ApplyOutcome::Unchanged), 2, "{again:?}");
    assert_eq!(again.revision, summary.revision);

    // Changing one object rewrites only that one.
    let edited = MY_SERVICE.replace("port: 80\n", "port: 8080\n");
    let objs2 = parse_manifests(&edited).unwrap();
    let third = services::apply(&mut client, DEFAULT_PREFIX, &objs2)
        .await
        .unwrap();
    assert_eq!(
        third.objects,
        vec![
            (
                ObjectRef::new(Kind::Service, "default", "my-service"),
                ApplyOutcome::Configured
            ),
            (
                ObjectRef::new(Kind::EndpointSlice, "default", "my-service-abc12"),
                ApplyOutcome::Unchanged
            ),
        ]
    );
    assert_eq!(third.revision, summary.revision + 1);
}

/// What `kubectl get -o yaml` prints (a List, with status, managedFields
/// and the rest) applies as is, and the unnamed slice port serves the
/// unnamed service port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_output_applies_as_is() {
    let (_etcd, mut client) = setup().await;
    let objs = parse_manifests(KUBECTL_GET_NGINX).unwrap();
    let refs: Vec<String> = objs.iter().map(|o| o.object_ref().to_string()).collect();
    assert_eq!(
        refs,
        [
            "service default/nginx",
            "endpointslice default/nginx-x7k2p",
            "endpoints default/nginx"
        ]
    );
    services::apply(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap();
    let store = services::list(&mut client, DEFAULT_PREFIX).await.unwrap();
    let f = store.frontends_for(&sn("nginx"), &|_| false);
    let fe = Frontend {
        ip: Ipv4Addr::new(10, 96, 12, 34),
        port: 80,
        proto: Proto::Tcp,
    };
    assert_eq!(
        f[&fe].backends,
        vec![BackendAddr {
            ip: Ipv4Addr::new(10, 244, 1, 5),
            port: 80
        }]
    );
    assert_eq!(f[&fe].affinity_timeout, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_one_invalid_document_writes_nothing() {
    let (_etcd, mut client) = setup().await;
    let e = parse_manifests(ONE_INVALID).unwrap_err();
    assert_eq!(
        e.to_string(),
        "document 2 (line 12): spec.ports[0].port: invalid type: string \"eighty\", expected i32"
    );

    // apply() checks objects built in code too: one invalid object fails
    // the whole call, the valid ones included.
    let mut objs = parse_manifests(MY_SERVICE).unwrap();
    let Object::Service(mut bad) = service(1) else {
        unreachable!()
    };
    bad.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("SCTP".into());
    objs.push(Object::Service(bad));
    let e = services::apply(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("SCTP is not supported"), "{e}");

    // More objects than one transaction may hold: refused, not split.
    let many: Vec<Object> = (0..=MAX_TXN_OPS as u32).map(service).collect();
    let e = services::apply(&mut client, DEFAULT_PREFIX, &many)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("129 objects"), "{e}");

    let objects = services::list_objects(&mut client, DEFAULT_PREFIX)
        .await
        .unwrap();
    assert!(objects.is_empty(), "{objects:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_service_removes_its_endpoints_and_slices() {
    let (_etcd, mut client) = setup().await;
    let extra = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
                 name: my-service-def34\n  labels: {kubernetes.io/service-name: my-service}\n\
                 addressType: IPv4\nendpoints: [{addresses: [10.244.4.10]}]\n\
                 ---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: my-service}\n\
                 subsets: [{addresses: [{ip: 10.244.1.10}], ports: [{name: http, port: 9376}]}]\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
                 name: other-1\n  labels: {kubernetes.io/service-name: other}\n\
                 addressType: IPv4\nendpoints: [{addresses: [10.244.5.10]}]\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
                 name: elsewhere-1\n  namespace: kube-system\n  \
                 labels: {kubernetes.io/service-name: my-service}\n\
                 addressType: IPv4\nendpoints: [{addresses: [10.244.6.10]}]\n";
    let objs = parse_manifests(&format!("{MY_SERVICE}{extra}")).unwrap();
    services::apply(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap();

    let summary = services::delete_service(&mut client, DEFAULT_PREFIX, "default", "my-service")
        .await
        .unwrap();
    let deleted: BTreeSet<String> = summary.deleted.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        deleted,
        BTreeSet::from(
            [
                "service default/my-service",
                "endpoints default/my-service",
                "endpointslice default/my-service-abc12",
                "endpointslice default/my-service-def34",
            ]
            .map(String::from)
        )
    );
    assert!(summary.not_found.is_empty(), "{summary:?}");

    // Slices of other services, and of the same name in another
    // namespace, stay.
    let left: Vec<String> = services::list_objects(&mut client, DEFAULT_PREFIX)
        .await
        .unwrap()
        .iter()
        .map(|o| o.object_ref().to_string())
        .collect();
    assert_eq!(
        left,
        [
            "endpointslice default/other-1",
            "endpointslice kube-system/elsewhere-1"
        ]
    );

    // Deleting again finds nothing.
    let again = services::delete_service(&mut client, DEFAULT_PREFIX, "default", "my-service")
        .await
        .unwrap();
    assert!(again.deleted.is_empty());
    assert_eq!(again.not_found.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_objects_deletes_what_the_file_names() {
    let (_etcd, mut client) = setup().await;
    let objs = parse_manifests(MY_SERVICE).unwrap();
    services::apply(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap();
    let summary = services::delete_objects(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap();
    assert_eq!(summary.deleted.len(), 2, "{summary:?}");
    let again = services::delete_objects(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap();
    assert_eq!(again.not_found.len(), 2, "{again:?}");
    assert!(
        services::list(&mut client, DEFAULT_PREFIX)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_new_services_changes_and_deletions() {
    let (_etcd, mut client) = setup().await;
    let mut w = Watcher::start(&client);
    let mut store = ServiceStore::new();
    let first = w.snapshot().await;
    assert!(store.apply(StoreUpdate::Snapshot(first)).is_empty());

    let objs = parse_manifests(MY_SERVICE).unwrap();
    services::apply(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap();
    // One transaction, two events (slice, service), both about my-service.
    let mut touched = BTreeSet::new();
    while store.endpoint_slice_count(&sn("my-service")) == 0 || !store.contains(&sn("my-service")) {
        touched.extend(store.apply(recv(&mut w.rx).await));
    }
    assert_eq!(touched, BTreeSet::from([sn("my-service")]));
    let fe = Frontend {
        ip: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        proto: Proto::Tcp,
    };
    assert_eq!(
        store.frontends_for(&sn("my-service"), &|_| false)[&fe]
            .backends
            .len(),
        3
    );

    // An endpoint turns not ready.
    let edited = MY_SERVICE.replacen("ready: true", "ready: false", 1);
    services::apply(
        &mut client,
        DEFAULT_PREFIX,
        &parse_manifests(&edited).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        next_change(&mut w.rx, &mut store).await,
        BTreeSet::from([sn("my-service")])
    );
    assert_eq!(
        store.frontends_for(&sn("my-service"), &|_| false)[&fe]
            .backends
            .len(),
        2
    );

    // Garbage written behind our back is skipped and counted; the good
    // state stays.
    client
        .put("/dataplane/services/default/my-service", "{garbage", None)
        .await
        .unwrap();
    let update = recv(&mut w.rx).await;
    assert!(store.apply(update).is_empty());
    assert_eq!(store.malformed(), 1);
    assert!(store.contains(&sn("my-service")));

    // Deletion.
    services::delete_service(&mut client, DEFAULT_PREFIX, "default", "my-service")
        .await
        .unwrap();
    let mut touched = BTreeSet::new();
    while store.contains(&sn("my-service")) || store.endpoint_slice_count(&sn("my-service")) > 0 {
        touched.extend(store.apply(recv(&mut w.rx).await));
    }
    assert_eq!(touched, BTreeSet::from([sn("my-service")]));
    assert!(
        store
            .frontends_for(&sn("my-service"), &|_| false)
            .is_empty()
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_relists_after_etcd_restart() {
    let (mut etcd, mut client) = setup().await;
    let objs = parse_manifests(MY_SERVICE).unwrap();
    services::apply(&mut client, DEFAULT_PREFIX, &objs)
        .await
        .unwrap();
    let mut w = Watcher::start(&client);
    let mut store = ServiceStore::new();
    let snap = w.snapshot().await;
    assert_eq!(
        store.apply(StoreUpdate::Snapshot(snap)),
        BTreeSet::from([sn("my-service")])
    );

    // Keep the restarted etcd alive until the end of the test.
    let _etcd = tokio::task::spawn_blocking(move || {
        etcd.restart().expect("restarting etcd");
        etcd
    })
    .await
    .unwrap();
    // The watch breaks, re-lists and says so with a new snapshot.
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no snapshot after the restart");
        if let StoreUpdate::Snapshot(s) = recv(&mut w.rx).await {
            assert_eq!(s, store);
            break;
        }
    }
    // And it follows changes again.
    services::apply(&mut client, DEFAULT_PREFIX, &[service(7)])
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut w.rx, &mut store).await,
        BTreeSet::from([sn("svc-7")])
    );
    w.stop().await;
}

/// 10,000 services, then one more: the update the agent gets touches that
/// one service only, so it rewrites one service's map entries, not 10,001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_new_service_among_ten_thousand_touches_one() {
    const N: u32 = 10_000;
    let (_etcd, mut client) = setup().await;
    let started = Instant::now();
    let all: Vec<Object> = (0..N).map(service).collect();
    for batch in all.chunks(MAX_TXN_OPS) {
        services::apply(&mut client, DEFAULT_PREFIX, batch)
            .await
            .unwrap();
    }
    eprintln!("applied {N} services in {:?}", started.elapsed());

    let mut w = Watcher::start(&client);
    let mut store = ServiceStore::new();
    let started = Instant::now();
    let snap = w.snapshot().await;
    assert_eq!(store.apply(StoreUpdate::Snapshot(snap)).len(), N as usize);
    eprintln!("listed {N} services in {:?}", started.elapsed());

    let started = Instant::now();
    services::apply(&mut client, DEFAULT_PREFIX, &[service(N)])
        .await
        .unwrap();
    let update = recv(&mut w.rx).await;
    assert!(
        matches!(update, StoreUpdate::Put { .. }),
        "expected one Put, got {update:?}"
    );
    let touched = store.apply(update);
    eprintln!(
        "one more service seen by the watch in {:?}",
        started.elapsed()
    );
    assert_eq!(touched, BTreeSet::from([sn(&format!("svc-{N}"))]));
    assert_eq!(store.len(), N as usize + 1);
    w.stop().await;
}

/// `service(i)` under another name and ClusterIP.
fn service_at(name: &str, ip: &str) -> Object {
    let Object::Service(mut s) = service(0) else {
        unreachable!()
    };
    s.metadata.name = Some(name.into());
    s.spec.as_mut().unwrap().cluster_ip = Some(ip.into());
    Object::Service(s)
}

#[tokio::test]
async fn apply_refuses_clusterips_outside_the_service_cidr_in_the_pod_network_or_taken() {
    let (_etcd, mut client) = setup().await;
    let guard = services::AddressGuard::new(
        "10.96.0.0/12".parse().unwrap(),
        Some("10.244.0.0/16".parse().unwrap()),
    );
    let c0 = client.clone();
    let apply = |objects: Vec<Object>| {
        let mut c = c0.clone();
        let guard = guard.clone();
        async move { services::apply_guarded(&mut c, DEFAULT_PREFIX, &objects, &guard).await }
    };
    let e = apply(vec![service_at("out", "10.200.0.1")])
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "service default/out is invalid: spec.clusterIP: 10.200.0.1 is outside the service CIDR 10.96.0.0/12 (--service-cidr, or ServiceCIDR in the network config)"
    );
    // A pod network inside the service CIDR (a misconfiguration, but it
    // shows the pod-network rule on its own).
    let overlapping = services::AddressGuard {
        service_cidr: "10.0.0.0/8".parse().unwrap(),
        ..guard.clone()
    };
    let e = services::apply_guarded(
        &mut client,
        DEFAULT_PREFIX,
        &[service_at("pod", "10.244.1.1")],
        &overlapping,
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().starts_with(
            "service default/pod is invalid: spec.clusterIP: 10.244.1.1 is inside the pod network 10.244.0.0/16"
        ),
        "{e}"
    );
    // Nothing was written by the refusals.
    assert!(
        services::list(&mut client, DEFAULT_PREFIX)
            .await
            .unwrap()
            .is_empty()
    );

    apply(vec![service_at("first", "10.96.1.1")]).await.unwrap();
    // Same IP:port/protocol as one in etcd.
    let e = apply(vec![service_at("second", "10.96.1.1")])
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "service default/second conflicts with service default/first: both claim 10.96.1.1:80 TCP (ClusterIP, port, protocol)"
    );
    // Two in one file.
    let e = apply(vec![
        service_at("third", "10.96.1.3"),
        service_at("fourth", "10.96.1.3"),
    ])
    .await
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("default/third")
            && msg.contains("default/fourth")
            && msg.contains("both claim 10.96.1.3:80 TCP"),
        "{msg}"
    );
    // The owner itself may be re-applied, and may move: its old frontend
    // is no conflict.
    let s = apply(vec![service_at("first", "10.96.1.1")]).await.unwrap();
    assert_eq!(s.count(ApplyOutcome::Unchanged), 1);
    apply(vec![
        service_at("first", "10.96.1.2"),
        service_at("second", "10.96.1.1"),
    ])
    .await
    .unwrap();
    let store = services::list(&mut client, DEFAULT_PREFIX).await.unwrap();
    assert_eq!(store.len(), 2);
}

/// The guard `apply` builds from the cluster: `ServiceCIDR` of the network
/// config unless the flag overrides it, and the leases' PublicIPs and
/// gateways.
#[tokio::test]
async fn apply_guard_from_the_network_config_and_leases() {
    let (_etcd, mut client) = setup().await;
    let flannel = "/coreos.com/network";
    // No config yet: the CIDR check alone, with a warning.
    let (g, warning) = services::AddressGuard::for_cluster(&mut client, flannel, None)
        .await
        .unwrap();
    assert_eq!(g.service_cidr, "10.96.0.0/12".parse().unwrap());
    assert!(warning.is_some());
    client
        .put(
            format!("{flannel}/config"),
            r#"{"Network":"10.244.0.0/16","ServiceCIDR":"10.100.0.0/16","Backend":{"Type":"vxlan"}}"#,
            None,
        )
        .await
        .unwrap();
    let attrs = dataplane::lease::LeaseAttrs {
        public_ip: Ipv4Addr::new(10, 100, 0, 7),
        backend_type: "vxlan".into(),
        vni: 1,
        vtep_mac: [2, 0, 0, 0, 0, 7],
    };
    client
        .put(
            dataplane::lease::subnet_key(flannel, "10.244.3.0/24".parse().unwrap()),
            attrs.to_json(),
            None,
        )
        .await
        .unwrap();
    let (g, warning) = services::AddressGuard::for_cluster(&mut client, flannel, None)
        .await
        .unwrap();
    assert_eq!(warning, None);
    assert_eq!(g.service_cidr, "10.100.0.0/16".parse().unwrap());
    let refused = |ip: &str| {
        let mut c = client.clone();
        let g = g.clone();
        let ip = ip.to_string();
        async move {
            services::apply_guarded(&mut c, DEFAULT_PREFIX, &[service_at("web", &ip)], &g)
                .await
                .unwrap_err()
                .to_string()
        }
    };
    let e = refused("10.96.0.10").await;
    assert!(e.contains("outside the service CIDR 10.100.0.0/16"), "{e}");
    let e = refused("10.100.0.7").await;
    assert!(
        e.contains("10.100.0.7 is a node address (the PublicIP of the lease 10.244.3.0/24)"),
        "{e}"
    );
    // With the flag, the config's CIDR no longer applies.
    let (g, _) = services::AddressGuard::for_cluster(
        &mut client,
        flannel,
        Some("10.0.0.0/8".parse().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(g.service_cidr, "10.0.0.0/8".parse().unwrap());
    let e = services::apply_guarded(
        &mut client,
        DEFAULT_PREFIX,
        &[service_at("gw", "10.244.3.1")],
        &g,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("10.244.3.1 is the gateway of the lease 10.244.3.0/24"),
        "{e}"
    );
    services::apply_guarded(
        &mut client,
        DEFAULT_PREFIX,
        &[service_at("ok", "10.96.0.10")],
        &g,
    )
    .await
    .unwrap();
    assert_eq!(
        services::list(&mut client, DEFAULT_PREFIX)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A NodePort Service `name` on `ip` with ports 80/TCP and 53/UDP, the
/// nodePorts given (`None`: allocated by apply).
fn node_port_service(name: &str, ip: &str, tcp: Option<i32>, udp: Option<i32>) -> Object {
    let port = |p: i32, proto: &str, np: Option<i32>| ServicePort {
        name: Some(proto.to_lowercase()),
        port: p,
        protocol: Some(proto.into()),
        node_port: np,
        ..Default::default()
    };
    Object::Service(Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            cluster_ip: Some(ip.into()),
            ports: Some(vec![port(80, "TCP", tcp), port(53, "UDP", udp)]),
            ..Default::default()
        }),
        status: None,
    })
}

/// nodePorts at apply: allocated from the range (lowest free first),
/// stored in etcd so every agent reads the same, kept when the Service is
/// re-applied without them, never given twice; explicit ones outside the
/// range or taken by another Service are refused naming the Service and
/// the field; the range comes from the network config (`NodePortRange`)
/// unless the guard (the `--service-node-port-range` flag) says otherwise.
#[tokio::test]
async fn apply_allocates_node_ports_without_duplicates() {
    let (_etcd, mut client) = setup().await;
    let mut guard = services::AddressGuard::new("10.96.0.0/12".parse().unwrap(), None);
    guard.node_ports = "30000-30004".parse().unwrap();
    let c0 = client.clone();
    let apply = |objects: Vec<Object>, guard: services::AddressGuard| {
        let mut c = c0.clone();
        async move { services::apply_guarded(&mut c, DEFAULT_PREFIX, &objects, &guard).await }
    };
    let ports = |store: &ServiceStore, name: &str| store.node_ports(&sn(name));

    // An explicit one, then two allocated around it.
    apply(
        vec![
            node_port_service("a", "10.96.2.1", Some(30001), None),
            node_port_service("b", "10.96.2.2", None, None),
        ],
        guard.clone(),
    )
    .await
    .unwrap();
    let store = services::list(&mut client, DEFAULT_PREFIX).await.unwrap();
    assert_eq!(
        ports(&store, "a"),
        vec![(80, Proto::Tcp, 30001), (53, Proto::Udp, 30000)]
    );
    assert_eq!(
        ports(&store, "b"),
        vec![(80, Proto::Tcp, 30002), (53, Proto::Udp, 30003)]
    );
    // Re-applied without nodePorts: the same ones, nothing rewritten.
    let s = apply(
        vec![node_port_service("b", "10.96.2.2", None, None)],
        guard.clone(),
    )
    .await
    .unwrap();
    assert_eq!(s.count(ApplyOutcome::Unchanged), 1);

    // Explicit and taken (by number, whatever the protocol).
    let e = apply(
        vec![node_port_service("c", "10.96.2.3", None, Some(30002))],
        guard.clone(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "service default/c is invalid: spec.ports[1].nodePort: 30002 is already allocated to service default/b"
    );
    // Two in one file.
    let e = apply(
        vec![
            node_port_service("c", "10.96.2.3", Some(30004), None),
            node_port_service("d", "10.96.2.4", Some(30004), None),
        ],
        guard.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("spec.ports[0].nodePort: 30004 is already allocated to service default/c"),
        "{e}"
    );
    // Outside the range.
    let e = apply(
        vec![node_port_service("c", "10.96.2.3", Some(31000), None)],
        guard.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().starts_with(
            "service default/c is invalid: spec.ports[0].nodePort: 31000 is outside the nodePort range 30000-30004"
        ),
        "{e}"
    );
    // The range is full after one more port.
    let e = apply(
        vec![node_port_service("c", "10.96.2.3", None, None)],
        guard.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string()
            .ends_with("spec.ports[1].nodePort: no free nodePort left in the range 30000-30004"),
        "{e}"
    );
    // Nothing of the refusals was written.
    let store = services::list(&mut client, DEFAULT_PREFIX).await.unwrap();
    assert_eq!(store.len(), 2);

    // The range from the network config.
    let flannel = "/coreos.com/network";
    client
        .put(
            format!("{flannel}/config"),
            r#"{"Network":"10.244.0.0/16","NodePortRange":"31000-31010","Backend":{"Type":"vxlan"}}"#,
            None,
        )
        .await
        .unwrap();
    let (g, _) = services::AddressGuard::for_cluster(&mut client, flannel, None)
        .await
        .unwrap();
    assert_eq!(g.node_ports.to_string(), "31000-31010");
    apply(vec![node_port_service("c", "10.96.2.3", None, None)], g)
        .await
        .unwrap();
    let store = services::list(&mut client, DEFAULT_PREFIX).await.unwrap();
    assert_eq!(
        ports(&store, "c"),
        vec![(80, Proto::Tcp, 31000), (53, Proto::Udp, 31001)]
    );
}

/// `healthCheckNodePort`, as the API server handles it: a LoadBalancer
/// with externalTrafficPolicy Local gets one from the nodePort range
/// (never one a nodePort or another Service holds), keeps it when
/// re-applied without it; an explicit one is checked like a nodePort;
/// any other Service may not set one.
#[tokio::test]
async fn apply_allocates_health_check_node_ports() {
    let (_etcd, mut client) = setup().await;
    let mut guard = services::AddressGuard::new("10.96.0.0/12".parse().unwrap(), None);
    guard.node_ports = "30000-30009".parse().unwrap();
    let lb = |name: &str, ip: &str, etp: &str, hc: Option<i32>| {
        let Object::Service(mut s) = node_port_service(name, ip, None, None) else {
            unreachable!()
        };
        let spec = s.spec.as_mut().unwrap();
        spec.type_ = Some("LoadBalancer".into());
        spec.external_traffic_policy = Some(etp.into());
        spec.health_check_node_port = hc;
        Object::Service(s)
    };
    let c0 = client.clone();
    let apply = |objects: Vec<Object>| {
        let (mut c, g) = (c0.clone(), guard.clone());
        async move { services::apply_guarded(&mut c, DEFAULT_PREFIX, &objects, &g).await }
    };
    apply(vec![
        lb("local", "10.96.3.1", "Local", None),
        lb("cluster", "10.96.3.2", "Cluster", None),
    ])
    .await
    .unwrap();
    let store = services::list(&mut client, DEFAULT_PREFIX).await.unwrap();
    let np: Vec<u16> = store.node_ports(&sn("local")).iter().map(|p| p.2).collect();
    assert_eq!(np, vec![30000, 30001]);
    assert_eq!(store.health_check_node_port(&sn("local")), Some(30002));
    assert_eq!(store.health_check_node_port(&sn("cluster")), None);
    // Re-applied without it: kept, nothing rewritten.
    let s = apply(vec![lb("local", "10.96.3.1", "Local", None)])
        .await
        .unwrap();
    assert_eq!(s.count(ApplyOutcome::Unchanged), 1);
    // An explicit one held by another Service's nodePort, or outside the range.
    let e = apply(vec![lb("other", "10.96.3.3", "Local", Some(30001))])
        .await
        .unwrap_err();
    assert!(
        e.to_string().ends_with(
            "spec.healthCheckNodePort: 30001 is already allocated to service default/local"
        ),
        "{e}"
    );
    let e = apply(vec![lb("other", "10.96.3.3", "Local", Some(31000))])
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("spec.healthCheckNodePort: 31000 is outside"),
        "{e}"
    );
    // Only a LoadBalancer with externalTrafficPolicy Local has one.
    let e = apply(vec![lb("other", "10.96.3.3", "Cluster", Some(30009))])
        .await
        .unwrap_err();
    assert!(
        e.to_string().ends_with(
            "spec.healthCheckNodePort: may only be set when spec.type is LoadBalancer and spec.externalTrafficPolicy is Local"
        ),
        "{e}"
    );
}
