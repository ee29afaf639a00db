//! The optimiser side of the loop: AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101,
//! Algorithm 2, as `torch.optim.AdamW` computes it), linear warm-up then cosine decay of the
//! learning rate, gradient clipping by global norm, and an exponential moving average of
//! the weights. State is plain named tensors so checkpoints hold it in safetensors.

use crate::checkpoint::copy_named;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// `[train.optim]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Adam β₁.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Adam β₂.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adam ε.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    #[serde(default = "default_warmup")]
    pub warmup_steps: u64,
    /// Learning rate at the last step, as a fraction of `lr` (cosine decay after warm-up).
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// EMA decay of the weights (0: no EMA).
    #[serde(default = "default_ema")]
    pub ema_decay: f64,
}

fn default_lr() -> f64 {
    1e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_warmup() -> u64 {
    500
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_clip() -> f64 {
    1.0
}
fn default_ema() -> f64 {
    0.9999
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: 0.0,
            warmup_steps: default_warmup(),
            min_lr_ratio: default_min_lr_ratio(),
            grad_clip: default_clip(),
            ema_decay: default_ema(),
        }
    }
}

impl OptimConfig {
    /// Checks ranges; errors name the key.
    pub fn validate(&self) -> crate::Result<()> {
        let bad =
            |k: &str, r: &str| Err(crate::TrainerError::config(&format!("train.optim.{k}"), r));
        if self.lr.is_nan() || self.lr <= 0.0 {
            return bad("lr", "must be > 0");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1", "beta1 and beta2 must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", "must be in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad("ema_decay", "must be in [0, 1) (0 turns the EMA off)");
        }
        if self.grad_clip < 0.0 {
            return bad("grad_clip", "must be >= 0 (0 turns clipping off)");
        }
        Ok(())
    }

    /// Learning rate for optimiser step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// AdamW over a fixed list of named parameters.
#[derive(Debug)]
pub struct AdamW {
    names: Vec<String>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Whether each parameter takes weight decay.
    decays: Vec<bool>,
    steps: u64,
}

impl AdamW {
    /// Zero state for these parameters.
    pub fn new(params: &[(String, Tensor)]) -> Self {
        Self {
            names: params.iter().map(|p| p.0.clone()).collect(),
            exp_avg: params.iter().map(|p| p.1.zeros_like()).collect(),
            exp_avg_sq: params.iter().map(|p| p.1.zeros_like()).collect(),
            decays: vec![true; params.len()],
            steps: 0,
        }
    }

    /// Weight decay only for the parameters `decays` accepts (CLIP decays its weight
    /// matrices, not its gains, biases, embeddings or temperature).
    pub fn decay_only(
        mut self,
        params: &[(String, Tensor)],
        decays: impl Fn(&str, &Tensor) -> bool,
    ) -> Self {
        self.decays = params.iter().map(|(n, t)| decays(n, t)).collect();
        self
    }

    /// One update with learning rate `lr` (`torch.optim.AdamW`, non-amsgrad).
    pub fn step(&mut self, params: &[(String, Tensor)], cfg: &OptimConfig, lr: f64) {
        self.steps += 1;
        let bc1 = 1.0 - cfg.beta1.powi(self.steps as i32);
        let bc2 = 1.0 - cfg.beta2.powi(self.steps as i32);
        tch::no_grad(|| {
            for (i, (_, p)) in params.iter().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if cfg.weight_decay > 0.0 && self.decays[i] {
                    let _ = p.g_mul_scalar_(1.0 - lr * cfg.weight_decay);
                }
                let m = &mut self.exp_avg[i];
                let _ = m.lerp_(&g, 1.0 - cfg.beta1);
                let v = &mut self.exp_avg_sq[i];
                let _ = v.g_mul_scalar_(cfg.beta2);
                let _ = v.addcmul_(&g, &g.g_mul_scalar(1.0 - cfg.beta2));
                let denom = (v.sqrt() / bc2.sqrt()).g_add_scalar(cfg.eps);
                let _ = p.addcdiv_(&(&*m * (-lr / bc1)), &denom);
            }
        });
    }

