//! Counter-based randomness that needs no state and no memory, so a resumed run, another
//! rank layout or another batch size draws exactly the same numbers:
//! - [`EpochPermutation`]: a bijection of `0..n` keyed by (seed, epoch), a 4-round Feistel
//!   network with cycle walking; the data order of every training loop;
//! - [`SampleRng`]: one stream per (seed, epoch, position): each sample's flip, condition
//!   drop, diffusion step and noise, and the sampler's noise.

/// splitmix64's finaliser: a good 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A bijection of `0..n` keyed by (seed, epoch): 4-round Feistel with cycle walking.
#[derive(Clone, Debug)]
pub struct EpochPermutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl EpochPermutation {
    /// The permutation of `0..n` for `epoch`.
    pub fn new(n: u64, seed: u64, epoch: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let base = mix(seed ^ mix(epoch.wrapping_add(0x5851_F42D_4C95_7F2D)));
        let keys = [mix(base), mix(base ^ 1), mix(base ^ 2), mix(base ^ 3)];
        Self { n, half_bits, keys }
    }

    fn round(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = mix(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    /// Where position `i` (< n) goes.
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = self.round(i);
        while x >= self.n {
            x = self.round(x);
        }
        x
    }
}

/// A counter-based generator: one stream per (seed, epoch, position).
#[derive(Clone, Debug)]
pub struct SampleRng(u64);

impl SampleRng {
    /// The stream of one sample.
    pub fn new(seed: u64, epoch: u64, position: u64) -> Self {
        Self(mix(
            seed ^ mix(epoch ^ mix(position ^ 0xD1B5_4A32_D192_ED03))
        ))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `n` standard normals (Box–Muller).
    pub fn normals(&mut self, n: usize, out: &mut Vec<f32>) {
        while out.len() < n {
            let u1 = 1.0 - self.uniform();
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt();
            let th = 2.0 * std::f64::consts::PI * u2;
            out.push((r * th.cos()) as f32);
            if out.len() < n {
                out.push((r * th.sin()) as f32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection_for_many_sizes() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let p = EpochPermutation::new(n, 42, 3);
            let mut seen: Vec<u64> = (0..n).map(|i| p.apply(i)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
    }

    #[test]
    fn epochs_and_seeds_shuffle_differently() {
        let a: Vec<u64> = (0..100)
            .map(|i| EpochPermutation::new(100, 1, 0).apply(i))
            .collect();
        let b: Vec<u64> = (0..100)
            .map(|i| EpochPermutation::new(100, 1, 1).apply(i))
            .collect();
        let c: Vec<u64> = (0..100)
            .map(|i| EpochPermutation::new(100, 2, 0).apply(i))
            .collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a,
            (0..100)
                .map(|i| EpochPermutation::new(100, 1, 0).apply(i))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut rng = SampleRng::new(0, 0, 0);
        let mut z = Vec::new();
        rng.normals(100_000, &mut z);
        let mean = z.iter().map(|&x| x as f64).sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / z.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
