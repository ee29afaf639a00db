//! Mixed precision on the GPU: libtorch's CUDA autocast, with its dtype chosen.
//!
//! tch 0.26 switches autocast on and off but cannot pick its dtype, and libtorch's default
//! for CUDA is f16. libtorch itself has `at::autocast::set_autocast_dtype(DeviceType,
//! ScalarType)` (and its getter), public C++ functions of `libtorch_cpu.so` that torch-sys
//! already links; they are bound here by their Itanium-mangled names, which are fixed for the
//! pinned libtorch 2.13 (a libtorch without them fails at link time, not at run time). Both
//! enums are `int8_t`-backed (`c10::DeviceType`, `c10::ScalarType`), so the C ABI matches.
//! The dtype is thread-local in libtorch: set it on the thread that runs the model.

extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_autocast_set_dtype(device: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_autocast_get_dtype(device: i8) -> i8;
}

/// `c10::DeviceType::CUDA`.
const CUDA: i8 = 1;

/// The reduced precision autocast computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutocastDtype {
    /// bfloat16 (`c10::ScalarType::BFloat16` = 15): f32's range, no loss scaling needed.
    Bf16,
    /// float16 (`c10::ScalarType::Half` = 5): needs loss scaling.
    F16,
}

impl AutocastDtype {
    fn code(self) -> i8 {
        match self {
            AutocastDtype::Bf16 => 15,
            AutocastDtype::F16 => 5,
        }
    }
}

/// Makes CUDA autocast on this thread compute in `dtype`.
pub fn set_cuda_autocast_dtype(dtype: AutocastDtype) {
    // SAFETY: plain functions of libtorch taking and returning int8-backed enums; they only
    // write a thread-local array slot.
    unsafe { at_autocast_set_dtype(CUDA, dtype.code()) }
}

/// The dtype CUDA autocast uses on this thread (`None`: neither bf16 nor f16).
pub fn cuda_autocast_dtype() -> Option<AutocastDtype> {
    // SAFETY: as above; reads a thread-local slot.
    match unsafe { at_autocast_get_dtype(CUDA) } {
        15 => Some(AutocastDtype::Bf16),
        5 => Some(AutocastDtype::F16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binding reaches libtorch's own setting (no GPU needed: it is a thread-local).
    #[test]
    fn the_cuda_autocast_dtype_round_trips() {
        assert_eq!(
            cuda_autocast_dtype(),
            Some(AutocastDtype::F16),
            "libtorch's default"
        );
        set_cuda_autocast_dtype(AutocastDtype::Bf16);
        assert_eq!(cuda_autocast_dtype(), Some(AutocastDtype::Bf16));
        set_cuda_autocast_dtype(AutocastDtype::F16);
        assert_eq!(cuda_autocast_dtype(), Some(AutocastDtype::F16));
    }
}
