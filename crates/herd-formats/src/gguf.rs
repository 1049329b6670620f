//! GGUF v2/v3 files (`shared/reference/gguf.md` §a, §h): a validating reader that exposes the
//! metadata and the tensors in place from the memory map, and a writer.
//!
//! A split set (llama.cpp's `llama-gguf-split`: files `PREFIX-00001-of-0000N.gguf` …, each a
//! GGUF with `split.no`, `split.count` and `split.tensors.count`, the model's metadata in the
//! first) opens from any of its files as one [`GgufFile`]: every shard memory-mapped in place,
//! the first shard's metadata, the tensors of all shards in shard order.
//!
//! Every size in a file is treated as hostile: counts are bounded by the bytes that remain,
//! arithmetic is checked, tensors must lie inside the data section without overlapping. A bad
//! file is an error naming what is wrong, never a panic or an out-of-bounds read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use herd_kernels::DType;
use memmap2::Mmap;

use crate::{Error, Result, TensorBytes, io_err};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_ALIGNMENT: u64 = 1 << 20;
const MAX_DIMS: usize = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    /// Raw bytes: the spec says UTF-8 but readers must not assume it.
    String(Vec<u8>),
    /// Element type id and the elements (never nested).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Any integer type, if non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    pub fn string(s: &str) -> Value {
        Value::String(s.as_bytes().to_vec())
    }
}

/// A tensor's description as stored in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (fastest varying); PyTorch order is the reverse.
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// Relative to the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The parsed header of a GGUF file: everything but the tensor data.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
}

/// An open GGUF file (or split set): header plus the memory maps its tensors live in.
#[derive(Debug)]
pub struct GgufFile {
    /// The file opened; for a split set, its first shard.
    pub path: PathBuf,
    /// For a split set: the first shard's metadata and every shard's tensors (each tensor's
    /// `offset` relative to its own shard's data section), and the first shard's `data_start`.
    pub header: Header,
    /// The mapped file; `None` for a header read from a prefix (`from_prefix`).
    map: Option<Arc<Mmap>>,
    file_len: u64,
    /// Shards after the first of a split set, in `split.no` order.
    more_shards: Vec<Shard>,
    /// Per tensor of `header.tensors`: 0 for the first shard, `i + 1` for `more_shards[i]`.
    tensor_shard: Vec<usize>,
    index: HashMap<String, usize>,
    meta_index: HashMap<String, usize>,
}

/// One more file of a split set.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
    data_start: u64,
}

/// Metadata keys of a split set (llama.cpp's `LLM_KV_SPLIT_*`).
pub const SPLIT_NO: &str = "split.no";
pub const SPLIT_COUNT: &str = "split.count";
pub const SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

impl GgufFile {
    /// Opens a GGUF file, memory-mapped; a file of a split set opens the whole set (see the
    /// module docs), with an error naming the shard that is missing or inconsistent.
    pub fn open(path: &Path) -> Result<Self> {
        let (map, header) = map_and_parse(path)?;
        tracing::debug!(path = %path.display(), tensors = header.tensors.len(), "opened gguf");
        let file_len = map.len() as u64;
        let file = Self::with_header(path.to_path_buf(), header, Some(map), file_len);
        match split_position(&file.header.metadata).map_err(|reason| split_err(path, reason))? {
            Some((no, count)) if count > 1 => open_split_set(path, file, no, count),
            _ => Ok(file),
        }
    }

