"""Tests of the mixture-of-LoRA-experts adapters (issue 8) against references rebuilt here: LoRAMoE (token-routed
LoRA experts + its balance loss), MoELoRA (rank split among experts, one task-motivated gate) and MTL-LoRA (shared
A, per-task Λ_t, task-mixed B's). Dense formulas per token, parameter formulas, per-task merge, save/load, the
task-id plumbing of train.py (DDP too) and eval_mmlu.py, torch.compile, bad input. Tiny shapes; run:
    python -m pytest -q test_moe.py
"""
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import adapters
import eval_mmlu as E
import kernels
import train
from adapters import AdapterConfig, inject, load_adapter, merge, save_adapter, set_task, unmerge
from conftest import make_hf_checkpoint
from model import ModelConfig, Transformer
from test_adapters import (adapted, bias_of, check_dropout_on_adapter_input, meta_report, randomize, shapes,
                           tiny_model)
from test_sharing import WithShared
from test_train import metrics, run_one_and_two_processes, tiny_base, weights, write_data

REPO = Path(__file__).parent
MMLU = REPO.parent / "shared" / "data" / "mmlu"

SEVEN = ",".join(adapters.TARGETS)
VARIANTS = {  # tiny model: hidden 32, q/o 32x32, k/v 16x32, gate/up 48x32, down 32x48, L = 5
    "loramoe": dict(adapter="loramoe", r=4, num_a=3, targets=SEVEN),
    "loramoe_ffn": dict(adapter="loramoe"),                                  # the paper's: N=6, r=4, FFN only
    "moelora": dict(adapter="moelora", r=6, num_a=3, num_tasks=3, moelora_dim=5),
    "moelora_r1": dict(adapter="moelora", r=4, num_a=4, num_tasks=2),         # experts of rank 1, d_T = 64
    "mtllora": dict(adapter="mtllora", r=4, num_b=3, num_tasks=3, mtllora_tau=0.5, targets=SEVEN),
    "mtllora_one_b": dict(adapter="mtllora", r=3, num_b=1, num_tasks=2),
}
GATED = [n for n in VARIANTS if not n.startswith("loramoe")]


def acfg_of(name, **kw):
    return AdapterConfig(**{**VARIANTS[name], **kw})


def tasks_of(acfg, B=2):
    """Task ids of a batch of B examples: 0, T-1, 0, T-1, ... (two different tasks whenever T > 1)."""
    return [(acfg.num_tasks - 1) * (b % 2) for b in range(B)] if acfg.num_tasks else None


def with_tasks(model, acfg, B=2):
    if acfg.adapter in adapters.TASK_GATED:
        set_task(model, tasks_of(acfg, B))
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# forward: identity at init, the dense formulas


@pytest.mark.parametrize("name", VARIANTS)
def test_every_moe_adapter_is_identity_at_init(name):
    """Every B starts at zero (LoRAMoE and MTL-LoRA as their authors' code, MoELoRA too), so the adapted model
    equals the base bit for bit, whatever the router / task gate says."""
    model = tiny_model(bias=True)
    idx = torch.randint(0, 61, (2, 7))
    ref = model(idx)
    acfg = acfg_of(name)
    inject(model, acfg)
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in adapters.adapter_params(model).items()
               if n.endswith(".B"))
    assert torch.equal(with_tasks(model, acfg)(idx), ref)


def named(model):
    return dict(model.named_parameters())


