//! The Gaussian diffusion *process*: noise schedules, the forward process `q_sample`, the
//! training target and loss, and the reverse-process samplers (DDPM, DDIM) behind one trait.
//!
//! Formulas follow Ho et al. 2020 (DDPM, arXiv 2006.11239: eq. 4 for `q_sample`, eq. 6–7 for
//! the posterior, "simple" MSE loss of §3.4), Nichol & Dhariwal 2021 (arXiv 2102.09672, eq. 17:
//! the cosine schedule), Song et al. 2020 (DDIM, arXiv 2010.02502, eq. 12 with η) and
//! Salimans & Ho 2022 (arXiv 2202.00512, §4: v-prediction), written the way HF `diffusers`'
//! `DDPMScheduler` / `DDIMScheduler` compute them, op for op in float32, so that
//! `python/make_diffusion_fixture.py`'s fixtures match to 1e-6. Classifier-free guidance is
//! Ho & Salimans 2022 (arXiv 2207.12598, eq. 6).
//!
//! Nothing here knows the network: a sampler is handed the model's output for one step.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How the variances β_t grow over the diffusion steps.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// β linear from `beta_start` to `beta_end` (DDPM).
    Linear,
    /// ᾱ_t = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β capped at 0.999 (improved DDPM).
    #[default]
    Cosine,
}

/// What the network predicts. v is the default: on the embedded demo (tiny U-Net, 300
/// steps) ε-prediction still sampled pure noise where v already gave each condition's colours
/// and layout, and x̂₀ from v does not divide by √ᾱ_t near t = T.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    /// The noise ε that was added.
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀.
    #[default]
    V,
}

/// The diffusion process, from `[train.diffusion]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    /// `linear` or `cosine`.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Diffusion steps T of the forward process.
    #[serde(default = "default_timesteps")]
    pub timesteps: usize,
    /// First β of the linear schedule.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last β of the linear schedule.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `epsilon` or `v`.
    #[serde(default)]
    pub prediction: Prediction,
}

fn default_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    1e-4
}
fn default_beta_end() -> f64 {
    0.02
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            schedule: ScheduleKind::Cosine,
            timesteps: default_timesteps(),
            beta_start: default_beta_start(),
            beta_end: default_beta_end(),
            prediction: Prediction::V,
        }
    }
}

/// A diffusion process with its schedule precomputed (float32, on the CPU).
#[derive(Debug)]
pub struct GaussianDiffusion {
    config: DiffusionConfig,
    betas: Tensor,
    alphas_cumprod: Tensor,
    /// ᾱ_t as host floats, for per-step sampler scalars.
    abar: Vec<f32>,
}

impl Clone for GaussianDiffusion {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            betas: self.betas.shallow_clone(),
            alphas_cumprod: self.alphas_cumprod.shallow_clone(),
            abar: self.abar.clone(),
        }
    }
}

/// `x ** 0.5` the way diffusers computes it on a 0-dim float32 tensor (libtorch's `pow`,
/// which can differ from `f32::sqrt` in the last bit; x̂₀ at t ≈ T amplifies that bit).
fn pow_half(x: f32) -> f32 {
    f32::try_from(Tensor::from(x).pow_tensor_scalar(0.5)).unwrap_or(x.sqrt())
}