    /// The headers of a split set's shards (read with [`GgufFile::from_prefix`], in `split.no`
    /// order) as one header-only file: the first shard's metadata, every shard's tensors, the
    /// shards' lengths summed. The checks [`GgufFile::open`] makes on a set, but for presence.
    pub fn merge_split_headers(label: &str, shards: Vec<GgufFile>) -> Result<Self> {
        let err = |reason: String| split_err(Path::new(label), reason);
        let count = shards.len() as u64;
        let mut merged: Option<GgufFile> = None;
        let mut file_len = 0;
        for (i, shard) in shards.into_iter().enumerate() {
            match split_position(&shard.header.metadata).map_err(&err)? {
                Some((n, c)) if n == i as u64 && c == count => {}
                _ => {
                    return Err(err(format!(
                        "{} is not shard {} of {count}",
                        shard.path.display(),
                        i + 1
                    )));
                }
            }
            file_len += shard.file_len;
            match merged.as_mut() {
                None => merged = Some(shard),
                Some(m) => {
                    for t in shard.header.tensors {
                        if m.index.contains_key(&t.name) {
                            return Err(Error::DuplicateTensor {
                                name: t.name,
                                first: m.path.clone(),
                                second: shard.path.clone(),
                            });
                        }
                        m.index.insert(t.name.clone(), m.header.tensors.len());
                        m.header.tensors.push(t);
                        m.tensor_shard.push(i);
                    }
                }
            }
        }
        let mut m = merged.ok_or_else(|| err("no shards".into()))?;
        let want = m.get(SPLIT_TENSORS_COUNT).and_then(Value::as_u64);
        if want != Some(m.header.tensors.len() as u64) {
            let said = want.map_or_else(|| "missing".to_string(), |n| n.to_string());
            return Err(err(format!(
                "{SPLIT_TENSORS_COUNT} is {said}, but the {count} shards hold {} tensors",
                m.header.tensors.len()
            )));
        }
        m.file_len = file_len;
        m.path = PathBuf::from(label);
        Ok(m)
    }

    /// The files this model is read from: one, or every shard of a split set in order.
    pub fn shard_paths(&self) -> Vec<&Path> {
        std::iter::once(self.path.as_path())
            .chain(self.more_shards.iter().map(|s| s.path.as_path()))
            .collect()
    }

    /// The header alone, from the first bytes of a file of `file_len` bytes (a remote file's
    /// prefix): metadata and tensor descriptions, no tensor data.
    pub fn from_prefix(label: &str, prefix: &[u8], file_len: u64) -> Result<Self> {
        let header = parse_header_prefix(prefix, file_len).map_err(|reason| Error::Gguf {
            path: PathBuf::from(label),
            reason,
        })?;
        Ok(Self::with_header(
            PathBuf::from(label),
            header,
            None,
            file_len,
        ))
    }

