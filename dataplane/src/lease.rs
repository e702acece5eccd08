//! Subnet leases in etcd, in flannel's format.
//!
//! A lease is the key `<prefix>/subnets/<a.b.c.d>-<len>` holding this node's
//! [`LeaseAttrs`] as JSON, attached to an etcd lease (TTL 24 h by default).
//! [`acquire`] follows flannel's order (take back our own lease, else the
//! subnet from subnet.env, else a random free one) but retries on a lost race
//! instead of exiting. [`LeaseKeeper`] renews the etcd lease with keep-alives
//! and, unlike flannel (which exits), re-acquires when our key disappears,
//! preferring the same subnet so running pods keep their addresses.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp};
use ipnet::Ipv4Net;
use rand::seq::IndexedRandom;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::{MAX_VNI, NetworkConfig, get_ci};
use crate::etcd::{
    self, EtcdError, Event, KeyRange, Prefix, Update, create_if_absent, list_then_watch,
    wait_shutdown,
};

/// flannel's lease TTL: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// flannel's renew margin: renew one hour before expiry.
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(60 * 60);
/// How many times [`acquire`] lists and tries again after losing a race.
pub const MAX_ATTEMPTS: usize = 10;
/// [`acquire`] picks at random among this many free subnets (as flannel does),
/// so that nodes starting together rarely collide.
const FREE_CANDIDATES: usize = 100;
/// Bound on each renewal (and revocation) made by the keeper, so a
/// black-holed connection cannot stall renewals forever.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// What a node publishes in its lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseAttrs {
    /// Underlay address other nodes send VXLAN packets to.
    pub public_ip: Ipv4Addr,
    /// flannel backend name; `"vxlan"` for us.
    pub backend_type: String,
    /// `BackendData.VNI`; 0 when absent. Receivers ignore it.
    pub vni: u32,
    /// `BackendData.VtepMAC`: inner destination MAC for packets to this node.
    pub vtep_mac: [u8; 6],
}

/// Why a lease could not be read, acquired or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A lease value is not flannel's JSON.
    #[error("malformed lease value: {0}")]
    Malformed(String),
    /// An etcd request failed or did not answer in time.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// Every subnet the config allows is leased.
    #[error(
        "no free subnet: every /{subnet_len} between SubnetMin {subnet_min} and SubnetMax \
         {subnet_max} of Network {network} is leased; widen the range in the network config \
         or remove stale leases"
    )]
    PoolExhausted {
        /// `Network` of the config.
        network: Ipv4Net,
        /// `SubnetLen` of the config.
        subnet_len: u8,
        /// `SubnetMin` of the config.
        subnet_min: Ipv4Addr,
        /// `SubnetMax` of the config.
        subnet_max: Ipv4Addr,
    },
    /// Other writers kept winning the race for the subnets we tried.
    #[error("gave up after {0} attempts: other nodes kept taking the subnets we tried")]
    Contention(usize),
}

#[derive(Serialize)]
struct WireBackendData {
    #[serde(rename = "VNI")]
    vni: u32,
    #[serde(rename = "VtepMAC")]
    vtep_mac: String,
}

/// Field order matters: flannel writes them in this order and we want
/// byte-identical values.
#[derive(Serialize)]
struct WireAttrs<'a> {
    #[serde(rename = "PublicIP")]
    public_ip: String,
    #[serde(rename = "PublicIPv6")]
    public_ipv6: Option<String>,
    #[serde(rename = "BackendType")]
    backend_type: &'a str,
    #[serde(rename = "BackendData")]
    backend_data: WireBackendData,
}

