"""Tests for model.py: every property is checked against a reference rebuilt here, mostly `transformers`
itself on tiny random checkpoints it writes into tmp_path (conftest.make_hf_checkpoint), and the HF
tokenizer built from the same tokenizer.json (conftest.write_tokenizer).

Run:  .venv/bin/python -m pytest -q test_model.py
"""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import CORPUS, make_hf_checkpoint, write_tokenizer
from model import LoadError, ModelConfig, Tokenizer, Transformer, main, sample_next

ROOT = Path(__file__).parent


@pytest.fixture(autouse=True)
def _no_grad():  # this module only: other test files in the same session need autograd
    with torch.no_grad():
        yield


def tokens(B, T, V=123, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))

# -----------------------------------------------------------------------------
# config


def test_config_reads_transformers5_and_hub_flavours_alike(hf_checkpoint):
    d, hf = hf_checkpoint("llama3.2")
    cfg = ModelConfig.from_hf(d)
    raw = json.loads((d / "config.json").read_text())
    assert "rope_parameters" in raw and "dtype" in raw  # transformers 5 flavour
    hub = {k: v for k, v in raw.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(raw["rope_parameters"])
    hub.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype="float32", eos_token_id=[2, 7])
    c = hf.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
            cfg.head_dim, cfg.rms_norm_eps, cfg.tie_word_embeddings) == \
        (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
         c.num_key_value_heads, c.head_dim, c.rms_norm_eps, True)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3" and cfg.eos_token_id == [2]
    assert ModelConfig.from_hf_dict(hub) == replace(cfg, eos_token_id=[2, 7])
    assert ModelConfig.from_hf(d / "config.json") == cfg


def test_config_legacy_linear_rope_and_head_dim(hf_checkpoint):
    d, _ = hf_checkpoint("llama2", head_dim=32)
    raw = json.loads((d / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})  # pre-4.45 Hub spelling
    cfg = ModelConfig.from_hf_dict(raw)
    assert cfg.head_dim == 32 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_fingerprint_tracks_shapes_only():
    base = ModelConfig(vocab_size=123, hidden_size=64, n_layers=2)
    assert base.fingerprint() == ModelConfig(vocab_size=123, hidden_size=64, n_layers=2, rope_theta=1e6).fingerprint()
    assert base.fingerprint() != ModelConfig(vocab_size=123, hidden_size=64, n_layers=3).fingerprint()
    assert len(base.fingerprint()) == 12


