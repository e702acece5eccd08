//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4)
//! for north-south frontends: the lookup table a new flow's 5-tuple hash
//! indexes (`dataplane-ebpf/src/nodeport.rs`).
//!
//! A pure function of the backend list in slot order. The agent's slots
//! are the frontend's backends sorted (address, then port) without
//! duplicates ([`super::FrontendSpec::backends`]), and the hashes below
//! are fixed (no per-process seed), so every node computes the same table
//! for the same endpoints: a flow that reaches any node for an
//! externalTrafficPolicy Cluster frontend goes to the same backend.
//!
//! Size: [`MAGLEV_M`] = 1021 entries of 2 bytes. Each backend gets
//! `floor(M/N)` or `ceil(M/N)` entries (the round-robin fill), so the
//! load is even to within one entry in `M/N` (10% at N = 100, 1% at
//! N = 10). Removing one of N backends moves that backend's entries and
//! only a few others (measured in the tests below, and stated in the
//! README). The table costs 2 KB per north-south frontend (20 MB for
//! 10,000), allocated as frontends are written.

use dataplane_common::{Backend, MAGLEV_M, MaglevTable};

/// A backend's name for hashing: its address and port, wire order.
pub fn name(b: &Backend) -> [u8; 6] {
    [b.ip[0], b.ip[1], b.ip[2], b.ip[3], b.port[0], b.port[1]]
}

/// FNV-1a (64 bit) of `bytes`, starting from `seed`.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short inputs: finish like splitmix64.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

const SEED_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const SEED_SKIP: u64 = 0x8422_2325_cbf2_9ce4;

/// The Maglev table of size `m` (a prime) for `names` (in slot order):
/// entry `i` is the slot of the backend that serves hash `i`. Empty
/// `names` give a table of zeros (the data path checks the count first).
/// At most 65,535 backends are named; more get no entries.
pub fn table(names: &[[u8; 6]], m: usize) -> Vec<u16> {
    let n = names.len().min(usize::from(u16::MAX));
    let mut entry = vec![u16::MAX; m];
    if n == 0 || m == 0 {
        return vec![0; m];
    }
    let m64 = m as u64;
    let perm: Vec<(u64, u64)> = names[..n]
        .iter()
        .map(|nm| {
            let offset = fnv1a(SEED_OFFSET, nm) % m64;
            let skip = fnv1a(SEED_SKIP, nm) % (m64 - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perm[i];
            let mut c = ((offset + next[i] * skip) % m64) as usize;
            while entry[c] != u16::MAX {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m64) as usize;
            }
            entry[c] = i as u16;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

/// [`table`] at the data path's size, as the map value.
pub fn wire_table(names: &[[u8; 6]]) -> Box<MaglevTable> {
    let t = table(names, MAGLEV_M as usize);
    let mut w = Box::new(MaglevTable {
        slots: [0; MAGLEV_M as usize],
    });
    w.slots.copy_from_slice(&t);
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<[u8; 6]> {
        (0..n)
            .map(|i| {
                let ip = [10, 244, (1 + i / 200) as u8, (2 + i % 200) as u8];
                [ip[0], ip[1], ip[2], ip[3], 0x1f, 0x90]
            })
            .collect()
    }

    /// Entries per backend: (min, max).
    fn spread(t: &[u16], n: usize) -> (usize, usize) {
        let mut c = vec![0usize; n];
        for &s in t {
            c[usize::from(s)] += 1;
        }
        (*c.iter().min().unwrap(), *c.iter().max().unwrap())
    }

    #[test]
    fn every_backend_gets_its_share_within_one_entry() {
        let m = MAGLEV_M as usize;
        for n in [1, 2, 3, 7, 10, 50, 100] {
            let t = table(&names(n), m);
            assert_eq!(t.len(), m);
            assert!(t.iter().all(|&s| usize::from(s) < n));
            let (lo, hi) = spread(&t, n);
            assert!(lo >= m / n && hi <= m.div_ceil(n), "n={n}: {lo}..{hi}");
        }
    }

    #[test]
    fn same_backends_same_table() {
        // What every node computes from the same (sorted) endpoints.
        assert_eq!(table(&names(5), 1021), table(&names(5), 1021));
        assert_eq!(table(&[], 7), vec![0; 7]);
    }

    /// Share of the entries not held by the removed backend that change
    /// backend when one of `n` is removed (averaged over which one).
    fn moved_share(n: usize) -> f64 {
        let m = MAGLEV_M as usize;
        let all = names(n);
        let before = table(&all, m);
        let (mut moved, mut kept) = (0usize, 0usize);
        for gone in 0..n {
            let rest: Vec<[u8; 6]> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != gone)
                .map(|(_, b)| *b)
                .collect();
            let after = table(&rest, m);
            for (b, a) in before.iter().zip(&after) {
                if usize::from(*b) == gone {
                    continue;
                }
                kept += 1;
                if all[usize::from(*b)] != rest[usize::from(*a)] {
                    moved += 1;
                }
            }
        }
        moved as f64 / kept as f64
    }

    /// The figures the README states (printed with `--nocapture`):
    /// removing one of N backends moves the removed backend's flows
    /// (1/N of them, unavoidable) plus this share of the others.
    #[test]
    fn removing_one_backend_moves_few_other_flows() {
        for (n, bound) in [(3, 0.05), (10, 0.05), (50, 0.10), (100, 0.15)] {
            let s = moved_share(n);
            println!(
                "maglev M=1021: one of {n} backends removed: {:.2}% of the other flows move",
                s * 100.0
            );
            assert!(s < bound, "n={n}: {s}");
        }
    }

    /// Flows, not just entries: 100,000 5-tuple hashes looked up before
    /// and after, as the data path does (hash % M).
    #[test]
    fn flows_follow_the_table() {
        let m = MAGLEV_M as usize;
        let all = names(10);
        let rest: Vec<[u8; 6]> = all[1..].to_vec();
        let (before, after) = (table(&all, m), table(&rest, m));
        let mut moved = 0;
        let mut survivors = 0;
        for i in 0u64..100_000 {
            let h = (fnv1a(1, &i.to_le_bytes()) as u32) as usize % m;
            let b = all[usize::from(before[h])];
            if b == all[0] {
                continue;
            }
            survivors += 1;
            if rest[usize::from(after[h])] != b {
                moved += 1;
            }
        }
        let share = f64::from(moved) / f64::from(survivors);
        println!(
            "maglev: 100,000 flows, one of 10 backends removed: {:.2}% of the others move",
            share * 100.0
        );
        assert!(share < 0.05, "{share}");
    }
}