/// `c6:d2:32:6f:8f:44`, as Go's `net.HardwareAddr.String()` prints it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Parses a 6-byte MAC written with `:` or `-` separators (any case), the
/// forms Go's `net.ParseMAC` accepts for Ethernet addresses.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let sep = if s.contains(':') { ':' } else { '-' };
    let mut mac = [0u8; 6];
    let mut parts = s.split(sep);
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl LeaseAttrs {
    /// The lease value, byte for byte what flannel writes, e.g.
    /// `{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}`.
    pub fn to_json(&self) -> String {
        let wire = WireAttrs {
            public_ip: self.public_ip.to_string(),
            public_ipv6: None,
            backend_type: &self.backend_type,
            backend_data: WireBackendData {
                vni: self.vni,
                vtep_mac: format_mac(&self.vtep_mac),
            },
        };
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses a lease value written by flannel or by us. Field names are
    /// case-insensitive (as in Go); field order, `PublicIPv6` and
    /// `BackendData.VNI` do not matter. `PublicIP` must be an IPv4 address and
    /// `BackendData.VtepMAC` a MAC: without them the node is unreachable.
    pub fn from_json(value: &[u8]) -> Result<LeaseAttrs, LeaseError> {
        let bad = |m: String| LeaseError::Malformed(m);
        let v: Value = serde_json::from_slice(value).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let field = |name: &str| get_ci(obj, name).map_err(|m| bad(format!("{name}: {m}")));

        let public_ip = match field("PublicIP")? {
            Some(Value::String(s)) => s
                .parse::<Ipv4Addr>()
                .map_err(|_| bad(format!("PublicIP: {s:?} is not an IPv4 address")))?,
            Some(other) => return Err(bad(format!("PublicIP: expected a string, got {other}"))),
            None => return Err(bad("PublicIP missing".into())),
        };
        let backend_type = match field("BackendType")? {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(bad(format!("BackendType: expected a string, got {other}")));
            }
            None => return Err(bad("BackendType missing".into())),
        };
        let data = match field("BackendData")? {
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(bad(format!("BackendData: expected an object, got {other}")));
            }
            None => {
                return Err(bad(format!(
                    "BackendData missing (backend {backend_type:?} publishes no VtepMAC)"
                )));
            }
        };
        let data_field =
            |name: &str| get_ci(data, name).map_err(|m| bad(format!("BackendData.{name}: {m}")));
        // Receivers ignore the VNI; keep it when it makes sense, else 0.
        let vni = data_field("VNI")?
            .and_then(Value::as_u64)
            .filter(|&n| n <= u64::from(MAX_VNI))
            .map_or(0, |n| n as u32);
        let vtep_mac = match data_field("VtepMAC")? {
            Some(Value::String(s)) => parse_mac(s)
                .ok_or_else(|| bad(format!("BackendData.VtepMAC: {s:?} is not a MAC address")))?,
            Some(other) => {
                return Err(bad(format!(
                    "BackendData.VtepMAC: expected a string, got {other}"
                )));
            }
            None => return Err(bad("BackendData.VtepMAC missing".into())),
        };
        Ok(LeaseAttrs {
            public_ip,
            backend_type,
            vni,
            vtep_mac,
        })
    }
}

/// The VtepMAC this agent publishes for a node: locally administered,
/// unicast, derived from the PublicIP so it is stable across restarts (peers'
/// neighbour entries stay valid) and distinct between nodes.
pub fn vtep_mac_for(public_ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = public_ip.octets();
    [0x02, 0xdb, a, b, c, d]
}

/// The directory holding every node's lease: `<prefix>/subnets/`.
pub fn subnets_dir(prefix: &Prefix) -> Prefix {
    prefix.join("subnets")
}

/// The key of a subnet's lease: `<prefix>/subnets/10.244.1.0-24`.
pub fn subnet_key(prefix: impl Into<Prefix>, subnet: Ipv4Net) -> String {
    key_in(&subnets_dir(&prefix.into()), subnet)
}

/// The subnet named by a lease key, or `None` for anything else (another
/// prefix, garbage, host bits set). A dual-stack suffix (`&fd00::-64`) is
/// ignored: we only use the IPv4 part.
pub fn parse_subnet_key(prefix: impl Into<Prefix>, key: &str) -> Option<Ipv4Net> {
    subnet_in(&subnets_dir(&prefix.into()), key)
}

