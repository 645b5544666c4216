"""Tests of the soft-prompt methods, prompt tuning (Lester et al., 2021) and P-tuning v2 (Liu et al., 2022):
adapters.py's PromptTuning / PTuningV2 and model.py's Transformer.add_soft_prompt, against references rebuilt
here: peft's PromptTuning / PrefixTuning on the same tiny transformers checkpoint (logits, loss, gradients,
greedy generation), transformers fed the prompt as input embeddings or the prefix as a DynamicCache, the base
model fed the sampled vocabulary tokens, the parameter formulas, and our own forward without cache or padding.
Also: save/load, eval_mmlu with a saved prompt adapter, and one tiny train.py run per method. Run:
    python -m pytest -q test_prompts.py
"""
import copy
import json

import pytest
import torch

import adapters
import eval_mmlu as E
from adapters import AdapterConfig, export_merged, export_peft, inject, load_adapter, merge, param_report, save_adapter
from conftest import make_hf_checkpoint
from model import ModelConfig, Transformer
from test_adapters import check_save_load_round_trip, randomize, tiny_cfg, tiny_model
from test_eval import MMLU, checkpoint
from test_train import base, cli, metrics, weights  # noqa: F401  (base: the tiny-run fixture)

P = 5
VARIANTS = {
    "prompt_tuning": dict(adapter="prompt_tuning", num_virtual_tokens=P),
    "prompt_tuning_random": dict(adapter="prompt_tuning", num_virtual_tokens=P, prompt_init="random"),
    "p_tuning_v2": dict(adapter="p_tuning_v2", num_virtual_tokens=P),
    "p_tuning_v2_mlp": dict(adapter="p_tuning_v2", num_virtual_tokens=P, prefix_projection=True, prefix_hidden=24),
}


def acfg_of(name, **kw):
    return AdapterConfig(**{**VARIANTS[name], **kw})


def prompted(name, seed=0, **kw):
    """(tiny base model, the same model with the soft prompt injected): two independent copies."""
    base_model = tiny_model(seed=seed).eval()
    model = copy.deepcopy(base_model)
    inject(model, acfg_of(name, **kw))
    return base_model, model.eval()


