"""Shared test fixtures: tiny random checkpoints written by `transformers` itself (the reference),
so every loader test reads files in exactly the format the Hub serves. Tests never download anything."""
import pytest
import torch

# Tiny shapes that still exercise GQA (4 query heads, 2 kv heads) and an odd vocabulary.
TINY = dict(vocab_size=123, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

ARCHS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, rms_norm_eps=1e-5)),
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6)),
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, rope_theta=10000.0)),
}


def make_hf_checkpoint(path, arch="llama3", dtype=torch.float32, seed=0, max_shard_size=None, **overrides):
    """Write a random tiny HF checkpoint of `arch` to `path` with transformers; return the HF model (eval)."""
    import transformers
    cfg_name, model_name, extra = ARCHS[arch]
    kw = {**TINY, **extra, **overrides}
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(dtype).eval()
    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), safe_serialization=True, **save_kw)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory fixture: hf_checkpoint(arch, **overrides) -> (dir, hf_model)."""
    def make(arch="llama3", **kw):
        d = tmp_path / f"ckpt_{arch}"
        return d, make_hf_checkpoint(d, arch, **kw)
    return make
