#!/usr/bin/env python3
"""Write a Hugging Face Llama 4 checkpoint with random bf16 weights in the benchmark shape
(`llama4:scout-4b`, crates/herd-models/src/presets.rs), for timing `--quantize` at load against
the GGUF `herd quantize` makes from the same directory (docs/performance.md):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install numpy==2.3.5
    .venv-bench/bin/python bench/hf_random.py bench/models/scout-4b-bf16

Layout as transformers' Llama4ForCausalLM saves it: `model.…` decoder tensors, `lm_head.weight`,
the fused expert tensors `experts.gate_up_proj [E, H, 2I]` and `experts.down_proj [E, I, H]`.
Weights are N(0, 0.02²) rounded to bf16 (norms are ones), so the model computes finite values;
only speed is measured on it. The tokenizer is the tiny test fixture's (tokens beyond it are
unnamed), enough for `herd quantize` to write a GGUF.
"""

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

# The text config of the preset llama4:scout-4b (keep in step with presets.rs).
CONFIG = {
    "architectures": ["Llama4ForCausalLM"],
    "model_type": "llama4_text",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 2048,
    "intermediate_size_mlp": 4096,
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,
    "max_position_embeddings": 10485760,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
    "attention_chunk_size": 8192,
    "use_qk_norm": True,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}

FIXTURE = Path(__file__).resolve().parent.parent / "tests/fixtures/llama4_gguf"


def tensors(c):
    """(name, shape, is_norm) in the order the file stores them."""
    h, v, e = c["hidden_size"], c["vocab_size"], c["num_local_experts"]
    d, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    i, im = c["intermediate_size"], c["intermediate_size_mlp"]
    yield "lm_head.weight", (v, h), False
    yield "model.embed_tokens.weight", (v, h), False
    yield "model.norm.weight", (h,), True
    moe_step = c["interleave_moe_layer_step"]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        yield f"{p}.input_layernorm.weight", (h,), True
        yield f"{p}.post_attention_layernorm.weight", (h,), True
        yield f"{p}.self_attn.q_proj.weight", (nh * d, h), False
        yield f"{p}.self_attn.k_proj.weight", (nkv * d, h), False
        yield f"{p}.self_attn.v_proj.weight", (nkv * d, h), False
        yield f"{p}.self_attn.o_proj.weight", (h, nh * d), False
        if (layer + 1) % moe_step == 0:
            f = f"{p}.feed_forward"
            yield f"{f}.router.weight", (e, h), False
            yield f"{f}.experts.gate_up_proj", (e, h, 2 * i), False
            yield f"{f}.experts.down_proj", (e, i, h), False
            for part, shape in [("gate", (i, h)), ("up", (i, h)), ("down", (h, i))]:
                yield f"{f}.shared_expert.{part}_proj.weight", shape, False
        else:
            for part, shape in [("gate", (im, h)), ("up", (im, h)), ("down", (h, im))]:
                yield f"{p}.feed_forward.{part}_proj.weight", shape, False


def bf16(values):
    """float32 → bf16 bits, rounded to nearest even."""
    bits = values.astype(np.float32).view(np.uint32)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16)


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/models/scout-4b-bf16")
    out.mkdir(parents=True, exist_ok=True)
    table = list(tensors(CONFIG))
    header, offset = {}, 0
    for name, shape, _ in table:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(0)
    chunk = 1 << 24
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for k, (name, shape, is_norm) in enumerate(table):
            n = int(np.prod(shape))
            print(f"\r{k + 1}/{len(table)} {name:<60}", end="", file=sys.stderr, flush=True)
            if is_norm:
                f.write(bf16(np.ones(n, np.float32)).tobytes())
                continue
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                f.write(bf16(rng.standard_normal(m, np.float32) * 0.02).tobytes())
    print(file=sys.stderr)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(FIXTURE / name, out / name)
    print(f"wrote {out} ({offset / 1e9:.2f} GB of weights)")


if __name__ == "__main__":
    main()
