//! GC's decision: which attachments the agent holds that the runtime no
//! longer has (spec section 2, "GC").

use std::collections::HashSet;

use super::proto::{Attachment, AttachmentKey};

/// The attachments of `registered` whose key is not in `valid`, in
/// `(container_id, ifname)` order. Duplicates in either list are harmless.
pub fn stale(registered: &[Attachment], valid: &[AttachmentKey]) -> Vec<Attachment> {
    let valid: HashSet<&AttachmentKey> = valid.iter().collect();
    let mut seen = HashSet::new();
    let mut out: Vec<Attachment> = registered
        .iter()
        .filter(|a| {
            let key = a.key();
            !valid.contains(&key) && seen.insert(key)
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn att(id: &str, ifname: &str, last: u8) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: ifname.into(),
            ip: Ipv4Addr::new(10, 0, 0, last),
        }
    }

    fn key(id: &str, ifname: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: id.into(),
            ifname: ifname.into(),
        }
    }

    #[test]
    fn stale_is_registered_minus_valid() {
        let registered = vec![
            att("c", "eth0", 4),
            att("a", "eth0", 2),
            att("a", "net1", 3),
            att("b", "eth0", 5),
            att("c", "eth0", 4),
        ];
        let valid = vec![key("a", "eth0"), key("b", "eth0"), key("zzz", "eth0")];
        assert_eq!(
            stale(&registered, &valid),
            vec![att("a", "net1", 3), att("c", "eth0", 4)]
        );
        // The interface name is part of the key.
        assert_eq!(stale(&[att("a", "eth0", 2)], &[key("a", "eth1")]).len(), 1);
        assert!(stale(&[], &valid).is_empty());
        assert_eq!(stale(&registered, &[]).len(), 4);
        assert!(
            stale(
                &registered,
                &[
                    key("a", "eth0"),
                    key("a", "net1"),
                    key("b", "eth0"),
                    key("c", "eth0")
                ]
            )
            .is_empty()
        );
    }
}