/// [`subnet_key`] with the directory from [`subnets_dir`].
pub(crate) fn key_in(subnets: &Prefix, subnet: Ipv4Net) -> String {
    subnets.key(&format!("{}-{}", subnet.addr(), subnet.prefix_len()))
}

/// [`parse_subnet_key`] with the directory from [`subnets_dir`].
pub(crate) fn subnet_in(subnets: &Prefix, key: &str) -> Option<Ipv4Net> {
    let rest = subnets.strip(key)?;
    let v4 = match rest.split_once('&') {
        Some((v4, v6)) if !v6.is_empty() => v4,
        Some(_) => return None,
        None => rest,
    };
    let (addr, len) = v4.split_once('-')?;
    if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let addr: Ipv4Addr = addr.parse().ok()?;
    let net = Ipv4Net::new(addr, len.parse().ok()?).ok()?;
    (net.network() == addr).then_some(net)
}

/// A subnet lease we hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Our node subnet.
    pub subnet: Ipv4Net,
    /// What we published.
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is attached to.
    pub lease_id: i64,
    /// TTL etcd granted (it may round small TTLs up).
    pub ttl: Duration,
}

/// One entry under `<prefix>/subnets/` as seen while acquiring.
struct Existing {
    key: String,
    subnet: Ipv4Net,
    /// `None` when the value does not parse: the subnet is still taken.
    attrs: Option<LeaseAttrs>,
    mod_revision: i64,
    lease_id: i64,
}

async fn list_leases(client: &Client, dir: &Prefix) -> Result<Vec<Existing>, LeaseError> {
    let (kvs, _) = etcd::list(&mut etcd::kv_client(client), &dir.range()).await?;
    let mut out = Vec::with_capacity(kvs.len());
    for kv in &kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let Some(subnet) = subnet_in(dir, &key) else {
            log::warn!("ignoring malformed lease key {key:?}");
            continue;
        };
        let attrs = match LeaseAttrs::from_json(kv.value()) {
            Ok(a) => Some(a),
            Err(e) => {
                log::warn!("lease {key}: {e}; treating {subnet} as taken by an unknown node");
                None
            }
        };
        out.push(Existing {
            key,
            subnet,
            attrs,
            mod_revision: kv.mod_revision(),
            lease_id: kv.lease(),
        });
    }
    Ok(out)
}

fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

async fn grant(client: &mut Client, ttl: Duration) -> Result<(i64, Duration), LeaseError> {
    let resp = etcd::timed(
        || format!("granting a {}s lease", ttl_secs(ttl)),
        client.lease_grant(ttl_secs(ttl), None),
    )
    .await?;
    let granted = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0).max(1));
    Ok((resp.id(), granted))
}

async fn revoke_quietly(client: &mut Client, id: i64, why: &str) {
    match tokio::time::timeout(RPC_TIMEOUT, client.lease_revoke(id)).await {
        Ok(Ok(_)) => log::debug!("revoked etcd lease {id:x} ({why})"),
        Ok(Err(e)) => log::debug!("revoking etcd lease {id:x} ({why}): {e}"),
        Err(_) => log::debug!("revoking etcd lease {id:x} ({why}): timed out"),
    }
}

/// Rewrites `key` under etcd lease `id` only if nobody touched it since we
/// listed it (so we never clobber a node that grabbed it meanwhile).
async fn rewrite_if_unchanged(
    client: &mut Client,
    key: &str,
    value: &str,
    id: i64,
    mod_revision: i64,
) -> Result<bool, LeaseError> {
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
        .and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(id)),
        )]);
    let resp = etcd::timed(|| format!("taking back {key}"), client.txn(txn)).await?;
    Ok(resp.succeeded())
}