def tokens(B, T, V=61, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def left_pad(rows, pad=0):
    """Rows of ids -> (idx (B, T), attention_mask (B, T)) left padded to the longest."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):], am[i, T - len(r):] = torch.as_tensor(r), 1
    return idx, am


def prefix_of(sp):
    """P-tuning v2's per-layer keys and values (L, 2, Hkv, P, D), rebuilt from the named parameters with plain
    torch ops (the MLP written out: W2 tanh(W1 E + b1) + b2, one row of 2·L·kv per virtual token)."""
    L, P_, Hkv, D = sp.L, sp.P, sp.n_kv, sp.D
    if sp.projection:
        flat = torch.tanh(sp.E @ sp.W1.T + sp.b1) @ sp.W2.T + sp.b2        # (P, 2·L·kv): [layer][K|V][head][d]
        per = flat.view(P_, L, 2, Hkv, D)
        return torch.stack([torch.stack([per[:, l, j].transpose(0, 1) for j in range(2)]) for l in range(L)])
    return sp.prefix.view(L, 2, P_, Hkv, D).transpose(2, 3)


# -----------------------------------------------------------------------------
# config, bad input, parameter counts


def test_method_defaults_and_flags():
    pt, v2 = AdapterConfig(adapter="prompt_tuning"), AdapterConfig(adapter="p_tuning_v2")
    assert (pt.num_virtual_tokens, pt.prompt_init, pt.targets, pt.target_list) == (20, "vocab", "", [])
    assert (v2.num_virtual_tokens, v2.prefix_projection, v2.prefix_hidden, v2.target_list) == (20, False, 512, [])
    assert AdapterConfig(adapter="lora").target_list == list(adapters.TARGETS)  # others keep their defaults
    import argparse
    ap = adapters.add_dataclass_args(argparse.ArgumentParser(), AdapterConfig)
    ns = ap.parse_args("--adapter p_tuning_v2 --num_virtual_tokens 7 --prefix_projection --prefix_hidden 64".split())
    assert adapters.dataclass_from_args(AdapterConfig, ns) == AdapterConfig(
        adapter="p_tuning_v2", num_virtual_tokens=7, prefix_projection=True, prefix_hidden=64)


@pytest.mark.parametrize("kw,msg", [
    (dict(adapter="prompt_tuning", num_virtual_tokens=0), "num_virtual_tokens \\(P\\) must be >= 1, got 0"),
    (dict(adapter="p_tuning_v2", prefix_hidden=0), "prefix_hidden \\(h\\) must be >= 1"),
    (dict(adapter="prompt_tuning", prompt_init="text"), "unknown prompt_init 'text': choose vocab or random"),
    (dict(adapter="prompt_tuning", targets="q_proj"), "targets do not apply to prompt_tuning: .* drop --targets"),
    (dict(adapter="p_tuning_v2", targets="q_proj,v_proj"), "targets do not apply to p_tuning_v2")])
def test_bad_config_is_refused_with_one_line(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        inject(tiny_model(L=2), AdapterConfig(**kw))
    assert "\n" not in str(e.value)


def test_inject_refuses_a_model_without_soft_prompt_support():
    with pytest.raises(ValueError, match="prompt_tuning needs model.py's Transformer") as e:
        inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), AdapterConfig(adapter="prompt_tuning"))
    assert "\n" not in str(e.value)


def spec_count(acfg, cfg):
    """Prompt tuning: P·hidden. P-tuning v2: 2·L·P·n_kv·head_dim, plus with the MLP: E (P, hidden), W1 (h, hidden)
    + b1 (h), W2 (2·L·kv, h) + b2 (2·L·kv)."""
    P_, C, L, kv = acfg.num_virtual_tokens, cfg.hidden_size, cfg.n_layers, cfg.n_kv_heads * cfg.head_dim
    if acfg.adapter == "prompt_tuning":
        return P_ * C
    if not acfg.prefix_projection:
        return 2 * L * P_ * kv
    h = acfg.prefix_hidden
    return P_ * C + (C + 1) * h + (h + 1) * 2 * L * kv


@pytest.mark.parametrize("L,hidden,inter", [(5, 32, 48), (4, 48, 40), (7, 16, 64)])
@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_formula(L, hidden, inter, name):
    cfg = tiny_cfg(L, hidden=hidden, inter=inter)
    with torch.device("meta"):
        model = Transformer(cfg)
    base_count = sum(p.numel() for p in model.parameters())
    acfg = acfg_of(name)
    params = inject(model, acfg)
    rep = param_report(model)
    want = spec_count(acfg, cfg)
    assert rep["trainable"] == sum(p.numel() for p in params) == want and rep["base"] == base_count
    assert rep["percent"] == pytest.approx(100 * want / (base_count + want))
    assert rep["by_type"] == {} and rep["prompt"]["P"] == P
    if acfg.adapter == "p_tuning_v2":  # the keys/values the forward uses, whether or not an MLP produces them
        assert rep["prompt"]["prefix"] == 2 * L * P * cfg.n_kv_heads * cfg.head_dim


@pytest.mark.parametrize("extra", [[], ["--prefix_projection"]])
@pytest.mark.parametrize("adapter", ["prompt_tuning", "p_tuning_v2"])
def test_cli_param_report_llama3_8b(capsys, adapter, extra):
    """Llama-3-8B (L 32, hidden 4096, 8 kv heads of 128) with the defaults P = 20, h = 512."""
    adapters.main(["--model", "llama3-8b", "--adapter", adapter, "--json", *extra])
    rep = json.loads(capsys.readouterr().out)
    kv = 8 * 128
    want = {"prompt_tuning": 20 * 4096, "p_tuning_v2": 2 * 32 * 20 * kv}[adapter]
    if extra:
        want = 20 * 4096 + 4097 * 512 + 513 * 2 * 32 * kv if adapter == "p_tuning_v2" else want
    assert rep["trainable"] == want and rep["base"] == 8_030_261_248
    adapters.main(["--model", "llama3-8b", "--adapter", adapter, *extra])  # the readable table
    assert f"{adapter}: P = 20 virtual tokens" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# initialisation: not the identity, and what the papers' code starts from


@pytest.mark.parametrize("name", VARIANTS)
def test_is_not_identity_at_init(name):
    """A soft prompt changes the output from step 0 (there is no zero init: the P tokens are attended to)."""
    base_model, model = prompted(name)
    idx = tokens(2, 7)
    with torch.no_grad():
        ref, out = base_model(idx), model(idx)
    assert out.shape == ref.shape
    assert (out - ref).abs().amax(-1).min() > 1e-3  # every position differs (all of them see the prompt)


def test_prompt_tuning_vocab_init_is_sampled_rows_and_equals_those_tokens_as_input():
    """Lester et al. §3.2 ("sampled vocab"): each of the P prompt rows is a different row among the first 5000 of
    embed_tokens, so at init the prompted model equals the base model reading those token ids first."""
    cfg = ModelConfig(vocab_size=6000, hidden_size=16, intermediate_size=24, n_layers=2, n_heads=2, n_kv_heads=1,
                      head_dim=8)
    torch.manual_seed(0)
    base_model = Transformer(cfg).eval()
    model = copy.deepcopy(base_model)
    inject(model, AdapterConfig(adapter="prompt_tuning", num_virtual_tokens=20, seed=3))
    W, Pe = base_model.model.embed_tokens.weight, model.soft_prompt.E
    ids = [int((W == row).all(1).nonzero()[0, 0]) for row in Pe]  # which vocabulary row each prompt row is
    assert all(torch.equal(W[i], row) for i, row in zip(ids, Pe)) and Pe.dtype == torch.float32
    assert len(set(ids)) == 20 and max(ids) < 5000
    idx = tokens(2, 6, V=6000)
    with torch.no_grad():
        want = base_model(torch.cat([torch.tensor(ids).expand(2, -1), idx], 1))[:, 20:]
        torch.testing.assert_close(model(idx), want, rtol=1e-6, atol=1e-6)
    other = copy.deepcopy(base_model)
    inject(other, AdapterConfig(adapter="prompt_tuning", num_virtual_tokens=20, seed=4))
    assert not torch.equal(other.soft_prompt.E, Pe)  # the seed picks the rows


def test_prompt_tuning_random_init_is_uniform_half():
    """Their code's default initializer: uniform with scale 0.5, i.e. U(-0.5, 0.5)."""
    _, model = prompted("prompt_tuning_random", num_virtual_tokens=40)
    Pe = model.soft_prompt.E
    assert Pe.abs().max() <= 0.5 and Pe.max() - Pe.min() > 0.9
    assert Pe.std().item() == pytest.approx(1 / 12 ** 0.5, rel=0.1)


def test_p_tuning_v2_init_follows_its_code():
    """P-tuning v2's PrefixEncoder (and peft's): nn.Embedding's N(0, 1); the MLP's Linears nn.Linear's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    _, model = prompted("p_tuning_v2", num_virtual_tokens=20)
    prefix = model.soft_prompt.prefix  # (L, 2, P, kv) = (5, 2, 20, 16): 3200 draws
    assert prefix.shape == (5, 2, 20, 16) and prefix.dtype == torch.float32
    assert abs(prefix.mean().item()) < 0.1 and prefix.std().item() == pytest.approx(1.0, rel=0.1)
    _, model = prompted("p_tuning_v2_mlp", num_virtual_tokens=20)
    sp = model.soft_prompt
    assert sp.E.std().item() == pytest.approx(1.0, rel=0.15)
    for t, fan_in in ((sp.W1, 32), (sp.b1, 32), (sp.W2, 24), (sp.b2, 24)):
        assert t.abs().max() <= fan_in ** -0.5 and t.abs().max() > 0.8 * fan_in ** -0.5


# -----------------------------------------------------------------------------
# forward: the formulas through transformers, and peft


def hf_reference(hf, model, idx):
    """transformers' logits for our soft prompt, without peft: prompt tuning = the base model reading
    inputs_embeds [P_e; X_e] (positions 0..P+T-1, the first P logits dropped); P-tuning v2 = the base model with
    a DynamicCache already holding the P prefix keys/values at every layer, real tokens at positions P..P+T-1."""
    from transformers import DynamicCache
    sp, (B, T) = model.soft_prompt, idx.shape
    with torch.no_grad():
        if not sp.deep:
            x = torch.cat([sp.E.expand(B, -1, -1), hf.get_input_embeddings()(idx)], 1)
            return hf(inputs_embeds=x).logits[:, sp.P:]
        cache = DynamicCache(config=hf.config)
        for l, (k, v) in enumerate(prefix_of(sp)):
            cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), l)
        return hf(input_ids=idx, past_key_values=cache, attention_mask=torch.ones(B, sp.P + T, dtype=torch.long),
                  position_ids=sp.P + torch.arange(T).expand(B, T)).logits


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_equals_transformers_formula(tmp_path, name, arch):
    hf = make_hf_checkpoint(tmp_path / "m", arch)
    ours = Transformer.from_pretrained(tmp_path / "m").eval()
    inject(ours, acfg_of(name))
    idx = tokens(2, 9, V=123)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf_reference(hf, ours, idx), rtol=1e-4, atol=1e-5)


def peft_twin(hf, ours):
    """peft's PromptTuning / PrefixTuning model on the same base, holding our soft prompt's values."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    sp = ours.soft_prompt
    if not sp.deep:
        pm = get_peft_model(hf, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=sp.P))
        with torch.no_grad():
            pm.prompt_encoder["default"].embedding.weight.copy_(sp.E)
        return pm
    h = sp.W1.shape[0] if sp.projection else None
    pm = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=sp.P,
                                               prefix_projection=sp.projection, encoder_hidden_size=h))
    enc = pm.prompt_encoder["default"]
    with torch.no_grad():
        if sp.projection:  # peft's layout: embedding, transform = Linear, Tanh, Linear
            for dst, src in ((enc.embedding.weight, sp.E), (enc.transform[0].weight, sp.W1),
                             (enc.transform[0].bias, sp.b1), (enc.transform[2].weight, sp.W2),
                             (enc.transform[2].bias, sp.b2)):
                dst.copy_(src)
        else:  # peft: one (P, L·2·kv) embedding, each row [layer][K|V][head][d]; ours (L, 2, P, kv)
            enc.embedding.weight.copy_(sp.prefix.permute(2, 0, 1, 3).reshape(sp.P, -1))
    return pm