/// `diffusers`' `betas_for_alpha_bar` with the cosine ᾱ: computed in f64, stored as f32.
fn cosine_betas(steps: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..steps)
        .map(|i| {
            let (t1, t2) = (i as f64 / steps as f64, (i + 1) as f64 / steps as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

impl GaussianDiffusion {
    /// Builds the schedule; `Err` names the bad key.
    pub fn new(config: &DiffusionConfig) -> crate::Result<Self> {
        let t = config.timesteps;
        if t < 2 {
            return Err(crate::TrainerError::config(
                "train.diffusion.timesteps",
                format!("{t} is too few; 1000 is usual"),
            ));
        }
        let betas = match config.schedule {
            ScheduleKind::Linear => {
                if !(0.0 < config.beta_start
                    && config.beta_start < config.beta_end
                    && config.beta_end < 1.0)
                {
                    return Err(crate::TrainerError::config(
                        "train.diffusion.beta_start",
                        format!(
                            "need 0 < beta_start < beta_end < 1, got {} and {}",
                            config.beta_start, config.beta_end
                        ),
                    ));
                }
                Tensor::linspace(
                    config.beta_start,
                    config.beta_end,
                    t as i64,
                    (Kind::Float, Device::Cpu),
                )
            }
            ScheduleKind::Cosine => Tensor::from_slice(&cosine_betas(t)),
        };
        let alphas = betas.ones_like() - &betas;
        let alphas_cumprod = alphas.cumprod(0, Kind::Float);
        let abar = Vec::<f32>::try_from(&alphas_cumprod)?;
        Ok(Self {
            config: config.clone(),
            betas,
            alphas_cumprod,
            abar,
        })
    }

    /// The config it was built from.
    pub fn config(&self) -> &DiffusionConfig {
        &self.config
    }

    /// Diffusion steps T.
    pub fn timesteps(&self) -> usize {
        self.config.timesteps
    }

    /// β_t, `[T]`.
    pub fn betas(&self) -> &Tensor {
        &self.betas
    }

    /// ᾱ_t = Π α_s, `[T]`.
    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// ᾱ_t for one step; ᾱ = 1 before the first step.
    fn abar_at(&self, t: i64) -> f32 {
        if t < 0 {
            1.0
        } else {
            self.abar[t as usize]
        }
    }

    /// √ᾱ_t and √(1−ᾱ_t) gathered for a batch of steps, shaped to broadcast over `like`.
    fn coefficients(&self, t: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let abar = self
            .alphas_cumprod
            .to_device(like.device())
            .index_select(0, &t.to_device(like.device()));
        let mut shape = vec![-1i64];
        shape.resize(like.dim(), 1);
        let sqrt_a = abar.pow_tensor_scalar(0.5).view(shape.as_slice());
        let sqrt_1ma = (abar.ones_like() - &abar)
            .pow_tensor_scalar(0.5)
            .view(shape.as_slice());
        (sqrt_a.to_kind(like.kind()), sqrt_1ma.to_kind(like.kind()))
    }

    /// Forward process (DDPM eq. 4): x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, for per-sample steps `t`.
    pub fn q_sample(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        let (a, b) = self.coefficients(t, x0);
        a * x0 + b * noise
    }

    /// The velocity v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (Salimans & Ho §4).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        let (a, b) = self.coefficients(t, x0);
        a * noise - b * x0
    }

    /// What the network is trained to output for this `x0`, `noise` and `t`.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        match self.config.prediction {
            Prediction::Epsilon => noise.shallow_clone(),
            Prediction::V => self.velocity(x0, noise, t),
        }
    }

    /// The "simple" loss (DDPM §3.4) per sample: mean squared error between output and
    /// target over each image, `[B]` (the caller weights and averages them).
    pub fn losses(&self, model_output: &Tensor, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        let target = self.target(x0, noise, t).to_kind(Kind::Float);
        let dims: Vec<i64> = (1..model_output.dim() as i64).collect();
        (model_output.to_kind(Kind::Float) - target)
            .square()
            .mean_dim(dims.as_slice(), false, Kind::Float)
    }

    /// Variance of q(x_{t−1} | x_t, x₀) (DDPM eq. 7, "fixed small"), going from `t` to `prev`.
    pub fn posterior_variance(&self, t: usize, prev: i64) -> f32 {
        let (a_t, a_prev) = (self.abar_at(t as i64), self.abar_at(prev));
        let beta_t = 1.0 - a_t / a_prev;
        ((1.0 - a_prev) / (1.0 - a_t) * beta_t).max(1e-20)
    }

    /// x̂₀ and ε̂ from the model output at step `t` (float32 scalars, as diffusers does).
    fn predictions(&self, model_output: &Tensor, t: usize, sample: &Tensor) -> (Tensor, Tensor) {
        let a = self.abar_at(t as i64);
        let b = 1.0 - a;
        let (sa, sb) = (pow_half(a) as f64, pow_half(b) as f64);
        match self.config.prediction {
            Prediction::Epsilon => (
                (sample - model_output * sb) / sa,
                model_output.shallow_clone(),
            ),
            Prediction::V => (
                sample * sa - model_output * sb,
                model_output * sa + sample * sb,
            ),
        }
    }
}

/// One reverse step's result.
#[derive(Debug)]
pub struct StepOutput {
    /// x_{t−1}.
    pub prev_sample: Tensor,
    /// The model's estimate of x₀ at this step.
    pub pred_original: Tensor,
}