def dense_weight(model, name, mod, xt, task):
    """The effective weight W0 + ΔW of module `name` for one token xt of an example of task `task`, fp32, from
    the named tensors with plain per-expert loops (the papers' sums written out)."""
    P, acfg = named(model), model.adapter_config
    s, r, W0 = acfg.scaling, acfg.r, mod.weight
    own = lambda n: P[f"{name}.{n}"]
    if acfg.adapter == "loramoe":  # Σ_i g_i(x) B_i A_i, g = softmax(W_g x)
        g = torch.softmax(own("W_g") @ xt, 0)
        return W0 + s * sum(g[i] * own("B")[:, i * r:(i + 1) * r] @ own("A")[i] for i in range(acfg.num_a))
    if acfg.adapter == "moelora":  # Σ_i ω_{t,i} B_i A_i, ω_t = softmax(W_T e_t), experts of rank r/N
        E_, W_T = P["adapter_banks.task.E.0"], P["adapter_banks.task.W_T.0"]
        w, k = torch.softmax(W_T @ E_[task], 0), r // acfg.num_a
        return W0 + s * sum(w[i] * own("B")[:, i * k:(i + 1) * k] @ own("A")[i] for i in range(acfg.num_a))
    c = torch.softmax(own("w")[task] / acfg.mtllora_tau, 0)  # MTL-LoRA: Σ_i c_{t,i} B_i Λ_t A
    return W0 + s * sum(c[i] * own("B")[:, i * r:(i + 1) * r] @ own("Lam")[task] @ own("A") for i in range(acfg.num_b))


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_equals_dense_formula(name):
    model = tiny_model(bias=True)
    acfg = acfg_of(name, dropout=0.1)  # eval mode: dropout inactive
    inject(model, acfg)
    randomize(model)
    model.eval()
    tasks = tasks_of(acfg, 2) or [0, 0]
    with_tasks(model, acfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, mod in adapted(model):
            x = torch.randn(2, 3, mod.d_in)
            ref = torch.stack([torch.stack([dense_weight(model, n, mod, xt, tasks[b]) @ xt + bias_of(mod) for xt in x[b]])
                               for b in range(2)])
            torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", GATED)
def test_the_task_changes_the_update_and_one_id_serves_the_batch(name):
    """Example b follows task_ids[b]: swapping the ids swaps the outputs; one id applies to every example."""
    model = tiny_model()
    acfg = acfg_of(name)
    inject(model, acfg)
    randomize(model)
    idx = torch.randint(0, 61, (1, 6)).repeat(2, 1)  # the same example twice
    with torch.no_grad():
        set_task(model, [0, acfg.num_tasks - 1])
        y = model(idx)
        assert not torch.allclose(y[0], y[1], atol=1e-4)
        set_task(model, acfg.num_tasks - 1)
        torch.testing.assert_close(model(idx), y[[1, 1]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["loramoe", "mtllora"])
def test_dropout_only_on_adapter_input(name):
    """Training, p = 0.5: y = W0 x + b + ΔW(x) dropout(x); LoRAMoE's router sees the clean x (as its code)."""
    model = tiny_model(bias=True)
    acfg = acfg_of(name, dropout=0.5)
    inject(model, acfg)
    randomize(model)
    model.train()
    n, mod = adapted(model)[0]
    if acfg.num_tasks:
        set_task(model, [1, 0, 2, 1, 0, 2])
    tasks = [1, 0, 2, 1, 0, 2]  # the 6 rows are 6 examples of one token
    check_dropout_on_adapter_input(mod, lambda i, xt: dense_weight(model, n, mod, xt, tasks[i]))


@pytest.mark.parametrize("name", ["loramoe", "moelora", "mtllora"])
def test_fp32_adapter_on_a_bf16_base_and_under_autocast(name):
    """Adapter tensors stay fp32 on a bf16 base; the output (bf16) follows the fp32 formula; and a bf16 autocast
    forward + backward runs (the gathers of Λ_t / ω_t follow the autocast dtype)."""
    model = tiny_model().to(torch.bfloat16)
    acfg = acfg_of(name, loramoe_beta=0.1) if name == "loramoe" else acfg_of(name)
    params = inject(model, acfg)
    randomize(model)
    assert all(p.dtype == torch.float32 for p in params)
    n, mod = adapted(model)[0]
    with_tasks(model, acfg, B=3)
    x = torch.randn(3, 1, mod.d_in, dtype=torch.bfloat16)
    y = mod(x)
    assert y.dtype == torch.bfloat16
    tasks = tasks_of(acfg, 3) or [0, 0, 0]
    with torch.no_grad():
        ref = torch.stack([dense_weight(model, n, mod, x[b, 0].float(), tasks[b]) @ x[b, 0].float() for b in range(3)])
    torch.testing.assert_close(y[:, 0].float(), ref, rtol=2e-2, atol=2e-2)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randint(0, 61, (3, 5)), torch.randint(0, 61, (3, 5)))[1]
    aux = adapters.aux_loss(model)
    (loss if aux is None else loss + aux).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


# -----------------------------------------------------------------------------
# LoRAMoE's balance loss


def test_loramoe_balance_loss_is_the_coefficient_of_variation_of_expert_importance():
    """aux_loss = β Σ_modules var(Q)/mean(Q)², Q[m, n] = Σ_t softmax(W_g x_{m,t})_n, recomputed here from each
    module's input; recorded in training mode only, handed out once, and its gradient reaches every router."""
    model = tiny_model()
    acfg = acfg_of("loramoe", loramoe_beta=0.3)
    inject(model, acfg)
    randomize(model)
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in adapted(model)]
    idx = torch.randint(0, 61, (3, 5))
    model.eval()
    model(idx)
    assert adapters.aux_loss(model) is None  # eval mode: nothing recorded
    model.train()
    model(idx)
    P, want = named(model), 0.0
    for n, x in inputs.items():
        Q = torch.softmax(x @ P[f"{n}.W_g"].T, -1).sum(1)          # (examples, N)
        want += Q.var(unbiased=True) / Q.mean() ** 2
    aux = adapters.aux_loss(model)
    torch.testing.assert_close(aux, 0.3 * want, rtol=1e-5, atol=1e-7)
    assert adapters.aux_loss(model) is None  # handed out once
    aux.backward()
    assert all(P[f"{n}.W_g"].grad.abs().sum() > 0 for n in inputs)
    for h in hooks:
        h.remove()
    # a uniform router has no imbalance: Q is constant
    with torch.no_grad():
        for _, m in adapted(model):
            m.W_g.zero_()
    model(idx)
    assert adapters.aux_loss(model).abs().item() < 1e-6
    # β = 0 (the default): nothing is recorded
    plain = tiny_model()
    inject(plain, acfg_of("loramoe"))
    plain.train()(idx)
    assert plain.adapter_config.loramoe_beta == 0.0 and adapters.aux_loss(plain) is None


