//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size
//! `M` in which every backend owns an almost equal share of slots, and adding or removing
//! one backend moves little more than that backend's share. The data path picks
//! `MAGLEV[offset + flow_hash % M]`.
//!
//! The table depends only on the backends' names (their stable identity, `addr:port`,
//! see [`backend_name`]), their order in the slice and `M`. Callers pass the backends in a
//! stable order (the model's sorted endpoints) so an unchanged set gives an unchanged
//! table. Disruption is only minimal between tables of the *same* size: a table rebuilt
//! with another `M` remaps nearly every slot (live flows keep their backend through CT
//! regardless).

use std::net::{IpAddr, SocketAddr};

use lb_common::{BACKEND_NONE, MAGLEV_MIN_SIZE, MAGLEV_MULTIPLIER};

/// Largest prime below 2^32, the cap for absurd endpoint counts.
const LARGEST_U32_PRIME: u32 = 4_294_967_291;

/// Seeds of the two hashes; any change remaps every table.
const SEED_OFFSET: u64 = 0x6d61_676c_6576_0001;
const SEED_SKIP: u64 = 0x6d61_676c_6576_0002;

/// Table size for `n_endpoints` backends: the smallest prime `>=
/// max(MAGLEV_MIN_SIZE, MAGLEV_MULTIPLIER * n)`, or 0 for no backends (a zero size is how
/// SERVICES says "no endpoints, refuse new flows").
pub fn table_size(n_endpoints: usize) -> u32 {
    if n_endpoints == 0 {
        return 0;
    }
    let want = (n_endpoints as u64)
        .saturating_mul(u64::from(MAGLEV_MULTIPLIER))
        .max(u64::from(MAGLEV_MIN_SIZE));
    if want > u64::from(LARGEST_U32_PRIME) {
        return LARGEST_U32_PRIME;
    }
    let mut m = want;
    while !is_prime(m) {
        m += 1;
    }
    // `m` <= LARGEST_U32_PRIME because that is prime and >= want.
    m as u32
}

