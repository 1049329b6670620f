//! llama.cpp's importance matrices (`llama-imatrix` output), in both formats it writes:
//!
//! - GGUF (the default since 2025): per weight `W`, the tensors `W.in_sum2` (f32
//!   `[n_per_row, n_mat]`, the summed squared activations of each matrix, several for MoE
//!   experts) and `W.counts` (f32 `[1, n_mat]`, how many activation rows each sum holds);
//! - legacy `.dat`: `i32 n_entries`, then per entry `i32 len, name[len], i32 ncall, i32 nval,
//!   f32 values[nval]` (values already divided by the rows per call and multiplied by `ncall`),
//!   then optionally `i32 chunks, i32 len, dataset[len]`.
//!
//! Both become one mean squared activation per column, as llama-quantize's `load_imatrix`
//! computes it (GGUF: `in_sum2 / round(count)` per matrix, 1 where the count is 0; legacy:
//! `values / ncall`).

use std::collections::HashMap;
use std::path::Path;

use crate::{Error, GgufFile, Result, io_err};

/// Importance (mean squared activation) per weight tensor, by GGUF tensor name: for a tensor
/// of `n_mat` matrices (MoE experts), `n_mat` runs of `n_per_row` values.
#[derive(Debug, Default)]
pub struct ImportanceMatrix {
    pub entries: HashMap<String, Vec<f32>>,
    /// The texts it was computed over, where the file says.
    pub datasets: Vec<String>,
}

impl ImportanceMatrix {
    /// Read a GGUF or legacy `.dat` importance matrix.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read; [`Error::Gguf`] for a malformed GGUF;
    /// [`Error::Imatrix`] naming the problem if it is neither format, or a GGUF one whose
    /// `.in_sum2`/`.counts` tensors do not pair up.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        if bytes.starts_with(b"GGUF") {
            Self::from_gguf(path)
        } else {
            Self::from_legacy(path, &bytes)
        }
    }

    /// The importances for tensor `name`, if the matrix has them.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.entries.get(name).map(Vec::as_slice)
    }

    /// llama-quantize refuses matrices with infinite or NaN values (they would write NaN
    /// scales); so does herd.
    fn check_finite(&self) -> std::result::Result<(), String> {
        match self
            .entries
            .iter()
            .find(|(_, v)| v.iter().any(|x| !x.is_finite()))
        {
            Some((name, _)) => Err(format!("{name} has a non-finite value")),
            None => Ok(()),
        }
    }

    fn from_gguf(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Imatrix {
            path: path.to_path_buf(),
            reason,
        };
        let f = GgufFile::open(path)?;
        let f32_values = |name: &str| -> Result<Vec<f32>> {
            let t = f
                .tensor_info(name)
                .ok_or_else(|| bad(format!("{name} is missing")))?;
            if t.dtype != herd_kernels::DType::F32 {
                return Err(bad(format!("{name} is {}, not F32", t.dtype)));
            }
            Ok(herd_kernels::dtype::decode(
                t.dtype,
                f.tensor_bytes(t).as_slice(),
                t.n_elements() as usize,
            ))
        };
        let mut m = ImportanceMatrix::default();
        for t in f.tensors() {
            let Some(name) = t.name.strip_suffix(".in_sum2") else {
                continue;
            };
            let sums = f32_values(&t.name)?;
            let counts = f32_values(&format!("{name}.counts"))?;
            if sums.is_empty() || counts.is_empty() || !sums.len().is_multiple_of(counts.len()) {
                return Err(bad(format!(
                    "{name}: {} sums for {} counts",
                    sums.len(),
                    counts.len()
                )));
            }
            let n = sums.len() / counts.len();
            let values = sums
                .chunks_exact(n)
                .zip(&counts)
                .flat_map(|(s, &c)| {
                    let c = c.round() as i64 as f32;
                    s.iter().map(move |&v| if c > 0.0 { v / c } else { 1.0 })
                })
                .collect();
            m.entries.insert(name.to_string(), values);
        }
        if m.entries.is_empty() {
            return Err(bad("no .in_sum2 tensors".into()));
        }
        m.check_finite().map_err(bad)?;
        if let Some(crate::gguf::Value::Array(_, items)) = f.get("imatrix.datasets") {
            m.datasets = items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
        }
        Ok(m)
    }

    fn from_legacy(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |reason: &str| Error::Imatrix {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut at = 0usize;
        let i32_at = |at: &mut usize| -> Option<i32> {
            let v = bytes.get(*at..*at + 4)?;
            *at += 4;
            Some(i32::from_le_bytes([v[0], v[1], v[2], v[3]]))
        };
        let n_entries = i32_at(&mut at).ok_or_else(|| bad("truncated"))?;
        if n_entries < 1 {
            return Err(bad("no entries"));
        }
        let mut m = ImportanceMatrix::default();
        for _ in 0..n_entries {
            let len = i32_at(&mut at)
                .filter(|&l| l > 0)
                .ok_or_else(|| bad("bad name"))? as usize;
            let name = bytes
                .get(at..at + len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| bad("bad name"))?
                .to_string();
            at += len;
            let ncall = i32_at(&mut at).ok_or_else(|| bad("truncated"))?;
            let nval = i32_at(&mut at)
                .filter(|&n| n > 0)
                .ok_or_else(|| bad("bad count"))? as usize;
            let raw = bytes
                .get(at..at + 4 * nval)
                .ok_or_else(|| bad("truncated values"))?;
            at += 4 * nval;
            let values = raw
                .chunks_exact(4)
                .map(|c| {
                    let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if ncall > 0 { v / ncall as f32 } else { v }
                })
                .collect();
            m.entries.insert(name, values);
        }
        m.check_finite().map_err(|r| bad(&r))?;
        // Optional trailer: chunk count, then the dataset's name.
        if let (Some(_chunks), Some(len)) = (i32_at(&mut at), i32_at(&mut at))
            && len > 0
            && let Some(name) = bytes.get(at..at + len as usize)
        {
            m.datasets.push(String::from_utf8_lossy(name).into_owned());
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy(entries: &[(&str, i32, &[f32])]) -> Vec<u8> {
        let mut b = (entries.len() as i32).to_le_bytes().to_vec();
        for (name, ncall, values) in entries {
            b.extend((name.len() as i32).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend(ncall.to_le_bytes());
            b.extend((values.len() as i32).to_le_bytes());
            for v in *values {
                b.extend(v.to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn legacy_files_are_divided_by_their_calls_and_bad_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.dat");
        let mut bytes = legacy(&[("blk.0.attn_q.weight", 4, &[8.0, 2.0]), ("w", 0, &[3.0])]);
        bytes.extend(10i32.to_le_bytes());
        bytes.extend(4i32.to_le_bytes());
        bytes.extend(b"wiki");
        std::fs::write(&path, &bytes).unwrap();
        let m = ImportanceMatrix::open(&path).unwrap();
        assert_eq!(m.get("blk.0.attn_q.weight"), Some(&[2.0, 0.5][..]));
        assert_eq!(m.get("w"), Some(&[3.0][..]), "no calls: taken as they are");
        assert_eq!(m.datasets, ["wiki"]);
        std::fs::write(&path, legacy(&[("w", 1, &[f32::INFINITY])])).unwrap();
        let err = ImportanceMatrix::open(&path).unwrap_err().to_string();
        assert!(err.contains("w has a non-finite value"), "{err}");
        for cut in [2, 10, bytes.len() - 20] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = ImportanceMatrix::open(&path).unwrap_err().to_string();
            assert!(
                err.contains("not an importance matrix"),
                "cut at {cut}: {err}"
            );
        }
    }
}