@pytest.mark.parametrize("arch,kw", [("llama3.2", {}), ("qwen2", {}), ("mistral", {"sliding_window": 5})])
def test_to_hf_dict_is_read_back_by_transformers_and_by_us(tmp_path, arch, kw):
    import transformers
    src = tmp_path / "src"
    make_hf_checkpoint(src, arch, **kw)
    ours = Transformer.from_pretrained(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(ours.config.to_hf_dict()))
    sd = {k: v for k, v in ours.state_dict().items() if not (ours.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(sd, str(out / "model.safetensors"))
    assert ModelConfig.from_hf(out) == ours.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    idx = tokens(2, 12)
    torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=0)

# -----------------------------------------------------------------------------
# forward


CASES = {
    "llama3": ("llama3", {}), "llama2": ("llama2", {}), "llama3.2": ("llama3.2", {}), "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 5}),
    "llama2-linear-rope": ("llama2", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "qwen2-head-dim-tied": ("qwen2", {"head_dim": 32, "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(hf_checkpoint, case):
    arch, kw = CASES[case]
    d, hf = hf_checkpoint(arch, **kw)
    ours = Transformer.from_pretrained(d)
    idx = tokens(2, 20)
    diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs diff {diff}"
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_tied_checkpoint_that_also_stores_lm_head_loads(hf_checkpoint):
    d, hf = hf_checkpoint("llama3.2")
    _rewrite(d, lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"].clone()}))
    ours = Transformer.from_pretrained(d)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    idx = tokens(2, 12)
    torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_sharded_bf16_checkpoint_matches_transformers_in_bf16(hf_checkpoint):
    import transformers
    d, _ = hf_checkpoint("llama3", dtype=torch.bfloat16, max_shard_size="20KB")
    assert len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(d.glob("model-*.safetensors"))) > 3
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    ours = Transformer.from_pretrained(d)  # dtype from config.json
    assert ours.lm_head.weight.dtype == torch.bfloat16 and ours.config.dtype == "bfloat16"
    ref = hf.state_dict()
    for k, p in ours.state_dict().items():
        assert torch.equal(p, ref[k]), k
    idx = tokens(2, 12)
    torch.testing.assert_close(ours(idx).float(), hf(idx).logits.float(), atol=2e-2, rtol=2e-2)


def test_writing_to_loaded_weights_leaves_the_checkpoint_unchanged(hf_checkpoint):
    d, hf = hf_checkpoint("llama3")
    model = Transformer.from_pretrained(d)  # same dtype on the CPU: parameters map the file
    model.model.layers[0].mlp.up_proj.weight.add_(1.0)  # as merging an adapter in place would
    again = Transformer.from_pretrained(d)
    torch.testing.assert_close(again.model.layers[0].mlp.up_proj.weight, hf.model.layers[0].mlp.up_proj.weight,
                               atol=0, rtol=0)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, hf.model.layers[0].mlp.up_proj.weight + 1,
                               atol=0, rtol=0)


def test_from_pretrained_casts_to_requested_dtype(hf_checkpoint):
    d, hf = hf_checkpoint("qwen2", dtype=torch.bfloat16)
    ours = Transformer.from_pretrained(d, dtype="float32")
    assert all(p.dtype == torch.float32 for p in ours.parameters()) and ours.inv_freq.dtype == torch.float32
    torch.testing.assert_close(ours.model.layers[1].self_attn.q_proj.bias,
                               hf.model.layers[1].self_attn.q_proj.bias.float(), atol=0, rtol=0)


def test_cast_load_converts_in_chunks_and_drops_the_mapped_source(tmp_path, monkeypatch):
    import mmap
    import model as model_py
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))  # 4 MiB
    save_file({"a": torch.ones(5), "w": w}, str(tmp_path / "x.safetensors"))
    (st, shape, start), = [v for k, v in model_py.safetensors_header(tmp_path / "x.safetensors").items() if k == "w"]
    with open(tmp_path / "x.safetensors", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    src = torch.frombuffer(mm, dtype=torch.float32, count=w.numel(), offset=start)
    assert (st, shape) == ("F32", (1024, 1024)) and torch.equal(src.view(shape), w)  # maps every page
    out = model_py.copy_from_map(src, mm, start, torch.bfloat16, "cpu", chunk=100_000)  # edges inside pages
    assert torch.equal(out.view(shape), w.to(torch.bfloat16))
    smaps = Path("/proc/self/smaps").read_text().split(str(tmp_path / "x.safetensors"))[1]
    rss_kb = int(smaps.split("Rss:")[1].split()[0])
    assert rss_kb <= 8, f"{rss_kb} kB of the 4 MiB source still mapped"
    d, hf = tmp_path / "ckpt", make_hf_checkpoint(tmp_path / "ckpt", "llama3")
    chunked = model_py.copy_from_map
    monkeypatch.setattr(model_py, "copy_from_map", lambda *a: chunked(*a, chunk=100))  # edges inside rows
    ours = Transformer.from_pretrained(d, dtype="bfloat16")
    ref = hf.state_dict()
    for k, p in ours.state_dict().items():
        assert torch.equal(p, ref[k].to(torch.bfloat16)), k


def test_casting_a_loaded_model_keeps_rope_frequencies_exact(hf_checkpoint):
    d, _ = hf_checkpoint("llama3.2")
    idx = tokens(1, 96)
    direct = Transformer.from_pretrained(d, dtype="bfloat16")
    cast = Transformer.from_pretrained(d).to(torch.bfloat16)  # .to() casts the inv_freq buffer too
    assert torch.equal(direct(idx), cast(idx))


@pytest.mark.parametrize("arch,kw", [("llama3", {}), ("mistral", {"sliding_window": 4})])
def test_left_padded_batch_equals_unpadded_rows(hf_checkpoint, arch, kw):
    d, _ = hf_checkpoint(arch, **kw)
    model = Transformer.from_pretrained(d)
    rows = [tokens(1, n, seed=n)[0] for n in (9, 5, 7)]
    T = max(len(r) for r in rows)
    idx = torch.zeros(3, T, dtype=torch.long)
    am = torch.zeros(3, T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, T - len(r):], am[b, T - len(r):] = r, 1
    batched = model(idx, attention_mask=am)
    for b, r in enumerate(rows):
        torch.testing.assert_close(batched[b, T - len(r):], model(r[None])[0], atol=1e-5, rtol=1e-5)


def test_loss_ignores_minus_100_and_equals_manual_cross_entropy(hf_checkpoint):
    d, _ = hf_checkpoint("llama3")
    model = Transformer.from_pretrained(d)
    idx, targets = tokens(2, 10), tokens(2, 10, seed=1)
    targets[0, :4] = -100
    targets[1, 7:] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    lp = F.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    manual = -(lp * keep).sum() / keep.sum()
    torch.testing.assert_close(loss.double(), manual, atol=1e-5, rtol=1e-5)

def test_logits_to_keep_equals_transformers_and_the_tail_of_full_logits(hf_checkpoint):
    d, hf = hf_checkpoint("llama3")
    model = Transformer.from_pretrained(d)
    idx, targets = tokens(2, 10), tokens(2, 10, seed=1)
    tail = model(idx, logits_to_keep=2)
    assert tail.shape == (2, 2, 123)
    torch.testing.assert_close(tail, hf(idx, logits_to_keep=2).logits, atol=1e-4, rtol=0)
    am = torch.ones(2, 10, dtype=torch.long)
    am[0, :3] = 0  # left padding
    torch.testing.assert_close(model(idx, attention_mask=am, logits_to_keep=1), model(idx, attention_mask=am)[:, -1:])
    logits, loss = model(idx, targets, logits_to_keep=3)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets[:, -3:].flatten()))

# -----------------------------------------------------------------------------
# training paths: response-only loss, gradient checkpointing


def _loss_and_grads(model, *args, **kw):
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = model(*args, **kw)[1]
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch,chunk_rows", [("llama3", None), ("llama3", 4), ("llama3.2", 3)])  # 3.2: tied
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_response_only_loss_and_grads_equal_the_full_path(hf_checkpoint, arch, chunk_rows, reduction):
    d, _ = hf_checkpoint(arch)
    model = Transformer.from_pretrained(d)
    if chunk_rows:  # several chunks, each recomputed in backward
        model.loss_chunk = chunk_rows * model.config.vocab_size
    idx, targets = tokens(2, 12), tokens(2, 12, seed=1)
    targets[0, :7] = -100
    targets[1, 2:5] = -100
    full, full_grads = _loss_and_grads(model, idx, targets, reduction=reduction)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[:-1]))
    none, _ = model(idx, targets, return_logits=False, reduction=reduction)
    hook.remove()
    assert none is None and sum(r.numel() for r in rows) == (targets != -100).sum()  # lm_head on kept rows only
    assert all(r.numel() <= (chunk_rows or 24) for r in rows) and len(rows) == (1 if not chunk_rows else -(-14 // chunk_rows))
    loss, grads = _loss_and_grads(model, idx, targets, return_logits=False, reduction=reduction)
    torch.testing.assert_close(loss, full, atol=1e-5, rtol=1e-5)
    for n, g in full_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=1e-4, msg=n)


def test_response_loss_of_a_batch_without_targets_sums_to_zero_with_zero_grads(hf_checkpoint):
    d, _ = hf_checkpoint("llama3")
    model = Transformer.from_pretrained(d)
    targets = torch.full((2, 6), -100)
    loss, grads = _loss_and_grads(model, tokens(2, 6), targets, return_logits=False, reduction="sum")
    assert loss.item() == 0 and all(g.abs().sum() == 0 for g in grads.values())
    torch.testing.assert_close(loss, model(tokens(2, 6), targets, reduction="sum")[1])


def test_gradient_checkpointing_recomputes_blocks_with_equal_loss_and_grads(hf_checkpoint):
    d, _ = hf_checkpoint("qwen2")
    model = Transformer.from_pretrained(d).train()
    idx, targets = tokens(2, 9), tokens(2, 9, seed=1)
    calls = []
    model.model.layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    plain, plain_grads = _loss_and_grads(model, idx, targets)
    assert len(calls) == 1
    model.gradient_checkpointing = True
    loss, grads = _loss_and_grads(model, idx, targets)
    assert len(calls) == 3  # forward, then again in backward
    torch.testing.assert_close(loss, plain, atol=0, rtol=0)
    for n, g in plain_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=1e-5, msg=n)
    model.eval()(idx)  # not while evaluating
    assert len(calls) == 4

