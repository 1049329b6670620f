//! Split GGUF sets as llama.cpp's `llama-gguf-split` writes them (the fixture: the tiny Llama 4
//! Q4_K_M file split into four shards of at most 12 tensors by llama.cpp 0c1e570, see
//! tests/fixtures/gen/gen_split.sh), opened from any shard, against the unsplit file; and the
//! errors for sets that are incomplete or inconsistent.

use std::path::{Path, PathBuf};

use herd_formats::gguf::{GgufFile, GgufWriter, SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT, Value};
use herd_kernels::DType;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama4_gguf")
}

fn shard(i: usize) -> PathBuf {
    fixtures().join(format!("split/tiny-q4_k_m-{i:05}-of-00004.gguf"))
}

/// Every shard opens the whole set: the unsplit file's metadata (plus the split keys), its
/// tensors in its order with the same bytes, and four files.
#[test]
fn any_shard_opens_the_whole_set() {
    let whole = GgufFile::open(&fixtures().join("tiny-q4_k_m.llama-quantize.gguf")).unwrap();
    for i in 1..=4 {
        let set = GgufFile::open(&shard(i)).unwrap();
        assert_eq!(set.path, shard(1), "opened from shard {i}");
        assert_eq!(set.shard_paths(), (1..=4).map(shard).collect::<Vec<_>>());
        let want_len: u64 = (1..=4)
            .map(|s| std::fs::metadata(shard(s)).unwrap().len())
            .sum();
        assert_eq!(set.file_len(), want_len);
        for (key, value) in &whole.header.metadata {
            assert_eq!(set.get(key), Some(value), "{key}");
        }
        assert_eq!(set.get(SPLIT_COUNT).and_then(Value::as_u64), Some(4));
        let names = |f: &GgufFile| {
            f.tensors()
                .iter()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&set), names(&whole));
        for t in whole.tensors() {
            let s = set.tensor_info(&t.name).unwrap();
            assert_eq!((&s.dims, s.dtype, s.n_bytes), (&t.dims, t.dtype, t.n_bytes));
            assert_eq!(
                set.tensor_bytes(s).as_slice(),
                whole.tensor_bytes(t).as_slice(),
                "{}",
                t.name
            );
        }
    }
}

/// The shards copied into a fresh directory (tests that break a set work on the copy).
fn copy_set() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 1..=4 {
        std::fs::copy(shard(i), dir.path().join(shard(i).file_name().unwrap())).unwrap();
    }
    dir
}

fn open_err(path: &Path) -> String {
    GgufFile::open(path).unwrap_err().to_string()
}

#[test]
fn a_missing_shard_is_named() {
    let dir = copy_set();
    let gone = dir.path().join("tiny-q4_k_m-00003-of-00004.gguf");
    std::fs::remove_file(&gone).unwrap();
    for i in [1, 2, 4] {
        let err = open_err(&dir.path().join(shard(i).file_name().unwrap()));
        assert!(
            err.contains("shard 3 of 4") && err.contains(&gone.display().to_string()),
            "{err}"
        );
    }
}

#[test]
fn a_shard_of_another_position_or_set_is_an_error() {
    let dir = copy_set();
    // Shard 3's bytes where shard 2 belongs.
    let second = dir.path().join("tiny-q4_k_m-00002-of-00004.gguf");
    std::fs::copy(shard(3), &second).unwrap();
    let err = open_err(&dir.path().join(shard(1).file_name().unwrap()));
    assert!(
        err.contains(&second.display().to_string())
            && err.contains("expected shard 2 of 4, found shard 3 of 4"),
        "{err}"
    );
}

#[test]
fn a_shard_whose_name_hides_its_siblings_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let renamed = dir.path().join("model.gguf");
    std::fs::copy(shard(1), &renamed).unwrap();
    let err = open_err(&renamed);
    assert!(
        err.contains("shard 1 of 4") && err.contains("-00001-of-00004.gguf"),
        "{err}"
    );
}

/// A set written by hand: `shards[i]` lists shard `i`'s tensors (one F32 value each: its
/// position in the whole set), the first shard saying `tensors_count`.
fn write_set(dir: &Path, shards: &[&[&str]], tensors_count: i32) -> PathBuf {
    let count = shards.len() as u16;
    let mut value = 0.0f32;
    for (i, names) in shards.iter().enumerate() {
        let mut w = GgufWriter::new();
        if i == 0 {
            w.set("general.architecture", Value::string("llama"));
        }
        w.set(SPLIT_NO, Value::U16(i as u16));
        w.set(SPLIT_COUNT, Value::U16(count));
        w.set(SPLIT_TENSORS_COUNT, Value::I32(tensors_count));
        for n in names.iter() {
            w.add_tensor(n, &[1], DType::F32);
        }
        let path = dir.join(format!("m-{:05}-of-{count:05}.gguf", i + 1));
        let first = value;
        w.write(&path, |j| Ok((first + j as f32).to_le_bytes().to_vec()))
            .unwrap();
        value += names.len() as f32;
    }
    dir.join(format!("m-00001-of-{count:05}.gguf"))
}

#[test]
fn tensor_counts_and_duplicates_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ok = write_set(dir.path(), &[&["a", "b"], &["c"]], 3);
    let set = GgufFile::open(&ok).unwrap();
    assert_eq!(set.tensors().len(), 3);
    for (k, name) in ["a", "b", "c"].iter().enumerate() {
        let t = set.tensor_info(name).unwrap();
        assert_eq!(
            set.tensor_bytes(t).as_slice(),
            (k as f32).to_le_bytes(),
            "{name}"
        );
    }
    // Split keys on a single file (count 1, as llama-gguf-split writes for one file) are fine.
    let dir1 = tempfile::tempdir().unwrap();
    let one = write_set(dir1.path(), &[&["a", "b"]], 2);
    assert_eq!(GgufFile::open(&one).unwrap().tensors().len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let short = write_set(dir.path(), &[&["a", "b"], &["c"]], 4);
    let err = open_err(&short);
    assert!(
        err.contains("split.tensors.count is 4, but the 2 shards hold 3"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let twice = write_set(dir.path(), &[&["a", "b"], &["b"]], 3);
    let err = open_err(&twice);
    assert!(err.contains("tensor b is present in both"), "{err}");
}