def peft_grads(pm, ours):
    """peft's gradients mapped onto our parameter names."""
    sp, enc = ours.soft_prompt, pm.prompt_encoder["default"]
    if not sp.deep:
        return {"E": enc.embedding.weight.grad}
    if sp.projection:
        return {"E": enc.embedding.weight.grad, "W1": enc.transform[0].weight.grad, "b1": enc.transform[0].bias.grad,
                "W2": enc.transform[2].weight.grad, "b2": enc.transform[2].bias.grad}
    g = enc.embedding.weight.grad  # (P, L·2·kv)
    return {"prefix": g.view(sp.P, sp.L, 2, -1).permute(1, 2, 0, 3)}


# P-tuning v2 with the MLP on llama2 (no GQA): peft feeds its MLP a token_dim = n_kv·head_dim embedding, the
# paper's code a hidden_size one; the two agree only when n_kv·head_dim = hidden.
@pytest.mark.parametrize("name,arch", [("prompt_tuning", "llama3"), ("prompt_tuning", "qwen2"),
                                       ("p_tuning_v2", "llama3"), ("p_tuning_v2", "qwen2"),
                                       ("p_tuning_v2_mlp", "llama2")])
def test_matches_peft(tmp_path, name, arch):
    """Logits, the loss over the response tokens and the gradient of every trainable tensor equal peft's on the
    same weights; so does greedy generation (peft drives transformers' generate and its KV cache)."""
    hf = make_hf_checkpoint(tmp_path / "m", arch)
    ours = Transformer.from_pretrained(tmp_path / "m")
    inject(ours, acfg_of(name, prefix_hidden=24))
    randomize(ours)  # also moves peft's copy off anything that init alone would match
    pm = peft_twin(hf, ours)
    idx = tokens(2, 9, V=123)
    labels = idx.clone()
    labels[:, :4] = -100  # a "prompt" part without loss, as in instruction tuning
    tgt = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)  # ours takes targets already shifted
    out = pm(input_ids=idx, labels=labels)
    logits, loss = ours(idx, tgt)
    torch.testing.assert_close(logits, out.logits[:, -idx.size(1):], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    out.loss.backward()
    theirs = peft_grads(pm, ours)
    for n, p in ours.soft_prompt.named_parameters():
        torch.testing.assert_close(p.grad, theirs[n], rtol=1e-4, atol=1e-6)
    pm.eval(), ours.eval()
    with torch.no_grad():
        want = pm.generate(input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=6, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(ours.generate(idx, 6), want)


@pytest.mark.parametrize("name", ["p_tuning_v2", "p_tuning_v2_mlp"])
def test_left_padded_p_tuning_v2_matches_peft_given_position_ids(tmp_path, name):
    """With left padding peft's prefix tuning offsets the position ids it is given by P (ours count real tokens
    from P): on the real positions the logits agree. (peft's prompt tuning drops position ids, and transformers
    then numbers padding too, so left-padded prompt tuning is checked against unpadded rows below.)"""
    hf = make_hf_checkpoint(tmp_path / "m", "llama2")
    ours = Transformer.from_pretrained(tmp_path / "m").eval()
    inject(ours, acfg_of(name, prefix_hidden=24))
    randomize(ours)
    pm = peft_twin(hf, ours).eval()
    idx, am = left_pad([tokens(1, 9, V=123)[0].tolist(), tokens(1, 5, V=123, seed=1)[0].tolist()])
    with torch.no_grad():
        want = pm(input_ids=idx, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
        got = ours(idx, attention_mask=am)
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


# -----------------------------------------------------------------------------
# the forward's other paths: left padding, the KV cache, generate, logits_to_keep, checkpointing, bf16


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padded_batch_equals_unpadded_rows(name):
    """The P virtual tokens are seen by every real token of a left-padded row, and padding changes nothing."""
    _, model = prompted(name)
    randomize(model)
    rows = [tokens(1, 8)[0].tolist(), tokens(1, 3, seed=1)[0].tolist(), tokens(1, 6, seed=2)[0].tolist()]
    idx, am = left_pad(rows)
    with torch.no_grad():
        out = model(idx, attention_mask=am)
        for i, r in enumerate(rows):
            torch.testing.assert_close(out[i, -len(r):], model(torch.tensor([r]))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decoding_equals_the_uncached_forward(name, padded):
    """Prefill 4 tokens into make_cache()'s buffers, then feed one token at a time: every step's logits equal
    the uncached forward of the whole sequence; generate() cached == uncached == each row alone."""
    _, model = prompted(name)
    randomize(model)
    rows = [tokens(1, 9)[0].tolist(), tokens(1, 6, seed=1)[0].tolist() if padded else tokens(1, 9, seed=1)[0].tolist()]
    idx, am = left_pad(rows)
    am = am if padded else None
    with torch.no_grad():
        full = model(idx, attention_mask=am)
        cache = model.make_cache(2, idx.size(1))
        assert cache[0][0].shape[2] == P + idx.size(1)  # the virtual positions take P slots
        steps = [model(idx[:, :4], attention_mask=None if am is None else am[:, :4], cache=cache)]
        for t in range(4, idx.size(1)):
            steps.append(model(idx[:, t:t + 1], attention_mask=None if am is None else am[:, :t + 1], cache=cache,
                               start_pos=t))
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        cached = model.generate(idx, 5, attention_mask=am)
        assert torch.equal(cached, model.generate(idx, 5, attention_mask=am, use_cache=False))
        for i, r in enumerate(rows):
            alone = model.generate(torch.tensor([r]), 5)
            assert cached[i, -5:].tolist() == alone[0, -5:].tolist()


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_to_keep_and_response_loss_equal_the_full_path(name):
    _, model = prompted(name)
    randomize(model)
    idx, tgt = tokens(2, 8), tokens(2, 8, seed=1)
    tgt[:, :3] = -100
    full, loss = model(idx, tgt)
    # not bit for bit: the LM head runs on 3 rows instead of 8, which changes the BLAS blocking with 2+ threads
    torch.testing.assert_close(model(idx, logits_to_keep=3), full[:, -3:], rtol=1e-5, atol=1e-6)
    _, tail_loss = model(idx, tgt, logits_to_keep=5)  # targets cut alike: the last 5 hold every target
    torch.testing.assert_close(tail_loss, loss, rtol=1e-6, atol=1e-6)
    _, rl = model(idx, tgt, return_logits=False)
    torch.testing.assert_close(rl, loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_reaches_the_prompt_parameters_only(name):
    _, model = prompted(name)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p is q for p, q in zip(params, model.soft_prompt.parameters()))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapters.adapter_params(model))
    model.train()
    loss = model(tokens(2, 8), tokens(2, 8, seed=1))[1]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_v2"])
def test_gradient_checkpointing_gives_equal_loss_and_grads(name):
    _, model = prompted(name)
    model.train()
    idx, tgt = tokens(2, 8), tokens(2, 8, seed=1)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(idx, tgt)[1].backward()
        grads.append([p.grad.clone() for p in model.soft_prompt.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_v2_mlp"])
def test_fp32_prompt_on_a_bf16_base(name):
    base32, m32 = prompted(name)
    m16 = copy.deepcopy(base32).to(torch.bfloat16)
    inject(m16, acfg_of(name))
    with torch.no_grad():
        for a, b in zip(m16.soft_prompt.parameters(), m32.soft_prompt.parameters()):
            a.copy_(b)
    assert all(p.dtype == torch.float32 for p in m16.soft_prompt.parameters())
    idx = tokens(2, 6)
    with torch.no_grad():
        out = m16(idx)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), m32(idx), rtol=5e-2, atol=5e-2)
        assert m16.generate(idx, 3).shape == (2, 9)


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_v2"])
def test_dropout_acts_on_the_prompt_in_training_only(name):
    """`dropout` drops entries of the prompt (P-tuning v2's code: of the prefix keys/values) in training only."""
    _, model = prompted(name, dropout=0.5)
    idx = tokens(1, 6)
    with torch.no_grad():
        ev = model(idx)
        assert torch.equal(ev, model(idx))
        model.train()
        torch.manual_seed(0)
        a = model(idx)
        torch.manual_seed(1)
        assert not torch.allclose(a, model(idx)) and not torch.allclose(a, ev)


class Logits(torch.nn.Module):
    """The whole model as a one-output function of idx (check_compiled differentiates its output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_v2_mlp"])
def test_whole_model_compiles_in_one_graph_and_equals_eager(name):
    """train.py --compile: torch.compile(fullgraph=True) of the prompted model (training mode) gives eager's
    logits and the same gradients of the prompt parameters."""
    import kernels
    _, model = prompted(name)
    assert kernels.check_compiled(Logits(model.train()), tokens(2, 6), backend="aot_eager", rtol=1e-5, atol=1e-5) >= 1


# -----------------------------------------------------------------------------
# merge (refused), save/load


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_v2"])
def test_merge_and_exports_are_refused_with_one_line(tmp_path, name):
    _, model = prompted(name)
    for fn, msg in ((merge, "is not mergeable"), (lambda m: export_merged(m, tmp_path / "x"), "is not mergeable"),
                    (lambda m: export_peft(m, tmp_path / "y"), "export_peft supports lora and dora")):
        with pytest.raises(ValueError, match=msg) as e:
            fn(model)
        assert "\n" not in str(e.value) and name in str(e.value)
    adapters.unmerge(model)  # a no-op, not an error
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_round_trip_is_exact(tmp_path, name):
    model, meta = check_save_load_round_trip(acfg_of(name, seed=3), tmp_path / "ad")
    saved = set(json.loads((tmp_path / "ad" / "adapter.json").read_text())["config"])
    assert {"num_virtual_tokens", "prompt_init", "prefix_projection", "prefix_hidden"} <= saved
    fresh = tiny_model(bias=True)  # load_adapter also round-trips what generate() produces
    load_adapter(fresh, tmp_path / "ad")
    idx = tokens(2, 5)
    assert torch.equal(model.generate(idx, 4), fresh.generate(idx, 4))


def test_failed_load_leaves_no_soft_prompt(tmp_path):
    _, model = prompted("p_tuning_v2")
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    meta["config"]["num_virtual_tokens"] = P + 1  # shapes no longer fit the saved tensors
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(meta))
    fresh = tiny_model()
    idx = tokens(1, 5)
    with torch.no_grad():
        ref = fresh(idx)
    with pytest.raises(ValueError, match=f"trained with num_virtual_tokens={P}"):  # the file records the trained config
        load_adapter(fresh, tmp_path / "ad")
    assert fresh.soft_prompt is None and not hasattr(fresh, "adapter_config")
    with torch.no_grad():
        assert torch.equal(fresh(idx), ref)


# -----------------------------------------------------------------------------
# eval_mmlu and train.py with a prompt adapter


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("letters"), "letters")[0]


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_v2"])
def test_eval_mmlu_scores_a_saved_prompt_adapter_like_the_adapted_model(letters, tmp_path, name):
    model, tok = E.load_model(E.EvalConfig(model=str(letters), dtype="fp32", device="cpu"))
    kw = dict(subjects=["abstract_algebra", "anatomy"], limit=4, batch_size=3, progress=False)
    base_res = E.evaluate_mmlu(model, tok, MMLU, **kw)
    inject(model, acfg_of(name))
    want = E.evaluate_mmlu(model, tok, MMLU, **kw)  # batches of 3 ragged prompts: left padding + prompt
    scores = lambda r: torch.tensor([p["scores"] for p in r["predictions"]])
    assert not torch.allclose(scores(base_res), scores(want), atol=1e-3)
    one = E.evaluate_mmlu(model, tok, MMLU, **{**kw, "batch_size": 1})
    torch.testing.assert_close(scores(one), scores(want), rtol=1e-4, atol=1e-4)
    save_adapter(model, tmp_path / "ad")
    E.main(["--model", str(letters), "--adapter", str(tmp_path / "ad"), "--data", str(MMLU), "--subjects",
            "abstract_algebra,anatomy", "--limit", "4", "--out", str(tmp_path / "r.json")])
    got = json.loads((tmp_path / "r.json").read_text())
    assert [p["pred"] for p in got["predictions"]] == [p["pred"] for p in want["predictions"]]
    torch.testing.assert_close(scores(got), scores(want), rtol=1e-4, atol=1e-4)
    prompts = [E.format_prompt(q) for q in ["What is 2 + 2?", "A much longer question " * 4, "Hi"]]
    assert E.generate_texts(model, tok, prompts, 4, batch_size=3, progress=False) == \
        E.generate_texts(model, tok, prompts, 4, batch_size=1, progress=False)


def test_eval_context_limit_counts_the_virtual_tokens(letters):
    """The virtual tokens occupy positions too: a prompt plus the P virtual tokens must fit the model's
    max_position_embeddings, so shots are dropped P tokens earlier than without the adapter."""
    model, tok = E.load_model(E.EvalConfig(model=str(letters), dtype="fp32", device="cpu"))
    kw = dict(shots=5, subjects=["abstract_algebra"], limit=1, progress=False)
    n5 = E.evaluate_mmlu(model, tok, MMLU, **kw)["predictions"][0]["tokens"]
    inject(model, AdapterConfig(adapter="p_tuning_v2", num_virtual_tokens=P))
    model.config.max_position_embeddings = n5 + P  # exactly fits: all five shots
    assert E.evaluate_mmlu(model, tok, MMLU, **kw)["predictions"][0]["shots"] == 5
    model.config.max_position_embeddings = n5 + P - 1
    p = E.evaluate_mmlu(model, tok, MMLU, **kw)["predictions"][0]
    assert p["shots"] == 4 and p["tokens"] + P <= model.config.max_position_embeddings


@pytest.mark.parametrize("name,extra", [("prompt_tuning", []), ("p_tuning_v2", ["--prefix_projection"])])
def test_train_runs_and_saves_a_loadable_prompt_adapter(base, tmp_path, capsys, name, extra):  # noqa: F811
    out = tmp_path / "run"
    code, err = cli(base, out, "--adapter", name, "--num_virtual_tokens", "4", "--prefix_hidden", "16",
                    "--max_steps", "3", "--lr", "1e-2", *extra, capsys=capsys)
    assert code == 0, err
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["method"] == name and meta["config"]["num_virtual_tokens"] == 4
    loss = metrics(out)
    assert sorted(loss) == [1, 2, 3] and all(v == v for v in loss.values())  # finite
    model = Transformer.from_pretrained(base["model"])
    init = copy.deepcopy(model)
    load_adapter(model, out)
    inject(init, AdapterConfig(**meta["config"]))
    w, w0 = weights(out), adapters.adapter_params(init)
    assert set(w) == set(w0) and all(not torch.equal(w[k], w0[k]) for k in w)  # every tensor trained
    code, err = cli(base, tmp_path / "run2", "--adapter", name, "--max_steps", "1", "--merge_out", tmp_path / "m",
                    capsys=capsys)
    assert code == 1 and "is not mergeable" in err and err.count("\n") == 1