/// Acquires a subnet lease for a node publishing `attrs`.
///
/// Order, as in flannel: (1) a lease whose PublicIP is ours and whose subnet
/// fits `cfg` is taken back, rewritten with `attrs` under a fresh etcd lease
/// (the old etcd lease is revoked); (2) else `hint` (the subnet recorded in
/// subnet.env) if free and fitting; (3) else a random one of the first 100
/// free subnets from SubnetMin up. Every write is a compare-and-swap; when
/// another node wins, we list again and retry, at most [`MAX_ATTEMPTS`] times.
pub async fn acquire(
    client: &mut Client,
    prefix: impl Into<Prefix>,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    hint: Option<Ipv4Net>,
    ttl: Duration,
) -> Result<Lease, LeaseError> {
    let subnets = subnets_dir(&prefix.into());
    let mut granted = None;
    let result = acquire_inner(client, &subnets, cfg, attrs, hint, ttl, &mut granted).await;
    if result.is_err()
        && let Some((id, _)) = granted
    {
        revoke_quietly(client, id, "acquire failed").await;
    }
    result
}

async fn acquire_inner(
    client: &mut Client,
    subnets: &Prefix,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    hint: Option<Ipv4Net>,
    ttl: Duration,
    granted: &mut Option<(i64, Duration)>,
) -> Result<Lease, LeaseError> {
    let value = attrs.to_json();
    for attempt in 1..=MAX_ATTEMPTS {
        let existing = list_leases(client, subnets).await?;

        // (1) Our own lease, from a previous run of this node.
        let mut mine = Vec::new();
        for e in &existing {
            if e.attrs
                .as_ref()
                .is_some_and(|a| a.public_ip == attrs.public_ip)
            {
                if cfg.contains_subnet(e.subnet) {
                    mine.push(e);
                } else {
                    log::info!(
                        "lease {} has our PublicIP {} but does not fit the network config; \
                         leaving it to expire",
                        e.key,
                        attrs.public_ip
                    );
                }
            }
        }
        let pick = mine
            .iter()
            .find(|e| Some(e.subnet) == hint)
            .or(mine.first())
            .copied();
        if let Some(e) = pick {
            if mine.len() > 1 {
                log::warn!(
                    "{} leases carry our PublicIP {}; taking back {} and leaving the others to expire",
                    mine.len(),
                    attrs.public_ip,
                    e.subnet
                );
            }
            let (id, granted_ttl) = match *granted {
                Some(g) => g,
                None => *granted.insert(grant(client, ttl).await?),
            };
            if rewrite_if_unchanged(client, &e.key, &value, id, e.mod_revision).await? {
                if e.lease_id != 0 && e.lease_id != id {
                    revoke_quietly(client, e.lease_id, "replaced by a fresh lease").await;
                }
                log::info!(
                    "took back our previous lease {} for subnet {}",
                    e.key,
                    e.subnet
                );
                return Ok(Lease {
                    subnet: e.subnet,
                    attrs: attrs.clone(),
                    lease_id: id,
                    ttl: granted_ttl,
                });
            }
            log::warn!(
                "lease {} changed while we were taking it back (attempt {attempt}/{MAX_ATTEMPTS}); retrying",
                e.key
            );
            continue;
        }

        let taken: HashSet<Ipv4Net> = existing.iter().map(|e| e.subnet).collect();

        // (2) The subnet we had before (from subnet.env).
        let mut candidate = None;
        if let Some(h) = hint {
            if !cfg.contains_subnet(h) {
                log::info!("previous subnet {h} does not fit the network config; not reusing it");
            } else if taken.contains(&h) {
                log::info!("previous subnet {h} is leased by another node; picking another");
            } else {
                candidate = Some(h);
            }
        }

        // (3) A random one of the first free subnets.
        let subnet = match candidate {
            Some(s) => s,
            None => {
                let free: Vec<Ipv4Net> = cfg
                    .subnets()
                    .filter(|s| !taken.contains(s))
                    .take(FREE_CANDIDATES)
                    .collect();
                match free.choose(&mut rand::rng()) {
                    Some(&s) => s,
                    None => {
                        return Err(LeaseError::PoolExhausted {
                            network: cfg.network,
                            subnet_len: cfg.subnet_len,
                            subnet_min: cfg.subnet_min,
                            subnet_max: cfg.subnet_max,
                        });
                    }
                }
            }
        };

        let (id, granted_ttl) = match *granted {
            Some(g) => g,
            None => *granted.insert(grant(client, ttl).await?),
        };
        let key = key_in(subnets, subnet);
        if create_if_absent(client, &key, value.as_str(), Some(id)).await? {
            log::info!(
                "acquired subnet {subnet} ({key}, etcd lease {id:x}, TTL {}s)",
                granted_ttl.as_secs()
            );
            return Ok(Lease {
                subnet,
                attrs: attrs.clone(),
                lease_id: id,
                ttl: granted_ttl,
            });
        }
        log::warn!("another node took {subnet} first (attempt {attempt}/{MAX_ATTEMPTS}); retrying");
    }
    Err(LeaseError::Contention(MAX_ATTEMPTS))
}

