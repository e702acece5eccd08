//! The agent's guard on Services in etcd ([`crate::services::guard`]): a
//! Service whose ClusterIP is outside the service CIDR, or is a pod, node
//! or gateway address, is skipped; of two Services claiming one frontend
//! the older programs it ([`crate::services::ServiceStore::owner`]), the
//! newer is skipped for that frontend and takes over when the older goes.
//! Each skip is counted and logged once (again only when its reason
//! changes). A skipped Service keeps what it had programmed before (the
//! last good state); it never had a frontend another Service owns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use log::{info, warn};

use crate::peers::PeerChange;
use crate::services::{AddressGuard, Frontend, FrontendSpec, ServiceName, ServiceStore};

/// What the guard decided for one Service.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Program these frontends (those another Service owns taken out).
    Program,
    /// Leave the maps as they are: the ClusterIP is refused.
    Keep,
}

/// The address rules, and the Services skipped now.
pub(super) struct ServiceGuard {
    pub(super) addresses: AddressGuard,
    /// Skipped Services, with why (logged once per reason).
    skipped: BTreeMap<ServiceName, String>,
    /// Skips so far (each Service each time it starts being skipped or
    /// for another reason).
    pub(super) skips: u64,
}

impl ServiceGuard {
    pub(super) fn new(addresses: AddressGuard) -> ServiceGuard {
        ServiceGuard {
            addresses,
            skipped: BTreeMap::new(),
            skips: 0,
        }
    }

    /// Services skipped now.
    #[cfg(test)]
    pub(super) fn skipped(&self) -> impl Iterator<Item = &ServiceName> {
        self.skipped.keys()
    }

    /// Applies the rules to `name`'s `fronts` (from
    /// [`ServiceStore::frontends_for`]), taking out those another Service
    /// owns.
    pub(super) fn judge(
        &mut self,
        store: &ServiceStore,
        name: &ServiceName,
        fronts: &mut BTreeMap<Frontend, FrontendSpec>,
    ) -> Verdict {
        if let Some(ip) = store.cluster_ip(name)
            && let Err(why) = self.addresses.check(ip)
        {
            self.note(name, Some(why));
            return Verdict::Keep;
        }
        // externalIPs and LoadBalancer IPs on a pod, gateway or ClusterIP
        // address are not programmed (the rest of the Service is).
        // Likewise a nodePort outside the range (`NodePortRange` of the
        // network config, else the default).
        let check = |f: &Frontend, s: &FrontendSpec| -> Result<(), String> {
            if s.north_south.is_none() {
                Ok(())
            } else if f.ip.is_unspecified() {
                let r = self.addresses.node_ports;
                if r.contains(f.port) {
                    Ok(())
                } else {
                    Err(format!(
                        "nodePort {} is outside the nodePort range {r}",
                        f.port
                    ))
                }
            } else {
                self.addresses.check_external(f.ip)
            }
        };
        let refused: Vec<String> = fronts
            .iter()
            .filter_map(|(f, s)| check(f, s).err())
            .collect::<BTreeSet<String>>()
            .into_iter()
            .collect();
        fronts.retain(|f, s| check(f, s).is_ok());
        let lost: Vec<(Frontend, ServiceName)> = fronts
            .keys()
            .filter_map(|f| match store.owner(f) {
                Some(o) if o != name => Some((*f, o.clone())),
                _ => None,
            })
            .collect();
        for (f, _) in &lost {
            fronts.remove(f);
        }
        let contested = (!lost.is_empty()).then(|| {
            let list: Vec<String> = lost
                .iter()
                .map(|(f, o)| {
                    format!(
                        "{}:{}/{} (owned by the older service {o})",
                        f.ip, f.port, f.proto
                    )
                })
                .collect();
            format!(
                "{} claimed by another service, which keeps it until it goes: {}",
                if lost.len() == 1 {
                    "a frontend is"
                } else {
                    "frontends are"
                },
                list.join(", ")
            )
        });
        let why = match (refused.is_empty(), contested) {
            (true, c) => c,
            (false, c) => Some(
                std::iter::once(format!(
                    "its external addresses are refused: {}",
                    refused.join("; ")
                ))
                .chain(c)
                .collect::<Vec<_>>()
                .join("; "),
            ),
        };
        self.note(name, why);
        Verdict::Program
    }

