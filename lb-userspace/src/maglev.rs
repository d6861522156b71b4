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

/// Table size for `n_endpoints` backends: the smallest rung of the ladder of table sizes
/// that is `>= MAGLEV_MULTIPLIER * n` (see [`ladder`]), 1 for a single backend, or 0 for
/// no backends (a zero size is how SERVICES says "no endpoints, refuse new flows").
///
/// One slot for one backend: every flow goes to it whatever the size, and a change to or
/// from one backend moves only the flows that must move (to the added backend, or off the
/// removed one) even though the size changes, since every old slot named the same backend.
/// Single-endpoint service ports are common; at 101 slots each, 100,000 of them took 81 MB
/// of MAGLEV and most of a full sync.
///
/// Why a ladder of about doubling primes and 20 slots per backend (Cilium's default is
/// one fixed size, 16,381, for up to ~160 backends; Katran's 65,537 for any count):
/// - Balance: Maglev fills the table round-robin, so shares differ by at most one slot;
///   with at least 20 slots per backend the busiest backend gets at most 21/20 of the
///   quietest one's new flows (`balance_is_within_5_percent_up_to_1000_endpoints`).
/// - Minimal disruption: Maglev moves little more than one backend's share only between
///   tables of the same size. Every `N` of a rung (e.g. 11..=21 endpoints on 431 slots)
///   shares one size, so scaling a Deployment by one pod, or replacing one, moves about
///   `1/N` of the slots (`one_endpoint_more_or_less_within_a_rung_moves_about_its_share`);
///   with a size derived from `N` itself every change would remap nearly every slot,
///   which sends new flows elsewhere and, wherever CT entries were lost (agent restarted
///   on new maps, LRU eviction, a flow arriving through another node), live ones too.
/// - Memory and sync time: 20 to ~42 slots per backend instead of 100 to 110 (10,000
///   service ports x 10 endpoints: 2.1 M slots, 17 MB of MAGLEV, instead of 10.1 M).
pub fn table_size(n_endpoints: usize) -> u32 {
    match n_endpoints {
        0 => return 0,
        1 => return 1,
        _ => {}
    }
    let want = (n_endpoints as u64).saturating_mul(u64::from(MAGLEV_MULTIPLIER));
    ladder()
        .find(|&m| u64::from(m) >= want)
        .unwrap_or(LARGEST_U32_PRIME)
}