    /// Optimiser steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// State as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`, `step`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.names.len() + 1);
        for (i, n) in self.names.iter().enumerate() {
            out.push((format!("exp_avg.{n}"), self.exp_avg[i].shallow_clone()));
            out.push((
                format!("exp_avg_sq.{n}"),
                self.exp_avg_sq[i].shallow_clone(),
            ));
        }
        out.push(("step".into(), Tensor::from_slice(&[self.steps as i64])));
        out
    }

    /// Restores [`AdamW::state`] from the file at `location`; a missing or mis-shaped entry
    /// is named.
    pub fn load_state(&mut self, state: &[(String, Tensor)], location: &str) -> crate::Result<()> {
        let moments: Vec<(String, Tensor)> = self
            .state()
            .into_iter()
            .filter(|(n, _)| n != "step")
            .collect();
        copy_named(&moments, state, location)?;
        let step = state.iter().find(|(n, _)| n == "step").ok_or_else(|| {
            crate::TrainerError::Checkpoint {
                location: location.to_string(),
                reason: "lacks `step`".into(),
            }
        })?;
        self.steps = i64::try_from(&step.1)? as u64;
        Ok(())
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.1.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).norm().unsqueeze(0))
            .collect();
        let total = f64::try_from(Tensor::cat(&norms, 0).norm()).unwrap_or(f64::NAN);
        if max_norm > 0.0 && total > max_norm {
            let scale = max_norm / (total + 1e-6);
            for mut g in grads {
                let _ = g.g_mul_scalar_(scale);
            }
        }
        total
    })
}

/// Exponential moving average of the weights, with the usual warm-up of the decay
/// (`min(decay, (1+n)/(10+n))`) so early averages are not dominated by the initialisation.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// A copy of `params` to average into.
    pub fn new(params: &[(String, Tensor)], decay: f64) -> Self {
        let shadow = tch::no_grad(|| {
            params
                .iter()
                .map(|(n, p)| (n.clone(), p.detach().copy()))
                .collect()
        });
        Self { decay, shadow }
    }

    /// Updates the average after optimiser step `step` (1-based).
    pub fn update(&mut self, params: &[(String, Tensor)], step: u64) {
        let d = self.decay.min((1 + step) as f64 / (10 + step) as f64);
        tch::no_grad(|| {
            for ((_, s), (_, p)) in self.shadow.iter_mut().zip(params) {
                let _ = s.lerp_(p, 1.0 - d);
            }
        });
    }

    /// The averaged weights.
    pub fn weights(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    /// Overwrites the averaged weights from the file at `location` (resume).
    pub fn load(&mut self, weights: &[(String, Tensor)], location: &str) -> crate::Result<()> {
        copy_named(&self.shadow, weights, location)
    }
}

/// Everything that updates the weights after backward: AdamW, the EMA and, for f16, the loss
/// scaler. The training loops hold one and call [`Optimiser::step`] once per optimiser step.
#[derive(Debug)]
pub struct Optimiser {
    /// AdamW and its moments.
    pub adamw: AdamW,
    /// The EMA of the weights.
    pub ema: Ema,
    /// Dynamic loss scaling (f16 autocast only).
    pub scaler: Option<LossScaler>,
    /// Steps skipped because f16 gradients overflowed.
    pub skipped_steps: u64,
}

impl Optimiser {
    /// Fresh state for `params` (`loss_scaling` for f16 autocast).
    pub fn new(params: &[(String, Tensor)], cfg: &OptimConfig, loss_scaling: bool) -> Self {
        Self {
            adamw: AdamW::new(params),
            ema: Ema::new(params, cfg.ema_decay),
            scaler: loss_scaling.then(LossScaler::default),
            skipped_steps: 0,
        }
    }

    /// What each micro-batch's loss is multiplied by before backward (the loss scale, 1
    /// without f16), divided by the micro-batches per step.
    pub fn loss_factor(&self, micro_batches: usize) -> f64 {
        self.scaler.as_ref().map_or(1.0, LossScaler::scale) / micro_batches as f64
    }

