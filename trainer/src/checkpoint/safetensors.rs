//! Named tensors as safetensors bytes and back (never pickle): the one tensor file format of
//! checkpoints. Tensors are copied to the CPU first; names sort the file.

use crate::{Result, TrainerError};
use std::borrow::Cow;
use tch::{Device, Kind, Tensor};

struct TensorBytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &TensorBytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_of(kind: Kind) -> std::result::Result<safetensors::Dtype, String> {
    Ok(match kind {
        Kind::Float => safetensors::Dtype::F32,
        Kind::Double => safetensors::Dtype::F64,
        Kind::Half => safetensors::Dtype::F16,
        Kind::BFloat16 => safetensors::Dtype::BF16,
        Kind::Int64 => safetensors::Dtype::I64,
        Kind::Int => safetensors::Dtype::I32,
        other => return Err(format!("cannot store tensors of kind {other:?}")),
    })
}

fn kind_of(dtype: safetensors::Dtype) -> std::result::Result<Kind, String> {
    Ok(match dtype {
        safetensors::Dtype::F32 => Kind::Float,
        safetensors::Dtype::F64 => Kind::Double,
        safetensors::Dtype::F16 => Kind::Half,
        safetensors::Dtype::BF16 => Kind::BFloat16,
        safetensors::Dtype::I64 => Kind::Int64,
        safetensors::Dtype::I32 => Kind::Int,
        other => return Err(format!("unsupported dtype {other:?}")),
    })
}

/// Named tensors → safetensors bytes (copied to the CPU first).
pub fn to_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind()).map_err(|r| TrainerError::Checkpoint {
            location: name.clone(),
            reason: r,
        })?;
        let mut data = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, t.numel())?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), TensorBytes { dtype, shape, data }));
    }
    safetensors::serialize(owned.iter().map(|(n, t)| (n.as_str(), t)), None).map_err(|e| {
        TrainerError::Checkpoint {
            location: "safetensors".into(),
            reason: e.to_string(),
        }
    })
}

/// safetensors bytes → named tensors on the CPU, sorted by name; `location` names the file in
/// errors.
pub fn from_safetensors(bytes: &[u8], location: &str) -> Result<Vec<(String, Tensor)>> {
    let bad = |reason: String| TrainerError::Checkpoint {
        location: location.to_string(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).map_err(|r| bad(format!("`{name}`: {r}")))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name, Tensor::from_data_size(view.data(), &shape, kind)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Copies each of `dst`'s tensors from the tensor of the same name in `src` (converted to
/// its device and kind); a missing or mis-shaped tensor is named, with `location` (the file).
pub fn copy_named(
    dst: &[(String, Tensor)],
    src: &[(String, Tensor)],
    location: &str,
) -> Result<()> {
    let map: std::collections::HashMap<&str, &Tensor> =
        src.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bad = |reason: String| TrainerError::Checkpoint {
        location: location.to_string(),
        reason,
    };
    tch::no_grad(|| {
        for (name, d) in dst {
            let t = map
                .get(name.as_str())
                .ok_or_else(|| bad(format!("lacks `{name}`")))?;
            if t.size() != d.size() {
                return Err(bad(format!(
                    "`{name}` is {:?}, the model has {:?}",
                    t.size(),
                    d.size()
                )));
            }
            d.shallow_clone()
                .copy_(&t.to_device(d.device()).to_kind(d.kind()));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip() {
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::from_slice(&[7i64]);
        let bytes = to_safetensors(&[
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ])
        .unwrap();
        let back = from_safetensors(&bytes, "test").unwrap();
        let get = |n: &str| back.iter().find(|p| p.0 == n).unwrap().1.shallow_clone();
        assert!(get("a").equal(&a));
        assert!(get("b").equal(&b));
    }
}