/// Deterministic primality by trial division; table sizes are at most a few million.
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The stable name a backend is hashed by: `198.18.1.1:8080`, `[2001:db8::1]:8080`.
pub fn backend_name(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

/// FNV-1a over `data`, started from a seeded basis.
fn fnv1a64(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: FNV's low bits are weak, and `offset`/`skip` are taken modulo
/// a prime, so every output bit must depend on every input bit.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Fills a table of `size` slots with indices into `backends` (Maglev's population
/// algorithm: each backend walks its own permutation `offset + j * skip (mod size)` and,
/// in turn, takes the next free slot on it). Every backend gets `size / n` or one more
/// slot. Empty `backends` or a zero `size` give an empty table.
///
/// `size` should be prime ([`table_size`]); for any other size the skips are moved to
/// values coprime with it, so the fill still terminates.
pub fn build_table<B: AsRef<[u8]>>(backends: &[B], size: u32) -> Vec<u32> {
    if backends.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    let mut pos = Vec::with_capacity(backends.len());
    let mut skip = Vec::with_capacity(backends.len());
    for b in backends {
        let name = b.as_ref();
        pos.push(mix64(fnv1a64(SEED_OFFSET, name)) % m);
        let mut s = if m > 1 {
            mix64(fnv1a64(SEED_SKIP, name)) % (m - 1) + 1
        } else {
            1
        };
        // A skip sharing a factor with m would cycle through only part of the table.
        while gcd(s, m) != 1 {
            s = s % (m - 1) + 1;
        }
        skip.push(s);
    }

    let mut table = vec![BACKEND_NONE; size as usize];
    let mut filled = 0u64;
    loop {
        for (i, (p, s)) in pos.iter_mut().zip(&skip).enumerate() {
            // Terminates: the permutation visits every slot and at least one is free.
            while table[*p as usize] != BACKEND_NONE {
                *p = (*p + s) % m;
            }
            table[*p as usize] = i as u32;
            *p = (*p + s) % m;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let ip = Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1);
                backend_name(IpAddr::V4(ip), 8080)
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0usize; n];
        for &b in table {
            c[b as usize] += 1;
        }
        c
    }

    /// Fraction of slots whose backend (by name) differs between two tables of one size.
    fn moved(a: &[u32], a_names: &[String], b: &[u32], b_names: &[String]) -> f64 {
        assert_eq!(a.len(), b.len());
        let changed = a
            .iter()
            .zip(b)
            .filter(|(x, y)| a_names[**x as usize] != b_names[**y as usize])
            .count();
        changed as f64 / a.len() as f64
    }

    #[test]
    fn table_size_is_smallest_prime_at_least_100x() {
        assert_eq!(table_size(0), 0);
        assert_eq!(table_size(1), 101);
        assert_eq!(table_size(2), 211);
        assert_eq!(table_size(10), 1009);
        assert_eq!(table_size(100), 10007);
        for n in 1..=3000usize {
            let m = u64::from(table_size(n));
            let floor = (100 * n as u64).max(101);
            assert!(m >= floor, "n={n} m={m}");
            assert!(is_prime(m), "n={n} m={m}");
            assert!(
                (floor..m).all(|k| !is_prime(k)),
                "n={n}: a smaller prime exists"
            );
        }
    }

    #[test]
    fn primality_agrees_with_naive_division() {
        for n in 0..5000u64 {
            let naive = n >= 2 && (2..n).all(|d| n % d != 0);
            assert_eq!(is_prime(n), naive, "{n}");
        }
        assert!(is_prime(u64::from(LARGEST_U32_PRIME)));
    }

    #[test]
    fn empty_backends_or_size_give_empty_table() {
        let none: [&str; 0] = [];
        assert!(build_table(&none, 101).is_empty());
        assert!(build_table(&names(3), 0).is_empty());
    }

    #[test]
    fn every_slot_names_a_backend_and_shares_are_equal() {
        for n in [1usize, 3, 10, 100] {
            let b = names(n);
            let size = table_size(n);
            let t = build_table(&b, size);
            assert_eq!(t.len(), size as usize);
            assert!(
                t.iter().all(|&i| (i as usize) < n),
                "n={n}: slot without backend"
            );
            let c = counts(&t, n);
            let ideal = f64::from(size) / n as f64;
            for (i, &k) in c.iter().enumerate() {
                let dev = (k as f64 - ideal).abs() / ideal;
                assert!(dev < 0.03, "n={n} backend {i}: {k} slots, ideal {ideal:.1}");
            }
            // Round-robin filling: shares differ by at most one slot.
            let (min, max) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: min {min} max {max}");
        }
    }

    // Maglev does not promise minimal disruption: besides the removed backend's own
    // share, about 2% of the slots move on average (measured over many name sets: mean
    // 1-2.5%, worst cases near 6% for small N when two backends draw the same skip and
    // their permutations are shifts of each other). The bounds below are per change
    // 1/N + 7% and, averaged over every single change, 1/N + 3%.
    const WORST_EXTRA: f64 = 0.07;
    const MEAN_EXTRA: f64 = 0.03;

    #[test]
    fn removing_one_backend_moves_little_more_than_its_share() {
        for n in [5usize, 10, 50] {
            let all = names(n);
            let size = table_size(n);
            let before = build_table(&all, size);
            let share = 1.0 / n as f64;
            let mut sum = 0.0;
            for gone in 0..n {
                let mut rest = all.clone();
                rest.remove(gone);
                let after = build_table(&rest, size);
                let frac = moved(&before, &all, &after, &rest);
                assert!(
                    frac <= share + WORST_EXTRA,
                    "n={n} removing #{gone}: {:.2}% moved",
                    frac * 100.0
                );
                // At least the removed backend's own slots had to move.
                assert!(frac >= share - 0.01, "n={n}: {frac}");
                sum += frac;
            }
            let mean = sum / n as f64;
            assert!(
                mean <= share + MEAN_EXTRA,
                "n={n}: {:.2}% moved on average, share {:.2}%",
                mean * 100.0,
                share * 100.0
            );
        }
    }

    #[test]
    fn adding_one_backend_moves_little_more_than_its_share() {
        for n in [5usize, 10, 50] {
            let mut pool = names(n + 8);
            let extra = pool.split_off(n);
            let old = pool;
            // Same size for both: disruption is only small within one table size.
            let size = table_size(n + 1);
            let before = build_table(&old, size);
            let share = 1.0 / (n + 1) as f64;
            let mut sum = 0.0;
            for new in &extra {
                let mut all = old.clone();
                all.push(new.clone());
                all.sort();
                let after = build_table(&all, size);
                let frac = moved(&before, &old, &after, &all);
                assert!(
                    frac <= share + WORST_EXTRA,
                    "n={n} adding {new}: {:.2}% moved",
                    frac * 100.0
                );
                assert!(frac >= share - 0.01, "n={n}: {frac}");
                sum += frac;
            }
            let mean = sum / extra.len() as f64;
            assert!(
                mean <= share + MEAN_EXTRA,
                "n={n}: {:.2}% moved on average, share {:.2}%",
                mean * 100.0,
                share * 100.0
            );
        }
    }

    #[test]
    fn deterministic_and_pinned() {
        let b = names(7);
        let size = table_size(7);
        assert_eq!(build_table(&b, size), build_table(&b, size));
        // Pins the hash: a change here remaps every service's table on upgrade.
        let t = build_table(&b, size);
        assert_eq!(&t[..12], &[1, 0, 5, 2, 6, 1, 4, 1, 4, 3, 0, 4]);
    }

    #[test]
    fn non_prime_size_still_fills() {
        let b = names(4);
        for size in [1u32, 2, 4, 100, 1000] {
            let t = build_table(&b, size);
            assert_eq!(t.len(), size as usize);
            assert!(t.iter().all(|&i| i < 4));
        }
    }
}