    fn note(&mut self, name: &ServiceName, why: Option<String>) {
        match why {
            Some(why) => {
                if self.skipped.get(name) != Some(&why) {
                    self.skips += 1;
                    warn!(
                        "service {name} skipped: {why} ({} skips so far)",
                        self.skips
                    );
                    self.skipped.insert(name.clone(), why);
                }
            }
            None => {
                if self.skipped.remove(name).is_some() {
                    info!("service {name}: no longer skipped");
                }
            }
        }
    }

    /// Records this node's own lease (before the peer watch reports it).
    pub(super) fn own_lease(&mut self, subnet: Ipv4Net, public_ip: Ipv4Addr) {
        self.addresses.add_lease(subnet, public_ip);
    }

    /// Follows the lease table; returns the Services to judge again (those
    /// with a ClusterIP on an address that came or went).
    pub(super) fn peers_changed(
        &mut self,
        store: &ServiceStore,
        changes: &[PeerChange],
    ) -> BTreeSet<ServiceName> {
        let mut ips = BTreeSet::new();
        for c in changes {
            match c {
                PeerChange::Added(net, a) => {
                    self.addresses.add_lease(*net, a.public_ip);
                    ips.extend([a.public_ip, AddressGuard::gateway_of(*net)]);
                }
                PeerChange::Changed { subnet, old, new } => {
                    self.addresses.remove_lease(*subnet, old.public_ip);
                    self.addresses.add_lease(*subnet, new.public_ip);
                    ips.extend([old.public_ip, new.public_ip]);
                }
                PeerChange::Removed(net, a) => {
                    self.addresses.remove_lease(*net, a.public_ip);
                    ips.extend([a.public_ip, AddressGuard::gateway_of(*net)]);
                }
            }
        }
        ips.into_iter()
            .flat_map(|ip| store.services_on(ip))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;
    use crate::services::{StoreUpdate, parse_manifests};

    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  ports:\n  - {{port: 80}}\n"
        )
    }

    fn put(store: &mut ServiceStore, yaml: &str, rev: i64) -> BTreeSet<ServiceName> {
        let o = &parse_manifests(yaml).unwrap()[0];
        store.apply(StoreUpdate::put(
            &o.object_ref().relative_key(),
            &o.to_json(),
            rev,
        ))
    }

    fn sn(n: &str) -> ServiceName {
        ServiceName::new("default", n)
    }

    fn guard() -> ServiceGuard {
        ServiceGuard::new(AddressGuard::new(
            "10.96.0.0/12".parse().unwrap(),
            Some("10.244.0.0/16".parse().unwrap()),
        ))
    }

    fn judge(g: &mut ServiceGuard, s: &ServiceStore, n: &str) -> (Verdict, usize) {
        let mut f = s.frontends_for(&sn(n), &|_| false);
        let v = g.judge(s, &sn(n), &mut f);
        (v, f.len())
    }

    /// An externalIP on a pod, gateway or ClusterIP address (written to
    /// etcd without `apply`) is not programmed, counted and logged once;
    /// the Service's other frontends are.
    #[test]
    fn external_ips_on_cluster_addresses_are_skipped() {
        let mut s = ServiceStore::new();
        let mut g = guard();
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  clusterIP: 10.96.0.10\n  externalIPs: [\"10.244.3.9\", \"198.51.100.7\"]\n  ports:\n  - {port: 80}\n";
        put(&mut s, yaml, 5);
        let (v, n) = judge(&mut g, &s, "ext");
        assert_eq!(v, Verdict::Program);
        assert_eq!(n, 2, "the ClusterIP and the good externalIP");
        assert_eq!(g.skips, 1);
        judge(&mut g, &s, "ext");
        assert_eq!(g.skips, 1, "logged and counted once");
        // A nodePort outside the range.
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.11\n  ports:\n  - {port: 80, nodePort: 30080}\n  - {name: b, port: 81, nodePort: 40000}\n";
        let yaml = yaml.replace("- {port: 80", "- {name: a, port: 80");
        put(&mut s, &yaml, 6);
        let (_, n) = judge(&mut g, &s, "np");
        assert_eq!(n, 3, "two ClusterIP frontends and nodePort 30080");
        assert_eq!(g.skips, 2);
    }

    #[test]
    fn older_service_keeps_the_frontend_newer_takes_over() {
        let mut s = ServiceStore::new();
        let mut g = guard();
        put(&mut s, &svc("old", "10.96.0.10"), 5);
        // The newer one arrives: both are reported (the owner does not
        // change, but the newer must be judged).
        let touched = put(&mut s, &svc("new", "10.96.0.10"), 9);
        assert_eq!(touched, BTreeSet::from([sn("new"), sn("old")]));
        assert_eq!(judge(&mut g, &s, "old"), (Verdict::Program, 1));
        assert_eq!(judge(&mut g, &s, "new"), (Verdict::Program, 0));
        assert_eq!(g.skipped().collect::<Vec<_>>(), vec![&sn("new")]);
        assert_eq!(g.skips, 1);
        // Judged again (say an endpoint changed): counted and logged once.
        judge(&mut g, &s, "new");
        assert_eq!(g.skips, 1);
        // The older goes: the newer takes over.
        let touched = s.apply(StoreUpdate::Delete {
            key: "services/default/old".into(),
        });
        assert!(touched.contains(&sn("new")), "{touched:?}");
        assert_eq!(judge(&mut g, &s, "new"), (Verdict::Program, 1));
        assert_eq!(g.skipped().count(), 0);
        // Arrival order does not matter, the create revision does.
        let mut s = ServiceStore::new();
        put(&mut s, &svc("new", "10.96.0.10"), 9);
        put(&mut s, &svc("old", "10.96.0.10"), 5);
        assert_eq!(judge(&mut g, &s, "new").1, 0);
        assert_eq!(judge(&mut g, &s, "old").1, 1);
        // The older moves away: the newer gets the frontend.
        let touched = put(&mut s, &svc("old", "10.96.0.11"), 5);
        assert!(touched.contains(&sn("new")), "{touched:?}");
        assert_eq!(judge(&mut g, &s, "new").1, 1);
        assert_eq!(judge(&mut g, &s, "old").1, 1);
    }

    #[test]
    fn refused_addresses_keep_the_last_good_state() {
        let mut s = ServiceStore::new();
        let mut g = guard();
        for (ip, ok) in [
            ("10.96.0.10", true),
            ("10.200.0.1", false), // outside the service CIDR
            ("10.244.7.9", false), // a pod address
            ("10.97.0.1", true),
        ] {
            put(&mut s, &svc("web", ip), 3);
            let want = if ok { Verdict::Program } else { Verdict::Keep };
            assert_eq!(judge(&mut g, &s, "web").0, want, "{ip}");
        }
        assert_eq!(g.skips, 2);
    }

    #[test]
    fn node_and_gateway_addresses_follow_the_leases() {
        let mut s = ServiceStore::new();
        let mut g = guard();
        put(&mut s, &svc("web", "10.100.0.5"), 3);
        assert_eq!(judge(&mut g, &s, "web").0, Verdict::Program);
        let attrs = LeaseAttrs {
            public_ip: "10.100.0.5".parse().unwrap(),
            backend_type: "vxlan".into(),
            vni: 1,
            vtep_mac: [2, 0, 0, 0, 0, 1],
        };
        let net: Ipv4Net = "10.244.9.0/24".parse().unwrap();
        let again = g.peers_changed(&s, &[PeerChange::Added(net, attrs.clone())]);
        assert_eq!(again, BTreeSet::from([sn("web")]));
        assert_eq!(judge(&mut g, &s, "web").0, Verdict::Keep);
        let again = g.peers_changed(&s, &[PeerChange::Removed(net, attrs)]);
        assert_eq!(again, BTreeSet::from([sn("web")]));
        assert_eq!(judge(&mut g, &s, "web").0, Verdict::Program);
        // The own lease's gateway.
        g.own_lease(
            "10.96.5.0/24".parse().unwrap(),
            "192.168.1.1".parse().unwrap(),
        );
        put(&mut s, &svc("gw", "10.96.5.1"), 4);
        assert_eq!(judge(&mut g, &s, "gw").0, Verdict::Keep);
    }
}