/// A reverse-process sampler: which steps it visits and how it takes one.
pub trait Sampler {
    /// The steps visited, from noisiest to cleanest.
    fn timesteps(&self) -> &[usize];
    /// From x_t to x_{t−1} (or the next visited step) given the model output at `t`. `noise`
    /// is a standard normal tensor shaped like `sample` (ignored by deterministic steps).
    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: &Tensor) -> StepOutput;
    /// Whether `step` at `t` reads `noise`.
    fn uses_noise(&self, t: usize) -> bool;
}

/// Which sampler `sample` and the training-time grids use.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// Ancestral DDPM sampling (stochastic).
    Ddpm,
    /// DDIM (deterministic at η = 0).
    #[default]
    Ddim,
}

/// Reverse-process settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    /// `ddim` or `ddpm`.
    #[serde(default)]
    pub kind: SamplerKind,
    /// Steps visited (≤ T; evenly spaced, "leading" as in diffusers).
    #[serde(default = "default_sampling_steps")]
    pub steps: usize,
    /// DDIM's η (0: deterministic; 1: DDPM-like noise).
    #[serde(default)]
    pub eta: f64,
    /// Clip x̂₀ to [−1, 1] at every step.
    #[serde(default = "yes")]
    pub clip_denoised: bool,
    /// DDIM with `clip_denoised`: derive ε again from the clipped x̂₀ (GLIDE and
    /// guided-diffusion do; diffusers' `use_clipped_model_output`). Off, a guided step keeps
    /// the unclipped ε and a briefly trained model's samples stay noisy: on the demo model
    /// at guidance 3 the judge's on-prompt share was 56% off and 94% on.
    #[serde(default = "yes")]
    pub eps_from_clipped: bool,
}

fn default_sampling_steps() -> usize {
    50
}
fn yes() -> bool {
    true
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            kind: SamplerKind::Ddim,
            steps: default_sampling_steps(),
            eta: 0.0,
            clip_denoised: true,
            eps_from_clipped: true,
        }
    }
}

impl SamplerConfig {
    /// Builds the sampler over `diffusion`; `key` prefixes the config keys in errors.
    pub fn build(
        &self,
        diffusion: &GaussianDiffusion,
        key: &str,
    ) -> crate::Result<Box<dyn Sampler>> {
        let t = diffusion.timesteps();
        if self.steps == 0 || self.steps > t {
            return Err(crate::TrainerError::config(
                &format!("{key}.steps"),
                format!(
                    "{} is not in 1..={t} (the diffusion's timesteps)",
                    self.steps
                ),
            ));
        }
        let timesteps = leading_timesteps(t, self.steps);
        Ok(match self.kind {
            SamplerKind::Ddpm => Box::new(Ddpm {
                diffusion: diffusion.clone(),
                timesteps,
                clip: self.clip_denoised,
            }),
            SamplerKind::Ddim => Box::new(Ddim {
                diffusion: diffusion.clone(),
                step_ratio: t / self.steps,
                timesteps,
                eta: self.eta,
                clip: self.clip_denoised,
                eps_from_clipped: self.eps_from_clipped,
            }),
        })
    }
}

/// diffusers' "leading" spacing: `(0..n)·(T / n)`, noisiest first.
pub fn leading_timesteps(t: usize, n: usize) -> Vec<usize> {
    let ratio = t / n;
    (0..n).rev().map(|i| i * ratio).collect()
}

/// Ancestral sampling (DDPM eq. 6–7, `diffusers.DDPMScheduler`, fixed-small variance).
pub struct Ddpm {
    diffusion: GaussianDiffusion,
    timesteps: Vec<usize>,
    clip: bool,
}

impl Ddpm {
    /// DDPM visiting every one of the diffusion's steps.
    pub fn full(diffusion: &GaussianDiffusion, clip: bool) -> Self {
        Self {
            diffusion: diffusion.clone(),
            timesteps: leading_timesteps(diffusion.timesteps(), diffusion.timesteps()),
            clip,
        }
    }

    fn prev(&self, t: usize) -> i64 {
        let n = self.timesteps.len();
        t as i64 - (self.diffusion.timesteps() / n) as i64
    }
}