/// What the keeper tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Our lease vanished (deleted, expired, overwritten) and we acquired this
    /// one. Its subnet is the old one when it was still free. The agent must
    /// rewrite subnet.env and its maps.
    Reacquired(Lease),
    /// Our lease vanished and acquiring a new one failed; the keeper keeps
    /// trying. Sent once per loss.
    Lost {
        /// The subnet we had.
        subnet: Ipv4Net,
        /// Why it could not be re-acquired yet.
        reason: String,
    },
}

/// When to renew a lease of `ttl`: `margin` before expiry, or half-way when
/// the margin does not fit in the TTL.
pub fn renew_delay(ttl: Duration, margin: Duration) -> Duration {
    if margin < ttl { ttl - margin } else { ttl / 2 }
}

/// How long to wait before retrying a failed renewal: every minute, more
/// often for short TTLs so a retry still lands before expiry.
pub fn retry_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

enum RenewError {
    /// etcd no longer knows the lease: it expired or was revoked.
    Gone,
    Transient(String),
}

async fn renew_once(client: &mut Client, id: i64) -> Result<(), RenewError> {
    // lease_keep_alive sends one keep-alive and waits for its answer; a TTL
    // of 0 in that answer comes back as LeaseKeepAliveError.
    match tokio::time::timeout(RPC_TIMEOUT, client.lease_keep_alive(id)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => Err(RenewError::Gone),
        Ok(Err(etcd_client::Error::GRpcStatus(s))) if i32::from(s.code()) == GRPC_NOT_FOUND => {
            Err(RenewError::Gone)
        }
        Ok(Err(e)) => Err(RenewError::Transient(e.to_string())),
        Err(_) => Err(RenewError::Transient("timed out".into())),
    }
}

/// gRPC status code NOT_FOUND (`tonic::Code::NotFound`; tonic is not a
/// direct dependency).
const GRPC_NOT_FOUND: i32 = 5;

/// Keeps a lease alive until shutdown; re-acquires it if it disappears.
///
/// On shutdown the lease is deliberately not revoked: a restarting agent
/// takes it back, and peers keep routing to us in the meantime.
#[derive(Clone)]
pub struct LeaseKeeper {
    /// etcd connection (cloned from the agent's).
    pub client: Client,
    /// etcd prefix, e.g. `/coreos.com/network`.
    pub prefix: Prefix,
    /// Network config, used when re-acquiring.
    pub cfg: NetworkConfig,
    /// What we publish.
    pub attrs: LeaseAttrs,
    /// Renew this long before expiry (flannel: 1 h).
    pub renew_margin: Duration,
}

/// The watch of our own key: its snapshot and events carry the key-value.
type OwnKeyWatch = etcd::ListWatch<KeyValue, fn(&KeyValue) -> Option<KeyValue>>;

