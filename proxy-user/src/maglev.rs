//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016): a lookup table of `M` (prime) entries filled round-robin from each
//! backend's own permutation of the table. Every backend gets `M/N` entries (±1), and when the
//! backend set changes, entries of backends that stay mostly keep their backend, so a flow hashed
//! into the table lands on the same backend on every node and after state loss.

/// Entries in a service's Maglev table (prime). The kernel side uses the same constant.
pub const TABLE_SIZE: u32 = weft_proxy_common::MAGLEV_TABLE_SIZE;

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The lookup table for `names` (one stable name per backend, e.g. `addr:port`): entry `i` holds
/// the index of the backend in `names`. Empty when there are no backends.
pub fn table(names: &[String], m: u32) -> Vec<u32> {
    let n = names.len();
    if n == 0 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    let perm: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = fnv1a(0xcbf2_9ce4_8422_2325, name.as_bytes()) % m64;
            let skip = fnv1a(0x8422_2325_cbf2_9ce4, name.as_bytes()) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry: Vec<Option<u32>> = vec![None; m as usize];
    let mut filled = 0;
    loop {
        for i in 0..n {
            let (offset, skip) = perm[i];
            let mut c = (offset + next[i] * skip) % m64;
            while entry[c as usize].is_some() {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            entry[c as usize] = Some(i as u32);
            next[i] += 1;
            filled += 1;
            if filled == m as usize {
                return entry
                    .into_iter()
                    .map(|e| e.expect("every entry is filled"))
                    .collect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.244.0.{}:8080", i + 2)).collect()
    }

    #[test]
    fn every_backend_gets_its_share() {
        for n in [1, 2, 3, 7, 10] {
            let t = table(&names(n), TABLE_SIZE);
            assert_eq!(t.len(), TABLE_SIZE as usize);
            let mut counts = vec![0usize; n];
            for &i in &t {
                counts[i as usize] += 1;
            }
            let share = TABLE_SIZE as usize / n;
            assert!(
                counts.iter().all(|c| c.abs_diff(share) <= 1),
                "n={n}: {counts:?}"
            );
        }
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        let before_names = names(5);
        let before = table(&before_names, TABLE_SIZE);
        let mut after_names = before_names.clone();
        let gone = after_names.remove(2);
        let after = table(&after_names, TABLE_SIZE);
        let name = |names: &[String], i: u32| names[i as usize].clone();
        let mut moved_needlessly = 0;
        for (b, a) in before.iter().zip(&after) {
            let (was, is) = (name(&before_names, *b), name(&after_names, *a));
            if was != gone && was != is {
                moved_needlessly += 1;
            }
        }
        // The paper's bound is small; require under 3 % of the table.
        assert!(
            moved_needlessly < TABLE_SIZE as usize * 3 / 100,
            "{moved_needlessly} entries moved"
        );
    }

    #[test]
    fn tables_do_not_depend_on_order_of_computation() {
        assert_eq!(table(&names(4), TABLE_SIZE), table(&names(4), TABLE_SIZE));
        assert!(table(&[], TABLE_SIZE).is_empty());
    }
}