# -----------------------------------------------------------------------------
# parameter counts


def formula(acfg, L, d_in, d_out):
    """Trainable parameters of one module type (L layers), written out from the papers' shapes."""
    r, N, n, T = acfg.r, acfg.num_a, acfg.num_b, acfg.num_tasks
    if acfg.adapter == "loramoe":  # N experts (A_i (r, d_in), B_i (d_out, r)) + router W_g (N, d_in)
        return L * (N * r * (d_in + d_out) + N * d_in)
    if acfg.adapter == "moelora":  # N experts of rank r/N: LoRA's count at rank r
        return L * N * (r // N) * (d_in + d_out)
    return L * (r * d_in + T * r * r + n * r * d_out + T * n)  # MTL-LoRA: A, Λ_t, B_i, w_t


@pytest.mark.parametrize("L,hidden,inter", [(5, 32, 48), (3, 48, 40)])
@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_formula(L, hidden, inter, name):
    acfg = acfg_of(name)
    cfg, base, rep = meta_report(acfg, L, hidden, inter)
    want = {t: formula(acfg, L, *shapes(cfg)[t]) for t in acfg.target_list}
    if acfg.adapter == "moelora":  # one task gate for the whole model: E (T, d_T) + W_T (N, d_T)
        want["global"] = acfg.num_tasks * acfg.moelora_dim + acfg.num_a * acfg.moelora_dim
    assert {t: e["trainable"] for t, e in rep["by_type"].items()} == want
    assert rep["trainable"] == sum(want.values()) and rep["base"] == base
    assert rep["percent"] == pytest.approx(100 * rep["trainable"] / (base + rep["trainable"]))
    if acfg.num_tasks:
        assert rep["tasks"]["num_tasks"] == acfg.num_tasks


def test_cli_reports_the_paper_defaults():
    """`python adapters.py --model llama3-8b --adapter X`: the authors' defaults and the formula's count."""
    cfg = ModelConfig.from_hf_dict(adapters.PRESETS["llama3-8b"])
    for argv, kw in ((["--adapter", "loramoe"], dict(r=4, num_a=6, alpha=32.0)),
                     (["--adapter", "moelora", "--num_tasks", "16"], dict(r=16, num_a=8, moelora_dim=64)),
                     (["--adapter", "mtllora", "--num_tasks", "8"], dict(r=8, num_b=3, mtllora_tau=0.1))):
        p = subprocess.run([sys.executable, str(REPO / "adapters.py"), "--model", "llama3-8b", *argv, "--json"],
                           capture_output=True, text=True, cwd=REPO)
        assert p.returncode == 0, p.stderr
        rep = json.loads(p.stdout)
        acfg = AdapterConfig(**rep["adapter"])
        assert all(getattr(acfg, k) == v for k, v in kw.items()), rep["adapter"]
        want = sum(formula(acfg, cfg.n_layers, *shapes(cfg)[t]) for t in acfg.target_list)
        want += acfg.num_tasks * acfg.moelora_dim + acfg.num_a * acfg.moelora_dim if acfg.adapter == "moelora" else 0
        assert rep["trainable"] == want
    assert AdapterConfig(adapter="loramoe").target_list == ["gate_proj", "up_proj", "down_proj"]  # FFN only
    assert AdapterConfig(adapter="mtllora", num_tasks=2).target_list == ["q_proj", "k_proj", "v_proj", "o_proj"]


# -----------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_reaches_every_trainable_tensor(name):
    """DDP-readiness: every trainable tensor takes part in the forward (the batch holds every task)."""
    model = tiny_model()
    acfg = acfg_of(name, loramoe_beta=0.1) if name.startswith("loramoe") else acfg_of(name)
    params = inject(model, acfg)
    randomize(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    B = max(2, acfg.num_tasks or 2)
    if acfg.num_tasks:
        set_task(model, list(range(B)))
    idx, tgt = torch.randint(0, 61, (B, 8), generator=g), torch.randint(0, 61, (B, 8), generator=g)
    loss = model(idx, tgt)[1]
    aux = adapters.aux_loss(model)
    (loss if aux is None else loss + aux).backward()
    assert params and all(p.grad is not None for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # and a nonzero one, except MTL-LoRA's w with one B: softmax over a single logit is the constant 1
    inert = lambda n: n.endswith(".w") and acfg.num_b == 1
    assert all((p.grad.abs().sum() > 0) != inert(n) for n, p in adapters.adapter_params(model).items())


@pytest.mark.parametrize("name", ["moelora", "mtllora"])
def test_only_the_rows_of_tasks_in_the_batch_get_gradients(name):
    model = tiny_model()
    inject(model, acfg_of(name))  # 3 tasks
    randomize(model)
    set_task(model, [0, 1, 1])
    model(torch.randint(0, 61, (3, 6)), torch.randint(0, 61, (3, 6)))[1].backward()
    rows = {n: p.grad for n, p in named(model).items() if n.endswith((".E.0", ".Lam", ".w"))}
    assert rows
    for n, g in rows.items():
        assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0 and torch.equal(g[2], torch.zeros_like(g[2])), n


# -----------------------------------------------------------------------------
# merge per task, save/load, export


@pytest.mark.parametrize("name", GATED)
def test_per_task_merge_equals_unmerged_forward_and_unmerge_restores_w0(name):
    model = tiny_model(bias=True)
    acfg = acfg_of(name)
    inject(model, acfg)
    randomize(model)
    W0 = {n: m.weight.detach().clone() for n, m in adapted(model)}
    idx = torch.randint(0, 61, (2, 9))
    x0 = torch.randn(32)
    with torch.no_grad():
        for t in range(acfg.num_tasks):
            set_task(model, t)
            ref = model(idx)
            want = {n: dense_weight(model, n, m, x0, t) for n, m in adapted(model)}
            merge(model, task=t)
            for n, m in adapted(model):
                torch.testing.assert_close(m.weight, want[n], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(model(idx), ref, rtol=0, atol=1e-5)
            set_task(model, None)  # a model merged for task t needs no ids: it IS the task-t model
            torch.testing.assert_close(model(idx), ref, rtol=0, atol=1e-5)
            other = (t + 1) % acfg.num_tasks
            set_task(model, [t, other])
            with pytest.raises(ValueError, match=f"merged for task {t} but the batch has task ids") as e:
                model(idx)
            assert "\n" not in str(e.value)
            unmerge(model)
            assert all(torch.equal(m.weight, W0[n]) for n, m in adapted(model))
            set_task(model, t)
            assert torch.equal(model(idx), ref)


@pytest.mark.parametrize("name,kw,msg", [
    ("moelora", {}, "is task-gated: its merged weight is per task; merge one task with merge\\(model, task=t\\)"),
    ("mtllora", dict(task=3), "task must be an int in \\[0, 3\\), got 3"),
    ("loramoe", {}, "LoRAMoE mixes its experts per token .* no single merged weight"),
    ("loramoe", dict(task=0), "LoRAMoE mixes its experts per token")])
def test_merge_refusals_are_one_line(name, kw, msg):
    model = tiny_model()
    inject(model, acfg_of(name))
    for fn in (lambda: merge(model, **kw), lambda: adapters.export_merged(model, "/nonexistent/never", **kw)):
        with pytest.raises(ValueError, match=msg) as e:
            fn()
        assert "\n" not in str(e.value)
    assert not any(m.merged for _, m in adapted(model))
    lora = tiny_model()
    inject(lora, AdapterConfig(adapter="lora"))
    with pytest.raises(ValueError, match="lora is not task-gated; merge it without task="):
        merge(lora, task=0)


@pytest.mark.parametrize("name", GATED)
def test_export_merged_per_task_round_trip(tmp_path, name):
    """export_merged(task=t) writes task t's model; transformers loads it and gives the adapted logits."""
    from transformers import AutoModelForCausalLM
    make_hf_checkpoint(tmp_path / "base", "llama3")
    ours = Transformer.from_pretrained(str(tmp_path / "base")).eval()
    acfg = acfg_of(name)
    inject(ours, acfg)
    randomize(ours)
    t = acfg.num_tasks - 1
    adapters.export_merged(ours, tmp_path / "merged", task=t)
    assert not any(m.merged for _, m in adapted(ours))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    idx = torch.randint(0, 123, (2, 9))
    set_task(ours, t)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, ours(idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["loramoe", "moelora", "mtllora"])
def test_save_load_round_trip_is_exact(tmp_path, name):
    base = tiny_model(bias=True)
    fresh = copy.deepcopy(base)
    acfg = acfg_of(name, seed=3, **({"loramoe_beta": 0.01} if name == "loramoe" else {}))
    names = ["addition", "maximum", "reverse"] if acfg.num_tasks else None
    inject(base, acfg, tasks=names)
    randomize(base)
    save_adapter(base, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["config"] == {**meta["config"], **VARIANTS[name], "seed": 3}
    assert meta.get("tasks") == names
    assert load_adapter(fresh, tmp_path / "ad") == base.adapter_config
    assert getattr(fresh, "adapter_tasks", None) == names
    a, b = adapters.adapter_params(base), adapters.adapter_params(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if name == "moelora":  # the global gate is saved once, under adapter_banks
        assert [k for k in a if ".task." in k] == ["adapter_banks.task.E.0", "adapter_banks.task.W_T.0"]
    idx = torch.randint(0, 61, (2, 5))
    with_tasks(base, acfg), with_tasks(fresh, acfg)
    assert torch.equal(base(idx), fresh(idx))


# -----------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("name", ["loramoe", "moelora", "mtllora"])
def test_compiles_and_equals_eager(name):
    """torch.compile(fullgraph=True, aot_eager) of one adapted layer gives eager's output and gradients, the
    global MoELoRA gate's included."""
    model = tiny_model(L=2, bias=True)
    acfg = acfg_of(name)
    inject(model, acfg)
    randomize(model)
    n, mod = adapted(model)[0]
    if acfg.num_tasks:
        set_task(model, [0, acfg.num_tasks - 1])
    layer = WithShared(mod).train()
    x = torch.randn(2, 5, mod.d_in, requires_grad=True)
    assert kernels.check_compiled(layer, x, backend="aot_eager", rtol=1e-5, atol=1e-5) >= 1


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kw,msg", [
    (dict(adapter="moelora"), "moelora is task-gated and needs num_tasks \\(T\\): pass --num_tasks T"),
    (dict(adapter="mtllora", num_tasks=0), "num_tasks \\(T\\) must be >= 1, got 0"),
    (dict(adapter="lora", num_tasks=3), "num_tasks applies to task-gated adapters \\(moelora, mtllora\\) only"),
    (dict(adapter="moelora", num_tasks=2, r=6, num_a=4), "moelora splits rank r=6 among N=4 experts .* --r 4"),
    (dict(adapter="loramoe", num_b=2), "loramoe pairs each expert's A_i with its own B_i, so num_b must equal num_a"),
    (dict(adapter="moelora", num_tasks=2, num_b=3), "moelora pairs each expert's A_i with its own B_i"),
    (dict(adapter="mtllora", num_tasks=2, num_a=2), "mtllora has one shared A \\(num_a = 1\\), got num_a=2"),
    (dict(adapter="loramoe", num_a=0), "num_a \\(N\\) must be >= 1"),
    (dict(adapter="mtllora", num_tasks=2, num_b=0), "num_b \\(n_B\\) must be >= 1"),
    (dict(adapter="loramoe", loramoe_beta=-0.1), "loramoe_beta \\(β\\) must be a finite number >= 0"),
    (dict(adapter="moelora", num_tasks=2, moelora_dim=0), "moelora_dim \\(d_T\\) must be >= 1"),
    (dict(adapter="mtllora", num_tasks=2, mtllora_tau=0.0), "mtllora_tau \\(τ\\) must be a finite number > 0"),
    (dict(adapter="mtllora", num_tasks=2, mtllora_tau=float("nan")), "mtllora_tau \\(τ\\) must be a finite"),
    (dict(adapter="lora", mtllora_tau=0.5), "mtllora_tau applies to --adapter mtllora only"),
    (dict(adapter="masa", loramoe_beta=0.1), "loramoe_beta applies to --adapter loramoe only"),
    (dict(adapter="mtllora", num_tasks=2, moelora_dim=8), "moelora_dim applies to --adapter moelora only")])
def test_bad_config_is_refused_with_one_line(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        inject(tiny_model(L=2), AdapterConfig(**kw))
    assert "\n" not in str(e.value)


def test_task_ids_are_checked_with_one_line():
    model = tiny_model(L=2)
    inject(model, acfg_of("mtllora"))
    idx = torch.randint(0, 61, (3, 4))
    cases = [(lambda: model(idx), "MTLLoRA is task-gated but no task ids are set: call adapters.set_task"),
             (lambda: (set_task(model, [0, 1]), model(idx)), "2 task ids for a batch of 3 examples"),
             (lambda: set_task(model, [0, 3]), "task ids must be in \\[0, 3\\) \\(the adapter's num_tasks\\), got \\[0, 3\\]"),
             (lambda: set_task(model, [-1]), "task ids must be in \\[0, 3\\)"),
             (lambda: set_task(model, [0.5]), "task ids must be integers"),
             (lambda: inject(tiny_model(L=2), acfg_of("mtllora"), tasks=["a", "b"]), "2 task names for num_tasks=3"),
             (lambda: inject(tiny_model(L=2), acfg_of("loramoe"), tasks=["a"]), "task names are for task-gated")]
    lora = tiny_model(L=2)
    inject(lora, AdapterConfig(adapter="lora"))
    cases.append((lambda: set_task(lora, [0]), "set_task: the model has no task-gated adapter"))
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            fn()
        assert "\n" not in str(e.value)
    set_task(model, [2, 0, 1])
    assert model(idx).shape == (3, 4, 61)


# -----------------------------------------------------------------------------
# train.py: task ids from the data, gradients per task, DDP, refusals

TASKS = ["addition", "maximum", "reverse"]  # the data names 3 tasks; its examples hold only the first two


def add_tasks(d, names=TASKS, used=2, seed=0):
    """Give write_data's folder task ids (cycling over the first `used` tasks) and meta.json task names."""
    meta = json.loads((d / "meta.json").read_text())
    for split, info in meta["splits"].items():
        np.save(d / f"{split}.task.npy", (np.arange(info["examples"]) % used).astype(np.int32))
    meta["tasks"] = names
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_train")
    tok = tiny_base(root / "model")
    return dict(root=root, model=root / "model", tok=tok, plain=write_data(root / "plain", tok),
                data=add_tasks(write_data(root / "data", tok)))


RUN = {"moelora": ["--adapter", "moelora", "--r", "4", "--num_a", "2", "--moelora_dim", "8"],
       "mtllora": ["--adapter", "mtllora", "--r", "4", "--num_b", "2"],
       "loramoe": ["--adapter", "loramoe", "--r", "2", "--num_a", "3", "--loramoe_beta", "0.5"]}


def run_train(base, out, name, *extra, data=None, capsys=None):
    argv = ["--model", base["model"], "--data", data or base["data"], "--out", out, *RUN[name], "--batch_size", "4",
            "--grad_accum", "2", "--lr", "1e-2", "--eval_every", "0", "--warmup_ratio", "0", *extra]
    try:
        train.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, (capsys.readouterr().err if capsys else "")


def initial(base, out):
    """The adapter as injected at step 0 (the same seeded init), rebuilt from OUT's adapter.json."""
    meta = json.loads((Path(out) / "adapter.json").read_text())
    model = Transformer.from_pretrained(base["model"])
    inject(model, AdapterConfig(**meta["config"]), tasks=meta.get("tasks"))
    return {k: v.detach().clone() for k, v in adapters.adapter_params(model).items()}


@pytest.mark.parametrize("name", ["moelora", "mtllora"])
def test_train_feeds_task_ids_and_only_trained_tasks_move(base, tmp_path, name):
    """train.py takes T and the names from meta.json, sets each micro-batch's ids (val too), saves the names;
    the rows of the tasks that had examples move, those of the task without any stay at their init."""
    out = tmp_path / "run"
    assert run_train(base, out, name, "--max_steps", "3", "--eval_every", "3")[0] == 0
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["tasks"] == TASKS and meta["config"]["num_tasks"] == 3
    got, init = weights(out), initial(base, out)
    rows = [k for k in got if k.endswith((".E.0", ".Lam", ".w"))]
    assert rows
    for k in rows:
        assert not torch.equal(got[k][0], init[k][0]) and not torch.equal(got[k][1], init[k][1]), k
        assert torch.equal(got[k][2], init[k][2]), k
    assert all(not torch.equal(got[k], init[k]) for k in got if k.endswith(".B"))
    # the logged val loss at step 3 = the saved adapter scoring each val example alone as its own task
    model = Transformer.from_pretrained(base["model"])
    load_adapter(model, out)
    val, total, count = train.Split(base["data"], "val", 1024), 0.0, 0
    with torch.no_grad():
        for i in range(val.n):
            x, y = val.batch([i])
            set_task(model, val.task_ids([i]))
            total += model(x, y, return_logits=False, reduction="sum")[1].item()
            count += int((y != -100).sum())
    assert metrics(out, "val_loss")[3] == pytest.approx(total / count, rel=1e-5)


def test_train_logs_loramoe_balance_loss(base, tmp_path):
    out = tmp_path / "run"
    assert run_train(base, out, "loramoe", "--max_steps", "2", data=base["plain"])[0] == 0  # needs no tasks
    aux = metrics(out, "aux_loss")
    assert sorted(aux) == [1, 2] and all(math.isfinite(v) and v > 0 for v in aux.values())
    assert json.loads((out / "adapter.json").read_text())["config"]["loramoe_beta"] == 0.5
    # step 1 logs β·Σ_modules L_lbc of each micro-batch, averaged over the global batch's 2 micro-batches,
    # recomputed here with the adapter as injected (B = 0: the forward is the base's, the router's g is not)
    model = Transformer.from_pretrained(base["model"])
    inject(model, AdapterConfig(**json.loads((out / "adapter.json").read_text())["config"]))
    model.train()
    split = train.Split(base["plain"], "train", 1024)
    ids = train.global_batch(0, split, 8, seed=0, steps_per_epoch=split.n // 8)
    ref = []
    with torch.no_grad():
        for mids in train.micro_batches(ids, 4, rank=0, world=1):
            model(split.batch(mids)[0])
            ref.append(adapters.aux_loss(model).item())
    assert len(ref) == 2 and aux[1] == pytest.approx(sum(ref) / 2, rel=1e-5)


def test_two_processes_feed_the_same_task_ids_as_one(base, tmp_path):
    """Under torchrun each process sets the task ids of its own micro-batches: two processes end with the
    one-process weights (tolerances as test_train's DDP test)."""
    run_one_and_two_processes(["--model", base["model"], "--data", base["data"], *RUN["mtllora"], "--batch_size", "2",
                               "--grad_accum", "4", "--lr", "1e-2", "--eval_every", "2", "--max_steps", "2",
                               "--warmup_ratio", "0"], tmp_path)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(metrics(tmp_path / "two"), metrics(tmp_path / "one"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics(tmp_path / "two", "val_loss"), metrics(tmp_path / "one", "val_loss"))


@pytest.mark.parametrize("case", ["no_tasks", "num_tasks", "merge_out"])
def test_train_refuses_with_one_line(base, tmp_path, capsys, case):
    extra, data = [], None
    if case == "no_tasks":
        data, want = base["plain"], "--adapter moelora needs a task id per example, but"
    elif case == "num_tasks":
        extra, want = ["--num_tasks", "5"], "--num_tasks 5 but"
    else:
        extra, want = ["--merge_out", tmp_path / "m"], "moelora is task-gated and merges one task at a time"
    code, err = run_train(base, tmp_path / "out", "moelora", "--max_steps", "1", *extra, data=data, capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and want in lines[0], err
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# eval_mmlu.py: subjects mapped to the adapter's task ids


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    from test_eval import checkpoint
    return checkpoint(tmp_path_factory.mktemp("moe_letters"), "letters")[0]


def test_eval_maps_each_subject_to_its_task(letters, tmp_path):
    """Mixed-subject batches score each question as its subject's task: the same scores as evaluating each
    subject alone as that task id, and not those of the other task. A subject without a task is refused unless
    --task_id names one; the names travel in adapter.json."""
    model, tok = E.load_model(E.EvalConfig(model=str(letters), dtype="fp32", device="cpu"))
    names = ["anatomy", "abstract_algebra", "astronomy"]
    inject(model, acfg_of("mtllora"), tasks=names)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapters.adapter_params(model).values():
            p.normal_(0, 0.3)
    kw = dict(limit=6, progress=False, batch_size=8)
    both = E.evaluate_mmlu(model, tok, MMLU, subjects=["abstract_algebra", "anatomy"], **kw)
    assert both["task_ids"] == {"abstract_algebra": 1, "anatomy": 0}
    scores = lambda res, s: torch.tensor([p["scores"] for p in res["predictions"] if p["subject"] == s])
    for s, t in both["task_ids"].items():
        alone = E.evaluate_mmlu(model, tok, MMLU, subjects=[s], task_id=t, **kw)
        torch.testing.assert_close(scores(both, s), scores(alone, s), rtol=1e-5, atol=1e-5)
        wrong = E.evaluate_mmlu(model, tok, MMLU, subjects=[s], task_id=2, **kw)
        assert not torch.allclose(scores(both, s), scores(wrong, s), atol=1e-3)
    with pytest.raises(E.EvalError, match="1 subject\\(s\\)/task\\(s\\) \\(college_biology\\) have no task in the "
                                          "mtllora adapter .* pass --task_id N") as e:
        E.evaluate_mmlu(model, tok, MMLU, subjects=["anatomy", "college_biology"], **kw)
    assert "\n" not in str(e.value)
    res = E.evaluate_mmlu(model, tok, MMLU, subjects=["college_biology"], task_id=2, **kw)
    assert res["task_ids"] == {"college_biology": 2}
    with pytest.raises(E.EvalError, match="--task_id 3 is not a task of the adapter: choose 0..2"):
        E.evaluate_mmlu(model, tok, MMLU, subjects=["anatomy"], task_id=3, **kw)
    # the command line: base + saved adapter, names from adapter.json
    save_adapter(model, tmp_path / "ad")
    E.main(["--model", str(letters), "--adapter", str(tmp_path / "ad"), "--data", str(MMLU), "--subjects",
            "abstract_algebra,anatomy", "--limit", "6", "--out", str(tmp_path / "r.json")])
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["task_ids"] == both["task_ids"]
    torch.testing.assert_close(torch.tensor([p["scores"] for p in got["predictions"]]),
                               torch.tensor([p["scores"] for p in both["predictions"]]), rtol=1e-4, atol=1e-4)
    plain, _ = E.load_model(E.EvalConfig(model=str(letters), dtype="fp32", device="cpu"))
    with pytest.raises(E.EvalError, match="--task_id 0: the model has no task-gated adapter"):
        E.evaluate_mmlu(plain, tok, MMLU, subjects=["anatomy"], task_id=0, **kw)


def test_generation_tasks_use_the_task_id(letters):
    """GSM8K / BBH generation with a task-gated adapter: the ids are set before generating (KV cache: one id per
    row at every step); a prompt set with no task of its name is refused."""
    model, tok = E.load_model(E.EvalConfig(model=str(letters), dtype="fp32", device="cpu"))
    inject(model, acfg_of("moelora"), tasks=["gsm8k", "b", "c"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapters.adapter_params(model).values():
            p.normal_(0, 0.5)
    prompts = [E.format_prompt(q) for q in ["What is 2 + 2?", "Name a colour."]]
    set_task(model, 0)
    want = E.generate_texts(model, tok, prompts, 5, batch_size=1, progress=False)
    set_task(model, [0, 0])
    assert E.generate_texts(model, tok, prompts, 5, batch_size=2, progress=False) == want
    d = REPO.parent / "shared" / "data" / "bbh"
    with pytest.raises(E.EvalError, match="have no task in the moelora adapter"):
        E.evaluate_bbh(model, tok, d, tasks=["navigate"], limit=1, max_new_tokens=2, progress=False)
    res = E.evaluate_bbh(model, tok, d, tasks=["navigate"], limit=1, max_new_tokens=2, progress=False, task_id=1)
    assert res["n"] == 1


def test_synthetic_recipe_to_training_to_mmlu_eval(base, tmp_path):
    """The whole path on prepare_data's multi-task synthetic recipe: its task names reach adapter.json through
    train.py, and eval_mmlu.py scores each held-out subject (named after its task) as that task."""
    import prepare_data
    import synthetic
    data = tmp_path / "syn"
    prepare_data.main(["synthetic", "--model", str(base["model"]), "--out", str(data), "--syn_train", "12",
                       "--syn_test", "3"])
    names = json.loads((data / "meta.json").read_text())["tasks"]
    assert names == sorted(synthetic.SYNTHETIC_DEFAULT) and (data / "train.task.npy").is_file()
    assert run_train(base, tmp_path / "run", "mtllora", "--max_steps", "2", data=data)[0] == 0
    assert json.loads((tmp_path / "run" / "adapter.json").read_text())["tasks"] == names
    E.main(["--model", str(base["model"]), "--adapter", str(tmp_path / "run"), "--data", str(data / "mmlu"),
            "--limit", "2", "--out", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["task_ids"] == {t: i for i, t in enumerate(names)} and res["n"] == 2 * len(names)