# -----------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("arch,kw", [("llama3", {}), ("qwen2", {}), ("mistral", {"sliding_window": 6})])
def test_greedy_generate_cached_equals_uncached_equals_transformers(hf_checkpoint, arch, kw):
    d, hf = hf_checkpoint(arch, **kw)
    model = Transformer.from_pretrained(d)
    idx, stop = tokens(2, 5), set(model.config.eos_token_id)
    cached = model.generate(idx, 16, stop_ids=stop)
    uncached = model.generate(idx, 16, stop_ids=stop, use_cache=False)
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=16, do_sample=False,
                      pad_token_id=model.config.eos_token_id[0] if stop else None)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)


def test_left_padded_generation_equals_each_row_alone(hf_checkpoint):
    d, _ = hf_checkpoint("llama3")
    model = Transformer.from_pretrained(d)
    rows = [tokens(1, n, seed=n)[0] for n in (6, 3)]
    idx = torch.stack([rows[0], torch.cat([torch.zeros(3, dtype=torch.long), rows[1]])])
    am = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    out = model.generate(idx, 10, attention_mask=am)
    for b, r in enumerate(rows):
        assert torch.equal(out[b, 6:], model.generate(r[None], 10)[0, len(r):])


def test_generation_stops_after_a_stop_id(hf_checkpoint):
    d, _ = hf_checkpoint("llama3")
    model = Transformer.from_pretrained(d)
    idx = tokens(1, 4)
    free = model.generate(idx, 20)[0, 4:].tolist()
    k = next(i for i in range(2, 20) if free[i] not in free[:i])  # a token first produced at step k
    out = model.generate(idx, 20, stop_ids={free[k]})[0, 4:].tolist()
    assert out == free[:k + 1]


