//! AVX2 kernels (filled in below); `None` means "no kernel for this type, use the scalar one".
use crate::DType;

pub(crate) fn vec_dot(_wtype: DType, _w: &[u8], _a: &[u8], _n: usize) -> Option<f32> {
    None
}