impl LeaseKeeper {
    /// Runs until `shutdown` becomes true (or its sender is dropped).
    pub async fn run(
        mut self,
        lease: Lease,
        events: mpsc::Sender<LeaseEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut lease = lease;
        let mut next_renew = Instant::now() + renew_delay(lease.ttl, self.renew_margin);
        let mut own = self.watch_own_key(&lease, &shutdown);
        log::info!(
            "keeping lease for {} (TTL {}s, renewing every {}s)",
            lease.subnet,
            lease.ttl.as_secs(),
            renew_delay(lease.ttl, self.renew_margin).as_secs_f32()
        );
        let stopping = |lease: &Lease| {
            log::info!(
                "lease keeper stopping; lease for {} left in place",
                lease.subnet
            );
        };

        loop {
            let lost: Option<String> = tokio::select! {
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        stopping(&lease);
                        return;
                    }
                    None
                }
                update = own.next() => match update {
                    None => {
                        stopping(&lease);
                        return;
                    }
                    // Listed (at start, or again after the watch broke).
                    Some(Update::Snapshot(s)) => match s.items.first() {
                        None => Some("our key is gone (expired or deleted)".to_string()),
                        Some(kv) => self.still_ours(&lease, kv.lease(), kv.value()).err(),
                    },
                    Some(Update::Event(Event::Delete(_))) => Some("our key was deleted".to_string()),
                    Some(Update::Event(Event::Put(kv))) => {
                        self.still_ours(&lease, kv.lease(), kv.value()).err()
                    }
                },
                _ = tokio::time::sleep_until(next_renew) => {
                    match renew_once(&mut self.client, lease.lease_id).await {
                        Ok(()) => {
                            // A keep-alive restarts the granted TTL.
                            crate::metrics::global().lease_renewed(std::time::SystemTime::now() + lease.ttl);
                            log::debug!("renewed etcd lease {:x} for {}", lease.lease_id, lease.subnet);
                            next_renew = Instant::now() + renew_delay(lease.ttl, self.renew_margin);
                            None
                        }
                        Err(RenewError::Gone) => Some(format!("etcd lease {:x} expired or was revoked", lease.lease_id)),
                        Err(RenewError::Transient(e)) => {
                            crate::metrics::global().lease_renewal_failed();
                            let retry = retry_interval(lease.ttl);
                            log::warn!(
                                "renewing lease for {}: {e}; retrying in {:.1}s",
                                lease.subnet,
                                retry.as_secs_f32()
                            );
                            next_renew = Instant::now() + retry;
                            None
                        }
                    }
                }
            };

