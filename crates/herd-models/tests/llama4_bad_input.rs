//! Broken checkpoints and bad batches give clear errors, never a panic.

use std::path::{Path, PathBuf};

use herd_models::{Batch, Error, load_hf_dir};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/llama4")
        .join(name)
}

/// A writable copy of a fixture directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> Error {
    match load_hf_dir(dir) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e,
    }
}

/// Rewrite model.safetensors with `edit` applied to its (name, shape, bytes) list.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn missing_shard() {
    let dir = copy_fixture("top2_nope2_sharded");
    std::fs::remove_file(dir.path().join("model-00003-of-00014.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.to_string().contains("model-00003-of-00014.safetensors"),
        "{err}"
    );
    assert!(
        matches!(err, Error::Format(herd_formats::Error::MissingShard { .. })),
        "{err}"
    );
}

#[test]
fn truncated_shard() {
    let dir = copy_fixture("top2_nope2_sharded");
    let shard = dir.path().join("model-00005-of-00014.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 3]).unwrap();
    let err = load_err(dir.path());
    assert!(
        matches!(err, Error::Format(herd_formats::Error::Safetensors { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("model-00005-of-00014.safetensors"),
        "{err}"
    );
}

#[test]
fn tensor_of_the_wrong_shape() {
    let dir = copy_fixture("maverick_like");
    rewrite_weights(dir.path(), |ts| {
        let q = ts
            .iter_mut()
            .find(|t| t.0 == "model.layers.1.self_attn.q_proj.weight")
            .unwrap();
        q.1 = vec![q.1[1], q.1[0]];
    });
    let err = load_err(dir.path());
    assert!(
        matches!(&err, Error::TensorShape { name, expected, found }
            if name == "model.layers.1.self_attn.q_proj.weight" && expected == &[64, 32] && found == &[32, 64]),
        "{err}"
    );
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture("maverick_like");
    rewrite_weights(dir.path(), |ts| {
        ts.retain(|t| t.0 != "model.layers.3.feed_forward.experts.down_proj")
    });
    let err = load_err(dir.path());
    assert!(
        matches!(&err, Error::MissingTensor { name } if name.ends_with("experts.down_proj")),
        "{err}"
    );
}

#[test]
fn unknown_model_type() {
    let dir = copy_fixture("maverick_like");
    edit_config(dir.path(), |c| c["model_type"] = "llama5".into());
    let err = load_err(dir.path());
    assert!(
        matches!(err, Error::UnknownArchitecture { ref model_type } if model_type == "llama5"),
        "{err}"
    );
    assert!(
        err.to_string().contains("llama4_text"),
        "names what is supported: {err}"
    );
}

#[test]
fn config_missing_a_required_key() {
    let dir = copy_fixture("maverick_like");
    edit_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("model_type");
    });
    assert!(load_err(dir.path()).to_string().contains("model_type"));

    let dir = copy_fixture("multimodal_layout");
    edit_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("text_config");
    });
    assert!(load_err(dir.path()).to_string().contains("text_config"));

    let dir = copy_fixture("maverick_like");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(load_err(dir.path()).to_string().contains("config.json"));
}

#[test]
fn config_that_disagrees_with_the_weights() {
    // A config that lost a key falls back to HF's default, which then fails the shape check.
    let dir = copy_fixture("maverick_like");
    edit_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("head_dim");
    });
    assert!(matches!(load_err(dir.path()), Error::TensorShape { .. }));
}

#[test]
fn bad_batches_are_errors() {
    let model = load_hf_dir(&fixture("maverick_like")).unwrap();
    let mut cache = model.new_cache();
    let gap = Batch::sequence(0, &[1, 2, 3], 5);
    assert!(matches!(
        model.forward(&gap, &mut cache, None),
        Err(Error::Batch(_))
    ));
    let oov = Batch::sequence(0, &[1, 100_000], 0);
    assert!(matches!(
        model.forward(&oov, &mut cache, None),
        Err(Error::Batch(_))
    ));
    assert_eq!(
        cache.seq_len(0),
        0,
        "a rejected batch leaves the cache untouched"
    );
    model
        .forward(&Batch::sequence(0, &[1, 2], 0), &mut cache, None)
        .unwrap();
    let repeat = Batch::sequence(0, &[3], 1);
    assert!(
        model.forward(&repeat, &mut cache, None).is_err(),
        "position already cached"
    );
}
