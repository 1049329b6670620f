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

    /// Tell the OS that the mapped pages lying wholly inside these bytes are not needed now
    /// (the tensor was copied elsewhere, e.g. repacked for the kernels), so they leave resident
    /// memory; a later read faults them back in from the file. The range is trimmed inward to
    /// 64 KiB boundaries, valid for every page size up to that. Owned bytes are left alone;
    /// failure (an OS without `madvise`) only costs memory, so it is logged, not returned.
    pub fn release_pages(&self) {
        const ALIGN: usize = 64 * 1024;
        let Backing::Mapped(map) = &self.backing else {
            return;
        };
        let start = self.range.start.next_multiple_of(ALIGN);
        let end = self.range.end / ALIGN * ALIGN;
        if end <= start {
            return;
        }
        #[cfg(unix)]
        {
            // SAFETY: the map is read-only and file-backed, so dropping its pages loses
            // nothing: every later read of them reloads the file's bytes. Offsets from the
            // map's start are 64 KiB-aligned, within the map (range.end <= map.len()).
            let r = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
            if let Err(e) = r {
                tracing::debug!("madvise(DONTNEED) on {} bytes failed: {e}", end - start);
            }
        }
        #[cfg(not(unix))]
        let _ = map;
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