/// The table sizes [`table_size`] picks from: `MAGLEV_MIN_SIZE` (101), then each rung the
/// smallest prime `>= 2 x` the previous one (101, 211, 431, 863, 1,733, 3,467, ...), and
/// last the largest prime below 2^32. Computed once (26 rungs).
pub fn ladder() -> impl Iterator<Item = u32> {
    static RUNGS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    RUNGS
        .get_or_init(|| {
            let top = u64::from(LARGEST_U32_PRIME);
            let mut rungs = vec![MAGLEV_MIN_SIZE];
            let mut cur = u64::from(MAGLEV_MIN_SIZE);
            while cur < top {
                let mut m = cur.saturating_mul(2);
                if m >= top {
                    m = top;
                } else {
                    while !is_prime(m) {
                        m += 1;
                    }
                }
                // m <= top < 2^32.
                rungs.push(m as u32);
                cur = m;
            }
            rungs
        })
        .iter()
        .copied()
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
            // `p, s < m`: one conditional subtraction instead of a 64-bit division, which
            // made up most of the fill time (the walk probes each slot several times).
            while table[*p as usize] != BACKEND_NONE {
                *p += s;
                if *p >= m {
                    *p -= m;
                }
            }
            table[*p as usize] = i as u32;
            *p += s;
            if *p >= m {
                *p -= m;
            }
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
    fn table_size_is_the_smallest_rung_of_at_least_20x() {
        let rungs: Vec<u32> = ladder().collect();
        assert_eq!(
            &rungs[..8],
            &[101, 211, 431, 863, 1_733, 3_467, 6_947, 13_901]
        );
        assert_eq!(rungs.last(), Some(&LARGEST_U32_PRIME));
        for w in rungs.windows(2) {
            assert!(is_prime(u64::from(w[0])), "{}", w[0]);
            assert!(w[1] > w[0], "ladder not increasing at {}", w[0]);
        }
        assert_eq!(table_size(0), 0);
        assert_eq!(table_size(1), 1);
        assert_eq!(table_size(2), 101);
        assert_eq!(table_size(5), 101);
        assert_eq!(table_size(6), 211);
        assert_eq!(table_size(10), 211);
        assert_eq!(table_size(11), 431);
        assert_eq!(table_size(100), 3_467);
        assert_eq!(table_size(usize::MAX), LARGEST_U32_PRIME);
        let mut prev = 0;
        for n in 2..=100_000usize {
            let m = table_size(n);
            assert!(m >= prev, "n={n}: sizes not monotone");
            assert!(u64::from(m) >= 20 * n as u64, "n={n} m={m}");
            // The smallest rung: the one below is too small.
            if let Some(below) = rungs.iter().take_while(|&&r| r < m).last() {
                assert!(u64::from(*below) < 20 * n as u64, "n={n}: {below} would do");
            }
            prev = m;
        }
    }

    #[test]
    fn balance_is_within_5_percent_up_to_1000_endpoints() {
        // Round-robin fill: shares differ by at most one slot, and every backend has at
        // least 20, so max/min <= 21/20. Built for every N up to 64 and a spread above
        // (each table is up to 42 k slots; building all 1,000 takes too long unoptimised).
        let mut worst: f64 = 1.0;
        let all = names(1_000);
        for n in (2..=64usize).chain((65..=1_000).step_by(37)).chain([1_000]) {
            let size = table_size(n);
            let t = build_table(&all[..n], size);
            let c = counts(&t, n);
            let (min, max) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(*min >= 20, "n={n}: a backend has only {min} slots");
            assert!(max - min <= 1, "n={n}: min {min} max {max}");
            let ratio = *max as f64 / *min as f64;
            assert!(ratio <= 1.05, "n={n}: max/min {ratio:.3}");
            worst = worst.max(ratio);
        }
        eprintln!("worst max/min slots per backend: {worst:.3}");
    }

    /// Slots moved beyond the moved backend's own share (1/N) by every single removal of
    /// one of `n` backends and by 6 single additions, for one name set (the backends'
    /// port): (mean, worst).
    fn churn_at(n: usize, size: u32, port: u16) -> (f64, f64) {
        let pool: Vec<String> = (0..n + 6)
            .map(|i| {
                let ip = Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250) as u8 + 1);
                backend_name(IpAddr::V4(ip), port)
            })
            .collect();
        let base = pool[..n].to_vec();
        let before = build_table(&base, size);
        let (mut sum, mut worst, mut k) = (0.0, 0.0f64, 0);
        let mut count = |frac: f64, share: f64| {
            // At least the moved backend's own slots had to move.
            assert!(frac >= share - 0.01, "n={n}: {frac} < {share}");
            sum += frac - share;
            worst = worst.max(frac - share);
            k += 1;
        };
        for gone in 0..n {
            let mut rest = base.clone();
            rest.remove(gone);
            count(
                moved(&before, &base, &build_table(&rest, size), &rest),
                1.0 / n as f64,
            );
        }
        for new in &pool[n..] {
            let mut all = base.clone();
            all.push(new.clone());
            all.sort();
            count(
                moved(&before, &base, &build_table(&all, size), &all),
                1.0 / (n + 1) as f64,
            );
        }
        (sum / f64::from(k), worst)
    }

    // Maglev does not promise minimal disruption, and fewer slots per backend disrupt
    // more. Slots moved beyond 1/N, mean / worst over 20 name sets (release build):
    //
    //   slots per backend   ~13        ~20-27        ~43-54       ~86-116      ~173-232
    //   n=5                  -          5.0%/11.7%    -            2.6%/9.0%    1.6%/3.4%
    //   n=10                 -          6.6%/18.4%    4.0%/6.9%    2.8%/6.1%    2.0%/5.4%
    //   n=16                 8.0%/16.4% 5.4%/8.8%     3.8%/8.8%    2.4%/3.7%    1.6%/2.8%
    //   n=64                 4.7%/8.4%  4.1%/5.8%     2.7%/3.8%    1.9%/2.5%    1.3%/2.0%
    //
    // The ladder's 20-42 slots per backend cost about 2-4 points more than 100 x N did
    // within one size; but 100 x N changed the size, and so remapped almost every slot,
    // each time an endpoint was added. The bounds hold for the ladder's rungs with margin
    // for the name sets sampled here.
    const MEAN_EXTRA: f64 = 0.08;
    const WORST_EXTRA: f64 = 0.20;

    #[test]
    fn one_backend_has_one_slot_and_growing_from_it_moves_only_the_new_share() {
        let b = names(3);
        assert_eq!(build_table(&b[..1], table_size(1)), vec![0]);
        // Flows are spread over a table by hash % size: what a flow meets before and
        // after, for hashes 0..100,000.
        let owner = |t: &[u32], names: &[String], h: u64| -> String {
            names[t[(h % t.len() as u64) as usize] as usize].clone()
        };
        let one = build_table(&b[..1], table_size(1));
        let two = build_table(&b[..2], table_size(2));
        let hashes = 0..100_000u64;
        let moved = hashes
            .clone()
            .filter(|&h| owner(&one, &b[..1], h) != owner(&two, &b[..2], h))
            .count();
        let to_new = hashes
            .clone()
            .filter(|&h| owner(&two, &b[..2], h) == b[1])
            .count();
        // 1 -> 2: exactly the flows the new backend takes over move.
        assert_eq!(moved, to_new);
        // 2 -> 1 (the second one leaves): exactly its flows move.
        let back = hashes
            .filter(|&h| owner(&two, &b[..2], h) != owner(&one, &b[..1], h))
            .count();
        assert_eq!(back, to_new);
    }

    #[test]
    fn one_endpoint_more_or_less_within_a_rung_moves_about_its_share() {
        for n in [3usize, 8, 16, 32, 64, 150, 300] {
            // A size that holds both n - 1 and n + 1: the change stays within a rung.
            let size = table_size(n + 1);
            assert_eq!(
                size,
                table_size(n - 1),
                "n={n}: n-1 and n+1 on different rungs"
            );
            let (mut mean, mut worst) = (0.0, 0.0f64);
            const SETS: u16 = 4;
            for port in 8080..8080 + SETS {
                let (m, w) = churn_at(n, size, port);
                mean += m / f64::from(SETS);
                worst = worst.max(w);
            }
            eprintln!(
                "n={n} on {size} slots: {:.2}% moved beyond 1/N on average, {:.2}% at worst",
                mean * 100.0,
                worst * 100.0
            );
            assert!(mean <= MEAN_EXTRA, "n={n}: mean extra {mean}");
            assert!(worst <= WORST_EXTRA, "n={n}: worst extra {worst}");
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
                // At >= 20 slots per backend one slot more is < 5%.
                assert!(dev < 0.05, "n={n} backend {i}: {k} slots, ideal {ideal:.1}");
            }
            // Round-robin filling: shares differ by at most one slot.
            let (min, max) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(max - min <= 1, "n={n}: min {min} max {max}");
        }
    }

    #[test]
    fn deterministic_and_pinned() {
        let b = names(7);
        let size = table_size(7);
        assert_eq!(build_table(&b, size), build_table(&b, size));
        // Pins the hash: a change here remaps every service's table on upgrade.
        let t = build_table(&b, size);
        assert_eq!(&t[..12], &[1, 6, 0, 1, 1, 0, 5, 0, 6, 4, 6, 3]);
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
