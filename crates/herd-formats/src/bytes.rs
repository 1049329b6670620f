use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;

/// The bytes of one tensor: a range of a memory-mapped file (shared, never copied) or an owned
/// buffer (tensors built in memory).
#[derive(Clone)]
pub struct TensorBytes {
    backing: Backing,
    range: Range<usize>,
}

#[derive(Clone)]
enum Backing {
    Mapped(Arc<Mmap>),
    Owned(Arc<Vec<u8>>),
}

impl TensorBytes {
    pub(crate) fn mapped(map: Arc<Mmap>, range: Range<usize>) -> Self {
        debug_assert!(range.end <= map.len());
        Self {
            backing: Backing::Mapped(map),
            range,
        }
    }

    pub fn owned(bytes: Vec<u8>) -> Self {
        let range = 0..bytes.len();
        Self {
            backing: Backing::Owned(Arc::new(bytes)),
            range,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.backing {
            Backing::Mapped(m) => &m[self.range.clone()],
            Backing::Owned(v) => &v[self.range.clone()],
        }
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// A sub-range of these bytes (e.g. one expert of a stacked expert tensor).
    pub fn slice(&self, range: Range<usize>) -> Self {
        assert!(range.end <= self.len(), "TensorBytes::slice out of range");
        let start = self.range.start + range.start;
        Self {
            backing: self.backing.clone(),
            range: start..start + range.len(),
        }
    }
}

impl fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.backing {
            Backing::Mapped(_) => "mapped",
            Backing::Owned(_) => "owned",
        };
        write!(f, "TensorBytes({kind}, {} bytes)", self.len())
    }
}
