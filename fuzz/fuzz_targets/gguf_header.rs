//! Any byte string is either rejected with an error or describes tensors that lie inside it:
//! parsing never panics, every tensor it accepts can be sliced and decoded, and its split-set
//! keys (`split.count`, `split.no`) are read into a position or an error.
#![no_main]

use herd_formats::gguf::{parse_header, split_position};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_header(data) {
        if let Ok(Some((no, count))) = split_position(&h.metadata) {
            assert!(no < count, "shard {no} of {count} accepted");
        }
        for t in &h.tensors {
            let start = (h.data_start + t.offset) as usize;
            let bytes = &data[start..start + t.n_bytes as usize];
            // Decode a bounded prefix: whole blocks, at most 4096 elements.
            let bs = t.dtype.block_size();
            let blocks = (t.n_elements() as usize / bs).min(4096 / bs);
            let n = blocks * bs;
            let mut out = vec![0f32; n];
            herd_kernels::dtype::decode_into(t.dtype, &bytes[..t.dtype.bytes_for(n)], &mut out);
        }
    }
});