def test_finished_rows_repeat_their_stop_id_while_others_continue(hf_checkpoint):
    d, _ = hf_checkpoint("llama3")
    model = Transformer.from_pretrained(d)
    idx = tokens(2, 4)
    free = model.generate(idx, 12)[:, 4:].tolist()
    k = next(i for i in range(1, 10) if free[0][i] not in free[1] + free[0][:i])  # a token only row 0 makes
    stop = free[0][k]
    out = model.generate(idx, 12, stop_ids={stop})[:, 4:].tolist()
    assert out[0] == free[0][:k + 1] + [stop] * (12 - k - 1)
    assert out[1] == free[1]


def test_sampling_follows_softmax_of_logits_over_temperature():
    torch.manual_seed(0)
    logits = torch.randn(12) * 2
    N, T = 40000, 0.7
    draws = sample_next(logits.expand(N, -1), temperature=T)
    freq = torch.bincount(draws, minlength=12).double() / N
    torch.testing.assert_close(freq, F.softmax(logits.double() / T, -1), atol=0.01, rtol=0)


def test_top_p_samples_only_the_nucleus_renormalised():
    torch.manual_seed(0)
    logits = torch.randn(12) * 2
    N, T, p = 40000, 1.3, 0.6
    probs = F.softmax(logits.double() / T, -1)
    nucleus, mass = [], 0.0  # reference: most probable first, until the mass reaches p
    for i in probs.argsort(descending=True).tolist():
        nucleus.append(i)
        mass += probs[i].item()
        if mass >= p:
            break
    ref = torch.zeros(12, dtype=torch.float64)
    ref[nucleus] = probs[nucleus] / probs[nucleus].sum()
    freq = torch.bincount(sample_next(logits.expand(N, -1), T, p), minlength=12).double() / N
    assert set(torch.nonzero(freq).flatten().tolist()) == set(nucleus)
    torch.testing.assert_close(freq, ref, atol=0.01, rtol=0)