    /// After backward: unscale (f16), clip, AdamW, EMA for optimiser step `step` (0-based).
    /// Returns the gradient norm before clipping and whether the step was taken (false: f16
    /// overflow, step skipped and counted).
    pub fn step(
        &mut self,
        params: &[(String, Tensor)],
        cfg: &OptimConfig,
        lr: f64,
        step: u64,
    ) -> (f64, bool) {
        let finite = self.scaler.as_mut().is_none_or(|s| s.unscale(params));
        let grad_norm = clip_grad_norm(params, cfg.grad_clip);
        if finite {
            self.adamw.step(params, cfg, lr);
            self.ema.update(params, step + 1);
        } else {
            self.skipped_steps += 1;
            tracing::warn!(
                step,
                "f16 gradients overflowed: step skipped, loss scale halved"
            );
        }
        (grad_norm, finite)
    }
}

/// Sets every parameter's gradient to zero (where it has one), before a step's micro-batches.
pub fn zero_gradients(params: &[(String, Tensor)]) {
    for (_, p) in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn warmup_then_cosine() {
        let c = OptimConfig {
            lr: 1.0,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((c.lr_at(0, 110) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9, 110) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10, 110) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(60, 110) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(110, 110) - 0.1).abs() < 1e-12);
    }

    /// Two steps of AdamW on f(x) = Σ x², checked against the update rule worked by hand
    /// (the rule `torch.optim.AdamW(lr=0.1, weight_decay=0.01)` documents, not its output).
    #[test]
    fn adamw_follows_the_update_rule() {
        let mut x = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let params = vec![("x".to_string(), x.shallow_clone())];
        let cfg = OptimConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(&params);
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for step in 1..=2 {
            x.zero_grad();
            (&x * &x).sum(Kind::Float).backward();
            opt.step(&params, &cfg, 0.1);
            for i in 0..2 {
                let g = 2.0 * want[i];
                want[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(step));
                let vh = (v[i] / (1.0 - 0.999f64.powi(step))).sqrt();
                want[i] -= 0.1 * mh / (vh + 1e-8);
            }
        }
        let got = Vec::<f32>::try_from(&x.to_device(Device::Cpu)).unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - want[i]).abs() < 1e-5,
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let x = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        (&x * &x).sum(Kind::Float).backward(); // grad (6, 8), norm 10
        let params = vec![("x".to_string(), x.shallow_clone())];
        let before = clip_grad_norm(&params, 1.0);
        assert!((before - 10.0).abs() < 1e-5);
        let after = f64::try_from(x.grad().norm()).unwrap();
        assert!((after - 1.0).abs() < 1e-4);
    }
}

/// Dynamic loss scaling for f16 training (Micikevicius et al. 2018, arXiv 1710.03740, §3.2,
/// as `torch.cuda.amp.GradScaler` does it): the loss is multiplied by `scale` before
/// backward; a step whose gradients overflow is skipped and the scale halved; after
/// `growth_interval` clean steps the scale doubles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    scale: f64,
    clean_steps: u64,
    growth_interval: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            clean_steps: 0,
            growth_interval: 2000,
        }
    }
}

impl LossScaler {
    /// The current factor.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Divides the gradients by the scale; `false` (and the scale halved, the gradients
    /// zeroed) when any is not finite, so the caller skips the step.
    pub fn unscale(&mut self, params: &[(String, Tensor)]) -> bool {
        let finite = tch::no_grad(|| {
            let mut ok = true;
            for (_, p) in params {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = g.g_mul_scalar_(1.0 / self.scale);
                ok &= bool::try_from(g.isfinite().all()).unwrap_or(false);
            }
            ok
        });
        if finite {
            self.clean_steps += 1;
            if self.clean_steps.is_multiple_of(self.growth_interval) {
                self.scale *= 2.0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
            tch::no_grad(|| {
                for (_, p) in params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
            });
        }
        finite
    }
}