    fn with_header(path: PathBuf, header: Header, map: Option<Arc<Mmap>>, file_len: u64) -> Self {
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let meta_index = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_shard = vec![0; header.tensors.len()];
        Self {
            path,
            header,
            map,
            file_len,
            more_shards: Vec::new(),
            tensor_shard,
            index,
            meta_index,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index
            .get(key)
            .map(|&i| &self.header.metadata[i].1)
    }

    /// `general.architecture` (`llama4`, `gemma3`, …).
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// An integer key in the architecture's namespace: `arch_usize("block_count")` reads
    /// `{arch}.block_count`.
    pub fn arch_usize(&self, key: &str) -> Option<usize> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.{key}"))
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The bytes of a tensor, in place in the memory map. Only for files opened with `open`
    /// (a header read with `from_prefix` has no tensor data).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> TensorBytes {
        let map = self
            .map
            .as_ref()
            .expect("tensor data of a GGUF header read without its file");
        let shard = self
            .index
            .get(&info.name)
            .map_or(0, |&i| self.tensor_shard[i]);
        let (map, data_start) = match shard {
            0 => (map, self.header.data_start),
            s => (
                &self.more_shards[s - 1].map,
                self.more_shards[s - 1].data_start,
            ),
        };
        // parse_header checked that the range lies inside its file.
        let start = (data_start + info.offset) as usize;
        TensorBytes::mapped(map.clone(), start..start + info.n_bytes as usize)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// Bytes on disk: the file's, or the sum over a split set's shards.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
}

fn split_err(path: &Path, reason: String) -> Error {
    Error::GgufSplit {
        path: path.to_path_buf(),
        reason,
    }
}

/// One file memory-mapped and its header parsed.
fn map_and_parse(path: &Path) -> Result<(Arc<Mmap>, Header)> {
    let file = File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only map; like every mmap loader we rely on the file not being truncated
    // or rewritten while it is in use.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(io_err(path))?);
    let header = parse_header(&map).map_err(|reason| Error::Gguf {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok((map, header))
}

/// `(split.no, split.count)` of a file's metadata (0-based shard number, shard count), `None`
/// if it is not part of a split set (no `split.count`, or a count of 0 or 1: llama.cpp reads
/// the split keys only when there is more than one file).
///
/// # Errors
/// A key of the wrong type, `split.no` missing, or `split.no ≥ split.count`, described in
/// words.
pub fn split_position(meta: &[(String, Value)]) -> std::result::Result<Option<(u64, u64)>, String> {
    let get = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let Some(count) = get(SPLIT_COUNT) else {
        return Ok(None);
    };
    let count = count
        .as_u64()
        .ok_or_else(|| format!("{SPLIT_COUNT} is not an unsigned integer"))?;
    // llama.cpp looks at the split keys only when there is more than one file.
    if count <= 1 {
        return Ok(None);
    }
    let no = get(SPLIT_NO)
        .ok_or_else(|| format!("{SPLIT_COUNT} is {count} but {SPLIT_NO} is missing"))?
        .as_u64()
        .ok_or_else(|| format!("{SPLIT_NO} is not an unsigned integer"))?;
    if no >= count {
        return Err(format!("{SPLIT_NO} {no} with {SPLIT_COUNT} {count}"));
    }
    Ok(Some((no, count)))
}

/// The most shards a split set may have (llama.cpp names them with five digits).
const MAX_SPLIT_COUNT: u64 = 99_999;

/// The path of shard `no` (0-based) of `count` next to `path`, shard `path_no` of the set:
/// llama.cpp's `PREFIX-%05d-of-%05d.gguf`.
fn shard_path(
    path: &Path,
    path_no: u64,
    no: u64,
    count: u64,
) -> std::result::Result<PathBuf, String> {
    let suffix = |n: u64| format!("-{:05}-of-{count:05}.gguf", n + 1);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let prefix = name.strip_suffix(&suffix(path_no)).ok_or_else(|| {
        format!(
            "this is shard {} of {count}, but its name does not end in {:?}, so the other shards \
             cannot be found (llama.cpp names them PREFIX-00001-of-{count:05}.gguf …)",
            path_no + 1,
            suffix(path_no)
        )
    })?;
    Ok(path.with_file_name(format!("{prefix}{}", suffix(no))))
}

/// The split set that `first_opened` (shard `no` of `count`, opened from `path`) belongs to,
/// every shard checked: present, a valid GGUF, the same `split.count`, its own `split.no`, no
/// tensor in two shards, and `split.tensors.count` tensors in all.
fn open_split_set(path: &Path, opened: GgufFile, no: u64, count: u64) -> Result<GgufFile> {
    let err = |reason: String| split_err(path, reason);
    if count > MAX_SPLIT_COUNT {
        return Err(err(format!(
            "{SPLIT_COUNT} {count} is more than {MAX_SPLIT_COUNT}"
        )));
    }
    let mut shards: Vec<(PathBuf, Arc<Mmap>, Header)> = Vec::with_capacity(count as usize);
    let mut opened = Some(opened);
    for i in 0..count {
        let p = shard_path(path, no, i, count).map_err(&err)?;
        let (map, header) = if i == no {
            let f = opened.take().expect("the opened shard is taken once");
            (f.map.expect("opened from a file"), f.header)
        } else {
            if !p.exists() {
                return Err(err(format!(
                    "shard {} of {count}, {}, is missing",
                    i + 1,
                    p.display()
                )));
            }
            map_and_parse(&p)?
        };
        match split_position(&header.metadata).map_err(|r| split_err(&p, r))? {
            Some((n, c)) if c == count && n == i => {}
            Some((n, c)) => {
                return Err(split_err(
                    &p,
                    format!(
                        "expected shard {} of {count}, found shard {} of {c} ({SPLIT_NO} {n}; \
                         shards of different sets?)",
                        i + 1,
                        n + 1
                    ),
                ));
            }
            None => {
                return Err(split_err(
                    &p,
                    format!(
                        "expected shard {} of {count}, found no {SPLIT_COUNT}",
                        i + 1
                    ),
                ));
            }
        }
        shards.push((p, map, header));
    }
    let mut rest = shards.split_off(1);
    let (first_path, first_map, mut header) = shards.pop().expect("count > 1");
    let expected = header
        .metadata
        .iter()
        .find(|(k, _)| k == SPLIT_TENSORS_COUNT)
        .and_then(|(_, v)| v.as_u64());
    let mut tensor_shard = vec![0; header.tensors.len()];
    let mut owner: HashMap<String, usize> =
        header.tensors.iter().map(|t| (t.name.clone(), 0)).collect();
    let mut file_len = first_map.len() as u64;
    let mut more_shards = Vec::with_capacity(rest.len());
    for (i, (p, map, h)) in rest.drain(..).enumerate() {
        for t in h.tensors {
            if let Some(&prev) = owner.get(&t.name) {
                let first = if prev == 0 {
                    first_path.clone()
                } else {
                    more_shards
                        .get(prev - 1)
                        .map_or_else(|| p.clone(), |s: &Shard| s.path.clone())
                };
                return Err(Error::DuplicateTensor {
                    name: t.name,
                    first,
                    second: p,
                });
            }
            owner.insert(t.name.clone(), i + 1);
            header.tensors.push(t);
            tensor_shard.push(i + 1);
        }
        file_len += map.len() as u64;
        more_shards.push(Shard {
            path: p,
            map,
            data_start: h.data_start,
        });
    }
    match expected {
        Some(n) if n == header.tensors.len() as u64 => {}
        Some(n) => {
            return Err(err(format!(
                "{SPLIT_TENSORS_COUNT} is {n}, but the {count} shards hold {} tensors",
                header.tensors.len()
            )));
        }
        None => {
            return Err(err(format!(
                "the first shard has no {SPLIT_TENSORS_COUNT} (or not a non-negative integer)"
            )));
        }
    }
    tracing::debug!(path = %first_path.display(), shards = count, tensors = header.tensors.len(), "opened gguf split set");
    let mut file = GgufFile::with_header(first_path, header, Some(first_map), file_len);
    file.more_shards = more_shards;
    file.tensor_shard = tensor_shard;
    Ok(file)
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    /// A count of items each at least `min_size` bytes: bounded by what remains.
    fn count(&mut self, min_size: usize, what: &str) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        let max = (self.remaining() / min_size.max(1)) as u64;
        if n > max {
            return Err(format!(
                "{what} {n} cannot fit in the {} bytes that remain",
                self.remaining()
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> std::result::Result<Vec<u8>, String> {
        let n = self.count(1, &format!("length of {what}"))?;
        Ok(self.take(n, what)?.to_vec())
    }

    fn value(&mut self, ty: u32, in_array: bool) -> std::result::Result<Value, String> {
        let b = |c: &mut Self, n| c.take(n, "metadata value");
        Ok(match ty {
            0 => Value::U8(b(self, 1)?[0]),
            1 => Value::I8(b(self, 1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(b(self, 2)?.try_into().unwrap())),
            4 => Value::U32(u32::from_le_bytes(b(self, 4)?.try_into().unwrap())),
            5 => Value::I32(i32::from_le_bytes(b(self, 4)?.try_into().unwrap())),
            6 => Value::F32(f32::from_le_bytes(b(self, 4)?.try_into().unwrap())),
            7 => match b(self, 1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                v => return Err(format!("invalid boolean byte {v}")),
            },
            8 => Value::String(self.string("string value")?),
            9 if in_array => return Err("nested arrays are not supported".into()),
            9 => {
                let elem = self.u32("array element type")?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => return Err("nested arrays are not supported".into()),
                    t => return Err(format!("unknown array element type {t}")),
                };
                let n = self.count(min, "array length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, true)?);
                }
                Value::Array(elem, items)
            }
            10 => Value::U64(u64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            11 => Value::I64(i64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            12 => Value::F64(f64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add((a - x % a) % a)
}

/// Parse and validate a whole file's header against its length. Public so fuzzers can drive it.
pub fn parse_header(data: &[u8]) -> std::result::Result<Header, String> {
    parse_header_prefix(data, data.len() as u64)
}

/// Parse a header from the first bytes of a file of `file_len` bytes (the tensor data need not
/// be there: tensors are checked against `file_len`).
pub fn parse_header_prefix(data: &[u8], file_len: u64) -> std::result::Result<Header, String> {
    let mut c = Cursor { data, pos: 0 };
    if c.take(4, "magic")? != MAGIC {
        return Err("not a GGUF file (bad magic)".into());
    }
    let version = c.u32("version")?;
    if version & 0xFFFF == 0 && version != 0 {
        return Err(format!(
            "version {version:#x} looks byte-swapped: big-endian GGUF is not supported"
        ));
    }
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (2 and 3 are supported)"
        ));
    }
    let n_tensors = c.count(32, "tensor count")?;
    let n_kv = c.count(13, "metadata count")?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n_kv {
        let key = String::from_utf8(c.string("metadata key")?)
            .map_err(|_| "metadata key is not valid UTF-8".to_string())?;
        if key.is_empty() {
            return Err("empty metadata key".into());
        }
        if !seen.insert(key.clone()) {
            return Err(format!("duplicate metadata key {key}"));
        }
        let ty = c.u32("metadata value type")?;
        let value = c.value(ty, false).map_err(|e| format!("key {key}: {e}"))?;
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) => {
            let a = u64::from(*a);
            if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                return Err(format!(
                    "general.alignment {a} must be a power of two up to {MAX_ALIGNMENT}"
                ));
            }
            a
        }
        Some((_, v)) => return Err(format!("general.alignment must be a u32, got {v:?}")),
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = String::from_utf8(c.string("tensor name")?)
            .map_err(|_| "tensor name is not valid UTF-8".to_string())?;
        if !names.insert(name.clone()) {
            return Err(format!("duplicate tensor {name}"));
        }
        let bad = |msg: String| format!("tensor {name}: {msg}");
        let n_dims = c.u32("tensor dimension count")? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(bad(format!(
                "{n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64("tensor dimension")?);
        }
        let type_id = c.u32("tensor type")?;
        let dtype = DType::from_ggml_id(type_id)
            .ok_or_else(|| bad(format!("unknown or unsupported tensor type {type_id}")))?;
        let offset = c.u64("tensor offset")?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
        if dims[0] % dtype.block_size() as u64 != 0 {
            return Err(bad(format!(
                "row length {} is not a multiple of the {dtype} block size",
                dims[0]
            )));
        }
        let n_bytes = dtype
            .checked_bytes_for(n_elements)
            .ok_or_else(|| bad(format!("size of {n_elements} {dtype} elements overflows")))?;
        if offset % alignment != 0 {
            return Err(bad(format!(
                "offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            dtype,
            offset,
            n_bytes,
        });
    }

    let data_start = align_up(c.pos as u64, alignment).ok_or("data section offset overflows")?;
    if n_tensors > 0 && data_start > file_len {
        return Err(format!(
            "truncated: data section starts at {data_start}, file has {file_len} bytes"
        ));
    }
    let data_len = file_len.saturating_sub(data_start);
    let mut ranges: Vec<(u64, u64, &str)> = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let end = t.offset.checked_add(t.n_bytes).filter(|&e| e <= data_len).ok_or_else(|| {
            format!(
                "tensor {}: {} bytes at data offset {} run past the end of the file ({} data bytes)",
                t.name, t.n_bytes, t.offset, data_len
            )
        })?;
        ranges.push((t.offset, end, &t.name));
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!("tensors {} and {} overlap", w[0].2, w[1].2));
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

/// Writes a GGUF v3 file: metadata and tensor descriptions first, then each tensor's bytes,
/// produced on demand so large models stream through without being held in memory.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, DType)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set a key (replacing an earlier value of the same key).
    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Declare a tensor (ggml dimension order). Data comes from the callback given to `write`.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], dtype: DType) {
        self.tensors.push((name.to_string(), dims.to_vec(), dtype));
    }

    fn alignment(&self) -> u64 {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) => u64::from(*a),
            _ => DEFAULT_ALIGNMENT,
        }
    }

    /// Write to `path` (through a temporary file renamed at the end, so a failed write never
    /// leaves a file that looks complete). `data(i)` returns tensor `i`'s bytes.
    pub fn write(&self, path: &Path, mut data: impl FnMut(usize) -> Result<Vec<u8>>) -> Result<()> {
        let tmp = path.with_extension("gguf.partial");
        let result = (|| {
            let file = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut w = BufWriter::new(file);
            let mut header = Vec::new();
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&3u32.to_le_bytes());
            header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
            for (k, v) in &self.metadata {
                put_string(&mut header, k.as_bytes());
                header.extend_from_slice(&v.type_id().to_le_bytes());
                put_value(&mut header, v);
            }
            let align = self.alignment();
            let mut offset = 0u64;
            let mut sizes = Vec::with_capacity(self.tensors.len());
            for (name, dims, dtype) in &self.tensors {
                put_string(&mut header, name.as_bytes());
                header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                for d in dims {
                    header.extend_from_slice(&d.to_le_bytes());
                }
                header.extend_from_slice(&dtype.ggml_id().to_le_bytes());
                header.extend_from_slice(&offset.to_le_bytes());
                let n = dtype.bytes_for(dims.iter().product::<u64>() as usize) as u64;
                sizes.push(n);
                offset = align_up(offset + n, align).expect("tensor sizes fit in u64");
            }
            let pad = |len: u64| vec![0u8; ((align - len % align) % align) as usize];
            let header_len = header.len() as u64;
            header.extend(pad(header_len));
            w.write_all(&header).map_err(io_err(&tmp))?;
            for (i, (name, _, _)) in self.tensors.iter().enumerate() {
                let bytes = data(i)?;
                assert_eq!(
                    bytes.len() as u64,
                    sizes[i],
                    "tensor {name}: wrong byte count from writer callback"
                );
                w.write_all(&bytes).map_err(io_err(&tmp))?;
                w.write_all(&pad(sizes[i])).map_err(io_err(&tmp))?;
            }
            w.flush().map_err(io_err(&tmp))?;
            Ok(())
        })();
        match result {
            Ok(()) => std::fs::rename(&tmp, path).map_err(io_err(path)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(elem, items) => {
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::new();
        w.set("general.architecture", Value::string("test"));
        w.set("test.count", Value::U32(7));
        w.set(
            "test.list",
            Value::Array(8, vec![Value::string("a"), Value::string("bc")]),
        );
        w.set("test.f", Value::F64(0.5));
        w.add_tensor("a", &[4, 2], DType::F32);
        w.add_tensor("b", &[32], DType::Q8_0);
        w.write(&path, |i| {
            Ok(if i == 0 {
                (0..32u8).collect()
            } else {
                vec![1u8; 34]
            })
        })
        .unwrap();
        (dir, path)
    }

    #[test]
    fn round_trips_metadata_and_tensors() {
        let (_d, path) = sample();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.header.version, 3);
        assert_eq!(
            f.get("general.architecture").unwrap().as_str(),
            Some("test")
        );
        assert_eq!(f.get("test.count").unwrap().as_u64(), Some(7));
        assert_eq!(
            f.get("test.list").unwrap().as_array().unwrap()[1].as_str(),
            Some("bc")
        );
        assert_eq!(f.get("test.f").unwrap().as_f64(), Some(0.5));
        let a = f.tensor_info("a").unwrap();
        assert_eq!(
            (a.dims.as_slice(), a.dtype, a.n_bytes),
            (&[4u64, 2][..], DType::F32, 32)
        );
        assert_eq!(f.tensor_bytes(a).as_slice(), (0..32u8).collect::<Vec<_>>());
        let b = f.tensor_info("b").unwrap();
        assert_eq!(b.offset % 32, 0);
        assert_eq!(f.tensor_bytes(b).as_slice(), [1u8; 34]);
        assert!(!path.with_extension("gguf.partial").exists());
    }

    #[test]
    fn every_value_type_round_trips_and_version_2_reads() {
        let values = vec![
            Value::U8(1),
            Value::I8(-2),
            Value::U16(3),
            Value::I16(-4),
            Value::U32(5),
            Value::I32(-6),
            Value::F32(7.5),
            Value::Bool(true),
            Value::string("eight"),
            Value::Array(5, vec![Value::I32(9), Value::I32(-9)]),
            Value::U64(10),
            Value::I64(-11),
            Value::F64(12.25),
            Value::String(vec![0xff, 0xfe]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.gguf");
        let mut w = GgufWriter::new();
        for (i, v) in values.iter().enumerate() {
            w.set(&format!("k.{i}"), v.clone());
        }
        w.write(&path, |_| unreachable!()).unwrap();
        let f = GgufFile::open(&path).unwrap();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(f.get(&format!("k.{i}")), Some(v));
        }
        assert_eq!(
            f.get("k.13").unwrap().as_str(),
            None,
            "invalid UTF-8 stays bytes"
        );
        // Version 2 has the same layout.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(parse_header(&bytes).unwrap().version, 2);
        // Nested arrays are refused, not looped over.
        let mut w = GgufWriter::new();
        w.set("nested", Value::Array(9, vec![Value::Array(4, vec![])]));
        let nested = dir.path().join("n.gguf");
        w.write(&nested, |_| unreachable!()).unwrap();
        assert!(
            GgufFile::open(&nested)
                .unwrap_err()
                .to_string()
                .contains("nested")
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (_d, path) = sample();
        let bytes = std::fs::read(&path).unwrap();
        for cut in 0..bytes.len() {
            // The last tensor's padding is not needed to read it.
            if cut >= bytes.len() - 30 {
                continue;
            }
            assert!(parse_header(&bytes[..cut]).is_err(), "cut at {cut} parsed");
        }
    }

    #[test]
    fn hostile_headers_are_errors() {
        let (_d, path) = sample();
        let good = std::fs::read(&path).unwrap();
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(parse_header(&bad_magic).unwrap_err().contains("magic"));
        let mut v1 = good.clone();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(parse_header(&v1).unwrap_err().contains("version"));
        let mut huge_count = good.clone();
        huge_count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            parse_header(&huge_count)
                .unwrap_err()
                .contains("cannot fit")
        );
        let mut huge_kv = good.clone();
        huge_kv[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(parse_header(&huge_kv).is_err());
    }

    #[test]
    fn offsets_past_the_end_and_unknown_types_are_errors() {
        let mut w = GgufWriter::new();
        w.add_tensor("x", &[8], DType::F32);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        w.write(&path, |_| Ok(vec![0; 32])).unwrap();
        let good = std::fs::read(&path).unwrap();
        // Tensor info: name (8 + 1), n_dims 4, dim 8, type 4, offset 8, right after the 24-byte header.
        let type_at = 24 + 9 + 4 + 8;
        let mut unknown = good.clone();
        unknown[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(parse_header(&unknown).unwrap_err().contains("unknown"));
        let mut past_end = good.clone();
        past_end[type_at + 4..type_at + 12].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert!(parse_header(&past_end).is_err());
        let mut wrapping = good.clone();
        wrapping[type_at - 8..type_at].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(parse_header(&wrapping).is_err());
        assert!(parse_header(&good).is_ok());
    }
}