def test_tiny_top_p_sampling_is_greedy(hf_checkpoint):
    d, _ = hf_checkpoint("llama3")
    model = Transformer.from_pretrained(d)
    idx = tokens(2, 4)
    assert torch.equal(model.generate(idx, 8, temperature=1.0, top_p=1e-6), model.generate(idx, 8))

# -----------------------------------------------------------------------------
# tokenizer


TEXTS = CORPUS[:6] + [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>",
    "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>", "a  \n\n  b\t\t x   ", "  leading and trailing  ",
    "1234567 + 89 = 1234656", "cafe\u0301 vs café", "", "🙂" * 3 + "\n\n\n", "don't STOP, WE'LL see",
]


@pytest.mark.parametrize("kind", ["json", "qwen2"])
def test_tokenizer_json_matches_hf_tokenizer(tmp_path, kind):
    from transformers import PreTrainedTokenizerFast
    write_tokenizer(tmp_path, kind)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.n_vocab == len(hf)
    for t in TEXTS:
        ids = tok.encode(t)
        assert ids == hf.encode(t, add_special_tokens=False), t
        assert tok.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)
    if kind == "json":  # Llama 3's post-processor prepends BOS
        assert tok.encode("hi", bos=True) == hf.encode("hi")
    spec = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok.bos_id == (hf.convert_tokens_to_ids(spec["bos_token"]) if spec["bos_token"] else None)
    assert tok.eos_id == hf.convert_tokens_to_ids(spec["eos_token"])
    assert tok.encode("x", eos=True)[-1] == tok.eos_id


def test_decode_round_trips_text_and_special_tokens(tmp_path):
    write_tokenizer(tmp_path, "json")
    tok = Tokenizer.from_pretrained(tmp_path)
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode("<|eot_id|>") == [tok.specials["<|eot_id|>"]]


def test_tiktoken_model_equals_equivalent_tokenizer_json(tmp_path):
    from transformers import PreTrainedTokenizerFast
    write_tokenizer(tmp_path / "tt", "tiktoken")
    write_tokenizer(tmp_path / "js", "json")
    assert not (tmp_path / "tt" / "tokenizer.json").exists()
    tt, js = Tokenizer.from_pretrained(tmp_path / "tt"), Tokenizer.from_pretrained(tmp_path / "js")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "js" / "tokenizer.json"))
    for t in TEXTS:
        assert tt.encode(t, bos=True) == hf.encode(t), t
    assert (tt.bos_id, tt.eos_id, tt.n_vocab, tt.fingerprint) == (js.bos_id, js.eos_id, js.n_vocab, js.fingerprint)
    assert tt.stop_ids == {hf.convert_tokens_to_ids("<|end_of_text|>"), hf.convert_tokens_to_ids("<|eot_id|>")}
    lines = (tmp_path / "tt" / "tokenizer.model").read_text().splitlines()
    lines[300], lines[301] = lines[300].split()[0] + " 301", lines[301].split()[0] + " 300"  # swap two ranks
    (tmp_path / "tt" / "tokenizer.model").write_text("\n".join(lines))
    assert Tokenizer.from_pretrained(tmp_path / "tt").fingerprint != tt.fingerprint


def test_stop_ids_include_generation_config_eos(hf_checkpoint):
    d, _ = hf_checkpoint("llama3", tokenizer="json")
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [5, 6]
    (d / "generation_config.json").write_text(json.dumps(gen))
    tok = Tokenizer.from_pretrained(d)
    assert {5, 6, tok.eos_id, tok.specials["<|eot_id|>"]} == tok.stop_ids


