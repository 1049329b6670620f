use crate::SUPPORTED_MODEL_TYPES;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] herd_formats::Error),
    #[error("config.json: {0}")]
    Config(String),
    #[error("unknown model_type {model_type:?}: this build supports {}", SUPPORTED_MODEL_TYPES.join(", "))]
    UnknownArchitecture { model_type: String },
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {found:?}, expected {expected:?} from the config")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} has element type {dtype}, which herd cannot compute with")]
    TensorDtype { name: String, dtype: String },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("KV cache type: {0}")]
    KvType(String),
    #[error("the KV cache is full: the step needs {needed} more blocks, {available} are available")]
    CacheFull { needed: usize, available: usize },
}

pub type Result<T> = std::result::Result<T, Error>;
