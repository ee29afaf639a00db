#!/usr/bin/env python3
"""Generate the DDPM/DDIM scheduler parity fixture for the Rust diffusion schedulers.

Usage::

    python python/make_diffusion_fixture.py --out DIR

Writes ``DIR/schedulers.json``. Every number in it is produced by Hugging Face
diffusers' own ``DDPMScheduler`` / ``DDIMScheduler`` (diffusers 0.42.1, torch
2.13.0, CPU, float32); the Rust side compares against it at <= 1e-6.

For each schedule ("linear": beta 0.0001..0.02; "cosine": ``squaredcos_cap_v2``)
x prediction type ("epsilon", "v_prediction"), with 1000 train timesteps, a
case holds: ``betas``, ``alphas_cumprod``, ``posterior_variance`` (DDPM
``_get_variance(t)``, ``fixed_small``, no ``set_timesteps`` so prev_t = t-1),
fixed inputs ``x0`` / ``noise`` / ``model_output`` / ``sample`` (shape
[2,3,4,4], flattened row-major), ``add_noise`` and ``velocity`` at
t in {0, 10, 500, 999}, DDPM ``step`` outputs (with the noise the step drew),
DDIM ``step`` outputs after ``set_timesteps(50)`` (explicit variance noise; with clipping, also with ``use_clipped_model_output``),
and the schedulers' ``config`` dicts (the defaults relied on).

Deterministic: fixed seeds, CPU generators, float32 everywhere; floats are
written as ``float(float32 value)`` so they round-trip exactly.
"""

import argparse
import json
import os

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

SHAPE = (2, 3, 4, 4)
T_TRAIN = 1000
SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    # beta_start/beta_end are ignored by squaredcos_cap_v2 but still part of the config.
    "cosine": dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02),
}
PREDICTIONS = ["epsilon", "v_prediction"]
FORWARD_TS = [0, 10, 500, 999]
DDPM_TS = [999, 500, 10, 1, 0]
DDPM_SEED = 1234
DDIM_STEPS = 50
DDIM_NOISE_SEED = 99


def floats(t):
    """Flatten a float32 tensor to a list of Python floats (exact float32 values)."""
    assert t.dtype == torch.float32, t.dtype
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def config_json(sched):
    # _use_default_values is built from a set (unordered) -- dropping it keeps the output byte-stable.
    out = {}
    for k, v in sched.config.items():
        if k == "_use_default_values":
            continue
        out[k] = v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
    return out


def seeded(seed, fn):
    torch.manual_seed(seed)
    return fn(SHAPE, dtype=torch.float32)


def ddpm_steps(kw, prediction, model_output, sample):
    steps = []
    for t in DDPM_TS:
        for clip in [True, False]:
            s = DDPMScheduler(**kw, clip_sample=clip, variance_type="fixed_small", prediction_type=prediction)
            out = s.step(model_output, t, sample, generator=torch.Generator().manual_seed(DDPM_SEED))
            # Re-draw the step's noise exactly as DDPMScheduler.step does (same call, fresh same-seed generator).
            if t > 0:
                noise = randn_tensor(model_output.shape, generator=torch.Generator().manual_seed(DDPM_SEED),
                                     device=model_output.device, dtype=model_output.dtype)
                std = s._get_variance(t) ** 0.5
            else:  # diffusers adds no noise at t == 0
                noise, std = torch.zeros_like(sample), 0.0
            # Check the recorded noise really is what the step added: rebuild the posterior mean (DDPM eq. 7).
            a_t = s.alphas_cumprod[t]
            a_prev = s.alphas_cumprod[t - 1] if t > 0 else s.one
            mean = (a_prev**0.5 * (1 - a_t / a_prev) / (1 - a_t)) * out.pred_original_sample + (
                (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t)) * sample
            diff = (out.prev_sample - (mean + std * noise)).abs().max().item()
            assert diff < 1e-6, f"DDPM noise reconstruction failed at t={t}: {diff}"
            steps.append({"t": t, "clip_sample": clip, "variance_noise": floats(noise),
                          "prev_sample": floats(out.prev_sample),
                          "pred_original_sample": floats(out.pred_original_sample)})
    return steps


def ddim(kw, prediction, model_output, sample, variance_noise):
    def make(clip):
        s = DDIMScheduler(**kw, clip_sample=clip, set_alpha_to_one=True, steps_offset=0,
                          timestep_spacing="leading", prediction_type=prediction)
        s.set_timesteps(DDIM_STEPS)
        return s

    timesteps = [int(t) for t in make(True).timesteps]
    steps = []
    for t in [timesteps[0], timesteps[25], timesteps[49]]:
        for eta in [0.0, 1.0]:
            for clip, eps_from_clipped in [(True, False), (True, True), (False, False)]:
                out = make(clip).step(model_output, t, sample, eta=eta, variance_noise=variance_noise,
                                      use_clipped_model_output=eps_from_clipped)
                steps.append({"t": t, "eta": eta, "clip_sample": clip,
                              "use_clipped_model_output": eps_from_clipped,
                              "variance_noise": floats(variance_noise),
                              "prev_sample": floats(out.prev_sample),
                              "pred_original_sample": floats(out.pred_original_sample)})
    return {"num_inference_steps": DDIM_STEPS, "timesteps": timesteps, "steps": steps}, make(True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (schedulers.json is written there)")
    args = ap.parse_args()

    # Same inputs for every case; seeds 0..3 (and 99 for DDIM's noise) keep them reproducible.
    x0 = seeded(0, torch.rand) * 2 - 1  # uniform in [-1, 1)
    noise = seeded(1, torch.randn)
    model_output = seeded(2, torch.randn)
    sample = seeded(3, torch.randn)
    ddim_noise = seeded(DDIM_NOISE_SEED, torch.randn)

    cases = []
    for name, sched_kw in SCHEDULES.items():
        kw = dict(num_train_timesteps=T_TRAIN, **sched_kw)
        for prediction in PREDICTIONS:
            s = DDPMScheduler(**kw, variance_type="fixed_small", prediction_type=prediction)
            ddim_case, ddim_sched = ddim(kw, prediction, model_output, sample, ddim_noise)
            assert torch.equal(ddim_sched.alphas_cumprod, s.alphas_cumprod)
            cases.append({
                "schedule": name, "prediction": prediction, "num_train_timesteps": T_TRAIN,
                "beta_start": kw["beta_start"], "beta_end": kw["beta_end"],
                "config": {"ddpm": config_json(s), "ddim": config_json(ddim_sched)},
                "betas": floats(s.betas), "alphas_cumprod": floats(s.alphas_cumprod),
                "posterior_variance": [floats(s._get_variance(t).reshape(1))[0] for t in range(T_TRAIN)],
                "shape": list(SHAPE),
                "x0": floats(x0), "noise": floats(noise),
                "model_output": floats(model_output), "sample": floats(sample),
                "add_noise": [{"t": t, "out": floats(s.add_noise(x0, noise, torch.tensor([t, t])))}
                              for t in FORWARD_TS],
                "velocity": [{"t": t, "out": floats(s.get_velocity(x0, noise, torch.tensor([t, t])))}
                             for t in FORWARD_TS],
                "ddpm_steps": ddpm_steps(kw, prediction, model_output, sample),
                "ddim": ddim_case,
            })

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "schedulers.json")
    with open(path, "w") as f:
        json.dump({"diffusers_version": diffusers.__version__,
                   "torch_version": torch.__version__, "cases": cases}, f, allow_nan=False)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