def test_sentencepiece_tokenizer_model_is_refused_in_one_line(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0c\n\x03<s>")
    with pytest.raises(LoadError, match="SentencePiece") as e:
        Tokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(e.value) and "use the checkpoint's tokenizer.json" in str(e.value)


# -----------------------------------------------------------------------------
# bad input: one line each, naming the problem


def _rewrite(d, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"))


def _edit_config(d, **kw):
    c = json.loads((d / "config.json").read_text())
    c.update(kw)
    (d / "config.json").write_text(json.dumps(c))


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


BAD = {
    "missing folder": (lambda d: None, "nope", "does not exist"),
    "missing config": (lambda d: (d / "config.json").unlink(), "", r"config.json not found"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "", "no model.safetensors"),
    "truncated": (lambda d: _truncate(d / "model.safetensors"), "", "is truncated or corrupt.*file not fully covered"),
    "corrupt header": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), "", "truncated or corrupt"),
    "missing key": (lambda d: _rewrite(d, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight")), "",
                    r"missing keys \[model\.layers\.1\.mlp\.up_proj\.weight\]"),
    "unexpected key": (lambda d: _rewrite(d, lambda sd: sd.update({"model.extra.weight": torch.zeros(2)})), "",
                       r"unexpected keys \[model\.extra\.weight\]"),
    "wrong shape": (lambda d: _edit_config(d, intermediate_size=80), "",
                    r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[96, 64\] but config.json implies \[80, 64\]"),
    "quantised tensor": (lambda d: _rewrite(d, lambda sd: sd.update(
        {"model.norm.weight": sd["model.norm.weight"].to(torch.int8)})), "", "model.norm.weight is stored as I8"),
    "unknown dtype in config": (lambda d: _edit_config(d, dtype="float8_e4m3fn"), "", "unsupported dtype 'float8_e4m3fn'"),
    "unknown architecture": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]), "",
                             "unsupported architecture 'GPT2LMHeadModel'"),
    "unknown rope type": (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "",
                          "unsupported rope type 'yarn'"),
    "unknown legacy rope type": (lambda d: _edit_config(d, rope_parameters=None, rope_scaling={"type": "dynamic"}),
                                 "", "unsupported rope type 'dynamic'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_raises_one_line_naming_the_problem(hf_checkpoint, case):
    mutate, sub, pattern = BAD[case]
    d, _ = hf_checkpoint("llama3")
    mutate(d)
    with pytest.raises(LoadError, match=pattern) as e:
        Transformer.from_pretrained(d / sub if sub else d)
    assert "\n" not in str(e.value)


def test_missing_shard_and_unsupported_dtype_argument(hf_checkpoint):
    d, _ = hf_checkpoint("llama3", max_shard_size="20KB")
    with pytest.raises(LoadError, match="unsupported dtype 'int8'"):
        Transformer.from_pretrained(d, dtype="int8")
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(LoadError, match=r"model-00002-of-\d+\.safetensors \(listed in model.safetensors.index.json\) is missing"):
        Transformer.from_pretrained(d)


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(LoadError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)

# -----------------------------------------------------------------------------
# command line


def test_cli_prints_the_greedy_completion(hf_checkpoint):
    d, _ = hf_checkpoint("llama3", tokenizer="json")
    tok, model = Tokenizer.from_pretrained(d), Transformer.from_pretrained(d)
    idx = torch.tensor([tok.encode("The quick brown fox", bos=True)])
    new = model.generate(idx, 12, stop_ids=tok.stop_ids)[0, idx.size(1):].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in tok.stop_ids), len(new))]
    r = subprocess.run([sys.executable, str(ROOT / "model.py"), "--model", str(d), "--prompt", "The quick brown fox",
                        "--max_new_tokens", "12"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(new) + "\n"


def test_cli_bad_input_exits_1_with_one_error_line(tmp_path, capsys):
    r = subprocess.run([sys.executable, str(ROOT / "model.py"), "--model", str(tmp_path / "nope"), "--prompt", "x"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    for argv in (["--prompt", "x"], ["--model", str(tmp_path), "--prompt", "x"],
                 ["--model", str(tmp_path), "--prompt", "x", "--dtype", "int4"],
                 ["--model", str(tmp_path), "--prompt", "x", "--max_new_tokens", "many"],
                 *([["--model", str(tmp_path), "--prompt", "x", "--device", "cuda"]] if not torch.cuda.is_available() else [])):
        write_tokenizer(tmp_path, "json")
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
