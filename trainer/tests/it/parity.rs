//! Parity with HF `diffusers` 0.42.1 (`DDPMScheduler`, `DDIMScheduler`): the fixture is
//! written by `python/make_diffusion_fixture.py` (scripts/test.sh runs it) for the linear and
//! cosine schedules with ε- and v-prediction. Values must agree to 1e-6, relative to the
//! value's size where it exceeds 1 (unclipped x̂₀ at t = 999 reaches ~8e4, where one f32 ulp
//! is ~8e-3).

use knn_trainer::diffusion::{
    Ddpm, DiffusionConfig, GaussianDiffusion, Prediction, Sampler, SamplerConfig, SamplerKind,
    ScheduleKind,
};
use serde_json::Value;
use std::path::PathBuf;
use tch::Tensor;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fixtures/diffusion/schedulers.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `bash scripts/test.sh` (it runs python/make_diffusion_fixture.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn tensor(v: &Value, shape: &[i64]) -> Tensor {
    Tensor::from_slice(&floats(v)).view(shape)
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0f64, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - *w as f64).abs() / (w.abs() as f64).max(1.0);
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= 1e-6,
        "{what}: error {:.3e} at {} (got {}, diffusers {})",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1]
    );
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.reshape([-1])).unwrap()
}

/// One sampler step from the fixture's inputs and noise against diffusers' x̂₀ and x_{t-1}.
fn step_matches(
    what: &str,
    sampler: &dyn Sampler,
    t: usize,
    model_output: &Tensor,
    sample: &Tensor,
    e: &Value,
    shape: &[i64],
) {
    let out = sampler.step(
        model_output,
        t,
        sample,
        &tensor(&e["variance_noise"], shape),
    );
    close(
        &format!("{what} x0"),
        &values(&out.pred_original),
        &floats(&e["pred_original_sample"]),
    );
    close(
        &format!("{what} prev"),
        &values(&out.prev_sample),
        &floats(&e["prev_sample"]),
    );
}

#[test]
fn schedules_and_steps_match_diffusers() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4, "linear/cosine x epsilon/v");
    for case in cases {
        let schedule = match case["schedule"].as_str().unwrap() {
            "linear" => ScheduleKind::Linear,
            _ => ScheduleKind::Cosine,
        };
        let prediction = match case["prediction"].as_str().unwrap() {
            "epsilon" => Prediction::Epsilon,
            _ => Prediction::V,
        };
        let name = format!("{schedule:?}/{prediction:?}");
        let d = GaussianDiffusion::new(&DiffusionConfig {
            schedule,
            prediction,
            timesteps: case["num_train_timesteps"].as_u64().unwrap() as usize,
            beta_start: case["beta_start"].as_f64().unwrap(),
            beta_end: case["beta_end"].as_f64().unwrap(),
        })
        .unwrap();
        close(
            &format!("{name} betas"),
            &values(d.betas()),
            &floats(&case["betas"]),
        );
        close(
            &format!("{name} alphas_cumprod"),
            &values(d.alphas_cumprod()),
            &floats(&case["alphas_cumprod"]),
        );
        let pv: Vec<f32> = (0..1000)
            .map(|t| d.posterior_variance(t, t as i64 - 1))
            .collect();
        close(
            &format!("{name} posterior variance"),
            &pv,
            &floats(&case["posterior_variance"]),
        );

        let shape: Vec<i64> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let x0 = tensor(&case["x0"], &shape);
        let noise = tensor(&case["noise"], &shape);
        let model_output = tensor(&case["model_output"], &shape);
        let sample = tensor(&case["sample"], &shape);
        for e in case["add_noise"].as_array().unwrap() {
            let t = Tensor::from_slice(&[e["t"].as_i64().unwrap(); 2]);
            close(
                &format!("{name} add_noise t={}", e["t"]),
                &values(&d.q_sample(&x0, &noise, &t)),
                &floats(&e["out"]),
            );
        }
        for e in case["velocity"].as_array().unwrap() {
            let t = Tensor::from_slice(&[e["t"].as_i64().unwrap(); 2]);
            close(
                &format!("{name} velocity t={}", e["t"]),
                &values(&d.velocity(&x0, &noise, &t)),
                &floats(&e["out"]),
            );
        }
        for e in case["ddpm_steps"].as_array().unwrap() {
            let t = e["t"].as_u64().unwrap() as usize;
            let clip = e["clip_sample"].as_bool().unwrap();
            let ddpm = Ddpm::full(&d, clip);
            let what = format!("{name} DDPM t={t} clip={clip}");
            step_matches(&what, &ddpm, t, &model_output, &sample, e, &shape);
        }
        let ddim_fx = &case["ddim"];
        let steps = ddim_fx["num_inference_steps"].as_u64().unwrap() as usize;
        for e in ddim_fx["steps"].as_array().unwrap() {
            let clip = e["clip_sample"].as_bool().unwrap();
            let eps_from_clipped = e["use_clipped_model_output"].as_bool().unwrap();
            let eta = e["eta"].as_f64().unwrap();
            let ddim = SamplerConfig {
                kind: SamplerKind::Ddim,
                steps,
                eta,
                clip_denoised: clip,
                eps_from_clipped,
            }
            .build(&d, "test")
            .unwrap();
            let want_ts: Vec<usize> = ddim_fx["timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(
                ddim.timesteps(),
                want_ts.as_slice(),
                "{name} DDIM timesteps"
            );
            let t = e["t"].as_u64().unwrap() as usize;
            let what = format!(
                "{name} DDIM t={t} eta={eta} clip={clip} eps_from_clipped={eps_from_clipped}"
            );
            step_matches(&what, ddim.as_ref(), t, &model_output, &sample, e, &shape);
        }
    }
}