impl Sampler for Ddpm {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: &Tensor) -> StepOutput {
        let d = &self.diffusion;
        let prev = self.prev(t);
        let (a_t, a_prev) = (d.abar_at(t as i64), d.abar_at(prev));
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let (mut x0, _) = d.predictions(model_output, t, sample);
        if self.clip {
            x0 = x0.clamp(-1.0, 1.0);
        }
        let c0 = (pow_half(a_prev) * cur_beta) / b_t;
        let ct = pow_half(cur_alpha) * b_prev / b_t;
        let mut prev_sample = &x0 * c0 as f64 + sample * ct as f64;
        if t > 0 {
            let std = pow_half(d.posterior_variance(t, prev));
            prev_sample += noise * std as f64;
        }
        StepOutput {
            prev_sample,
            pred_original: x0,
        }
    }

    fn uses_noise(&self, t: usize) -> bool {
        t > 0
    }
}

/// DDIM (Song et al. eq. 12, `diffusers.DDIMScheduler` with `set_alpha_to_one`).
pub struct Ddim {
    diffusion: GaussianDiffusion,
    timesteps: Vec<usize>,
    step_ratio: usize,
    eta: f64,
    clip: bool,
    eps_from_clipped: bool,
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn step(&self, model_output: &Tensor, t: usize, sample: &Tensor, noise: &Tensor) -> StepOutput {
        let d = &self.diffusion;
        let prev = t as i64 - self.step_ratio as i64;
        let (a_t, a_prev) = (d.abar_at(t as i64), d.abar_at(prev));
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let (mut x0, mut eps) = d.predictions(model_output, t, sample);
        if self.clip {
            x0 = x0.clamp(-1.0, 1.0);
            if self.eps_from_clipped {
                eps = (sample - &x0 * (pow_half(a_t) as f64)) / (pow_half(b_t) as f64);
            }
        }
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std = self.eta as f32 * pow_half(variance);
        let direction = eps * pow_half(1.0 - a_prev - std * std) as f64;
        let mut prev_sample = &x0 * (pow_half(a_prev) as f64) + direction;
        if self.eta > 0.0 {
            prev_sample += noise * std as f64;
        }
        StepOutput {
            prev_sample,
            pred_original: x0,
        }
    }

    fn uses_noise(&self, _t: usize) -> bool {
        self.eta > 0.0
    }
}

/// Classifier-free guidance (Ho & Salimans eq. 6): uncond + s·(cond − uncond).
pub fn guide(cond: &Tensor, uncond: &Tensor, scale: f64) -> Tensor {
    uncond + (cond - uncond) * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_spacing_matches_diffusers() {
        assert_eq!(leading_timesteps(1000, 4), vec![750, 500, 250, 0]);
        assert_eq!(leading_timesteps(10, 10), (0..10).rev().collect::<Vec<_>>());
    }

    #[test]
    fn schedules_are_monotone_and_bounded() {
        for schedule in [ScheduleKind::Linear, ScheduleKind::Cosine] {
            let d = GaussianDiffusion::new(&DiffusionConfig {
                schedule,
                ..Default::default()
            })
            .unwrap();
            let a = Vec::<f32>::try_from(d.alphas_cumprod()).unwrap();
            assert!(a.windows(2).all(|w| w[1] < w[0]), "{schedule:?}");
            assert!(a[0] < 1.0 && *a.last().unwrap() > 0.0);
        }
    }

    #[test]
    fn v_and_epsilon_give_the_same_x0() {
        let d = GaussianDiffusion::new(&DiffusionConfig {
            prediction: Prediction::Epsilon,
            ..Default::default()
        })
        .unwrap();
        let x0 = Tensor::rand([2, 3, 4, 4], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let eps = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[300i64, 300]);
        let xt = d.q_sample(&x0, &eps, &t);
        let (x0_eps, _) = d.predictions(&eps, 300, &xt);
        let v = d.velocity(&x0, &eps, &t);
        let dv = GaussianDiffusion::new(&DiffusionConfig {
            prediction: Prediction::V,
            ..Default::default()
        })
        .unwrap();
        let (x0_v, eps_v) = dv.predictions(&v, 300, &xt);
        assert!(f64::try_from((&x0_eps - &x0).abs().max()).unwrap() < 1e-4);
        assert!(f64::try_from((&x0_v - &x0).abs().max()).unwrap() < 1e-4);
        assert!(f64::try_from((&eps_v - &eps).abs().max()).unwrap() < 1e-4);
    }
}