            if let Some(reason) = lost {
                match self
                    .reacquire(&lease, &reason, &events, &mut shutdown)
                    .await
                {
                    Some(new) => {
                        lease = new;
                        next_renew = Instant::now() + renew_delay(lease.ttl, self.renew_margin);
                        own = self.watch_own_key(&lease, &shutdown);
                    }
                    None => return,
                }
            }
        }
    }

    fn key(&self, lease: &Lease) -> String {
        key_in(&subnets_dir(&self.prefix), lease.subnet)
    }

    /// Follows our key: its value now, then every change, so nothing
    /// happening in between is missed.
    fn watch_own_key(&self, lease: &Lease, shutdown: &watch::Receiver<bool>) -> OwnKeyWatch {
        let key = self.key(lease);
        list_then_watch(
            &self.client,
            format!("our lease {key}"),
            KeyRange::key(key),
            (|kv: &KeyValue| Some(kv.clone())) as fn(&KeyValue) -> Option<KeyValue>,
            shutdown.clone(),
        )
        .counted_as("lease")
    }

    /// Whether a value seen on our key is still our lease.
    fn still_ours(&self, lease: &Lease, lease_id: i64, value: &[u8]) -> Result<(), String> {
        if lease_id != lease.lease_id {
            return Err(format!(
                "our key was rewritten under another etcd lease ({lease_id:x}, ours is {:x})",
                lease.lease_id
            ));
        }
        match LeaseAttrs::from_json(value) {
            Ok(a) if a == self.attrs => Ok(()),
            Ok(a) => Err(format!("our key was overwritten with {}", a.to_json())),
            Err(e) => Err(format!("our key was overwritten with garbage ({e})")),
        }
    }

    /// Loud re-acquisition after a loss; `None` on shutdown.
    async fn reacquire(
        &mut self,
        old: &Lease,
        reason: &str,
        events: &mpsc::Sender<LeaseEvent>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Lease> {
        log::error!(
            "LEASE LOST for subnet {} ({}): {reason}. Re-acquiring, asking for the same subnet",
            old.subnet,
            self.key(old)
        );
        let mut told_lost = false;
        loop {
            let res = acquire(
                &mut self.client,
                &self.prefix,
                &self.cfg,
                &self.attrs,
                Some(old.subnet),
                old.ttl,
            )
            .await;
            match res {
                Ok(new) => {
                    if new.subnet == old.subnet {
                        log::warn!(
                            "re-acquired our subnet {} (etcd lease {:x})",
                            new.subnet,
                            new.lease_id
                        );
                    } else {
                        log::error!(
                            "RENUMBERED: subnet {} was taken by another node; this node now has {}. \
                             Pods with addresses from {} lose connectivity until restarted",
                            old.subnet,
                            new.subnet,
                            old.subnet
                        );
                    }
                    if old.lease_id != 0 && old.lease_id != new.lease_id {
                        revoke_quietly(&mut self.client, old.lease_id, "superseded").await;
                    }
                    let ev = LeaseEvent::Reacquired(new.clone());
                    tokio::select! {
                        r = events.send(ev) => if r.is_err() {
                            log::warn!("lease events receiver is gone; the agent will not learn of {}", new.subnet);
                        },
                        _ = wait_shutdown(shutdown) => return None,
                    }
                    return Some(new);
                }
                Err(e) => {
                    let retry = retry_interval(old.ttl);
                    log::error!(
                        "re-acquiring a lease (had {}): {e}; retrying in {:.1}s",
                        old.subnet,
                        retry.as_secs_f32()
                    );
                    if !told_lost {
                        told_lost = true;
                        let ev = LeaseEvent::Lost {
                            subnet: old.subnet,
                            reason: e.to_string(),
                        };
                        tokio::select! {
                            _ = events.send(ev) => {}
                            _ = wait_shutdown(shutdown) => return None,
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = wait_shutdown(shutdown) => return None,
                    }
                }
            }
        }
    }
}

/// Runs a [`LeaseKeeper`]; see there.
#[allow(clippy::too_many_arguments)]
pub async fn keep(
    client: Client,
    prefix: impl Into<Prefix>,
    cfg: NetworkConfig,
    attrs: LeaseAttrs,
    lease: Lease,
    renew_margin: Duration,
    events: mpsc::Sender<LeaseEvent>,
    shutdown: watch::Receiver<bool>,
) {
    LeaseKeeper {
        client,
        prefix: prefix.into(),
        cfg,
        attrs,
        renew_margin,
    }
    .run(lease, events, shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

    fn attrs() -> LeaseAttrs {
        LeaseAttrs {
            public_ip: "192.168.64.3".parse().unwrap(),
            backend_type: "vxlan".into(),
            vni: 1,
            vtep_mac: [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44],
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn to_json_is_byte_identical_to_flannel() {
        assert_eq!(attrs().to_json(), FLANNEL);
    }

    #[test]
    fn from_json_roundtrip_and_tolerance() {
        assert_eq!(LeaseAttrs::from_json(FLANNEL.as_bytes()).unwrap(), attrs());
        // Other order, no PublicIPv6, lower-case names, upper-case MAC.
        let v = br#"{"backenddata":{"VtepMAC":"C6:D2:32:6F:8F:44","VNI":1},"BackendType":"vxlan","publicip":"192.168.64.3"}"#;
        assert_eq!(LeaseAttrs::from_json(v).unwrap(), attrs());
        // Dual-stack lease, VNI missing.
        let v = br#"{"PublicIP":"192.168.64.3","PublicIPv6":"fd00::3","BackendType":"vxlan","BackendData":{"VtepMAC":"c6-d2-32-6f-8f-44"}}"#;
        let a = LeaseAttrs::from_json(v).unwrap();
        assert_eq!(a.vni, 0);
        assert_eq!(a.vtep_mac, attrs().vtep_mac);
    }

    #[test]
    fn from_json_rejects_garbage() {
        for v in [
            &b"garbage"[..],
            b"[]",
            br#"{"BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
            br#"{"PublicIP":"fd00::1","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
            br#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f"}}"#,
            br#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:4g"}}"#,
            br#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44:00"}}"#,
            br#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{}}"#,
            br#"{"PublicIP":"192.168.64.3","BackendType":"host-gw","BackendData":null}"#,
            br#"{"PublicIP":"192.168.64.3","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
        ] {
            assert!(
                matches!(LeaseAttrs::from_json(v), Err(LeaseError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn subnet_keys() {
        let p = "/coreos.com/network";
        assert_eq!(
            subnet_key(p, net("10.244.1.0/24")),
            "/coreos.com/network/subnets/10.244.1.0-24"
        );
        assert_eq!(
            subnet_key("/coreos.com/network/", net("10.244.1.0/24")),
            "/coreos.com/network/subnets/10.244.1.0-24"
        );
        let ok = |k: &str| parse_subnet_key(p, k);
        assert_eq!(
            ok("/coreos.com/network/subnets/10.244.1.0-24"),
            Some(net("10.244.1.0/24"))
        );
        assert_eq!(
            ok("/coreos.com/network/subnets/10.244.1.0-24&fd00:0:0:1::-64"),
            Some(net("10.244.1.0/24"))
        );
        for bad in [
            "/coreos.com/network/subnets/",
            "/coreos.com/network/subnets/garbage",
            "/coreos.com/network/subnets/10.244.1.0",
            "/coreos.com/network/subnets/10.244.1.0-",
            "/coreos.com/network/subnets/10.244.1.0-33",
            "/coreos.com/network/subnets/10.244.1.0-+4",
            "/coreos.com/network/subnets/10.244.1.5-24",
            "/coreos.com/network/subnets/10.244.1.0-24&",
            "/coreos.com/network/subnets/10.244.1.0-24/x",
            "/coreos.com/network/subnets/fd00::-64",
            "/other/subnets/10.244.1.0-24",
            "/coreos.com/network/config",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }

    #[test]
    fn vtep_mac_is_stable_and_distinct() {
        let a = vtep_mac_for("192.168.64.3".parse().unwrap());
        assert_eq!(a, [0x02, 0xdb, 192, 168, 64, 3]);
        assert_eq!(a, vtep_mac_for("192.168.64.3".parse().unwrap()));
        assert_ne!(a, vtep_mac_for("192.168.64.4".parse().unwrap()));
        // Locally administered, unicast.
        assert_eq!(a[0] & 0x03, 0x02);
        assert_eq!(format_mac(&a), "02:db:c0:a8:40:03");
    }

    #[test]
    fn renew_timing() {
        let h = Duration::from_secs(3600);
        assert_eq!(renew_delay(DEFAULT_TTL, DEFAULT_RENEW_MARGIN), 23 * h);
        assert_eq!(
            renew_delay(Duration::from_secs(3), Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(
            renew_delay(Duration::from_secs(3), Duration::from_secs(3)),
            Duration::from_millis(1500)
        );
        assert_eq!(retry_interval(DEFAULT_TTL), Duration::from_secs(60));
        assert_eq!(
            retry_interval(Duration::from_secs(3)),
            Duration::from_millis(750)
        );
    }
}
