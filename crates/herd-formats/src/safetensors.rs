//! safetensors files, single or sharded, memory-mapped.
//!
//! The crate `safetensors` validates each header (JSON, offsets contiguous, sizes matching shapes
//! and the file length); tensors are then handed out as ranges of the shared memory map.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use herd_kernels::DType;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::{Error, Result, TensorBytes, io_err};

/// One stored tensor.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Element type, or `Err(name)` for a type our kernels do not compute with (e.g. fp8).
    pub dtype: std::result::Result<DType, String>,
    /// PyTorch order: the last dimension varies fastest.
    pub shape: Vec<usize>,
    pub bytes: TensorBytes,
    /// The file it came from, for error messages.
    pub file: Arc<Path>,
}

/// All tensors of a checkpoint, by name, across its shards.
#[derive(Debug, Default)]
pub struct TensorSet {
    tensors: BTreeMap<String, TensorInfo>,
}

impl TensorSet {
    /// Open one `.safetensors` file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut set = Self::default();
        set.add_file(path)?;
        Ok(set)
    }

    /// Open a sharded checkpoint through its `model.safetensors.index.json`.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(index_path).map_err(io_err(index_path))?;
        let index: Index = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index_path.to_path_buf(),
            source,
        })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<&String> = index.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        let mut set = Self::default();
        for shard in shards {
            let shard_path = dir.join(shard);
            if !shard_path.is_file() {
                return Err(Error::MissingShard {
                    path: index_path.to_path_buf(),
                    shard: shard.clone(),
                });
            }
            set.add_file(&shard_path)?;
        }
        // The index must not promise tensors that its shards lack.
        for (name, shard) in &index.weight_map {
            match set.tensors.get(name) {
                Some(t) if t.file.file_name() == Some(std::ffi::OsStr::new(shard)) => {}
                _ => {
                    return Err(Error::Safetensors {
                        path: dir.join(shard),
                        reason: format!("tensor {name} listed in the index is not in this shard"),
                    });
                }
            }
        }
        Ok(set)
    }

    /// Add the tensors of one file.
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: the map is read-only; like every mmap-based loader we rely on the file not
        // being truncated or rewritten while the model is loaded.
        let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(io_err(path))?);
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + header_len;
        let file_name: Arc<Path> = Arc::from(path);
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            // read_metadata checked that the offsets tile the data section exactly.
            let bytes = TensorBytes::mapped(map.clone(), data_start + start..data_start + end);
            let tensor = TensorInfo {
                dtype: map_dtype(info.dtype),
                shape: info.shape.clone(),
                bytes,
                file: file_name.clone(),
            };
            if let Some(prev) = self.tensors.get(&name) {
                return Err(Error::DuplicateTensor {
                    name,
                    first: prev.file.to_path_buf(),
                    second: path.to_path_buf(),
                });
            }
            self.tensors.insert(name, tensor);
        }
        tracing::debug!(path = %path.display(), tensors = self.tensors.len(), "mapped safetensors");
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Bytes of all tensors' data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.bytes.len() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Insert an in-memory tensor (tests, converted weights).
    pub fn insert(&mut self, name: impl Into<String>, tensor: TensorInfo) {
        self.tensors.insert(name.into(), tensor);
    }
}

fn map_dtype(d: Dtype) -> std::result::Result<DType, String> {
    match d {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::BF16 => Ok(DType::BF16),
        other => Err(format!("{other:?}")),
    }
}

/// Path of a directory's weights: the sharded index if present, else `model.safetensors`.
pub fn find_weights(dir: &Path) -> Result<(PathBuf, bool)> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return Ok((index, true));
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((single, false));
    }
    Err(Error::NoWeights {
        path: dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write_file(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, s, v)| {
                (
                    n.to_string(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    s.clone(),
                )
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = data
            .iter()
            .map(|(n, b, s)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn reads_single_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write_file(
            &p,
            &[
                ("a", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
                ("b", vec![1], vec![5.0]),
            ],
        );
        let set = TensorSet::open_file(&p).unwrap();
        let a = set.get("a").unwrap();
        assert_eq!(a.shape, [2, 2]);
        assert_eq!(
            herd_kernels::dtype::decode(DType::F32, a.bytes.as_slice(), 4),
            [1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write_file(&p, &[("a", vec![4], vec![1.0, 2.0, 3.0, 4.0])]);
        let bytes = std::fs::read(&p).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let err = TensorSet::open_file(&p).unwrap_err();
            assert!(matches!(err, Error::Safetensors { .. }), "cut {cut}: {err}");
        }
    }

    #[test]
    fn sharded_index_with_missing_shard_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_file(
            &dir.path().join("a.safetensors"),
            &[("x", vec![1], vec![1.0])],
        );
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"metadata":{},"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#,
        )
        .unwrap();
        let err = TensorSet::open_index(&index).unwrap_err();
        assert!(
            matches!(&err, Error::MissingShard { shard, .. } if shard == "b.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn sharded_index_reads_all_shards() {
        let dir = tempfile::tempdir().unwrap();
        write_file(
            &dir.path().join("a.safetensors"),
            &[("x", vec![1], vec![1.0])],
        );
        write_file(
            &dir.path().join("b.safetensors"),
            &[("y", vec![1], vec![2.0])],
        );
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#,
        )
        .unwrap();
        let set = TensorSet::open_index(&index).unwrap();
        assert!(set.contains("x") && set.contains("y"));
    }
}
