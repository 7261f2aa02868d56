"""Placement plans at Kimi K2's real shapes (tensor list built in memory, no file)."""

from __future__ import annotations

import io
import json

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from rich.console import Console

from hybrid_runtime.config import ModelConfig
from hybrid_runtime.errors import HybridError, InvalidRequestError
from hybrid_runtime.plan import (GIB, PREFILL_RING, RUNTIME_RESERVE, component_of, describe_plan, make_plan, parse_size)
from hybrid_runtime.synth.layout import tensor_specs
from hybrid_runtime.synth.presets import get_preset

K2_VOCAB = 163_840
# a Q4_K_M-like mix: routed gate/up Q4_K, down Q6_K, other matrices Q8_0 (pessimistic), F32 small
_QTYPES = {"expert_gate": Q.Q4_K, "expert_up": Q.Q4_K, "expert_down": Q.Q6_K, "norm": Q.F32, "router": Q.F32,
           "bias": Q.F32, "output": Q.Q6_K, "embed": Q.Q4_K}


def k2_config(n_layer: int = 61) -> ModelConfig:
    return ModelConfig(
        arch="deepseek2", name="Kimi-K2", n_layer=n_layer, n_embd=7168, n_head=64, n_vocab=K2_VOCAB,
        n_ctx_train=131072, rms_eps=1e-6, q_lora_rank=1536, kv_lora_rank=512, qk_nope=128, qk_rope=64,
        v_head=128, mla_split=True, n_dense_lead=1, n_ff_dense=18432, n_ff_expert=2048, n_expert=384,
        n_expert_used=8, n_expert_shared=1, n_group=1, n_group_used=1, gating=2, weights_norm=True,
        weights_scale=2.827, rope_base=50000.0, rope_scaling="yarn", rope_factor=32.0, rope_orig_ctx=4096,
        yarn_log_mul=1.0, tied_output=False)


def k2_tensors(n_layer: int = 61) -> list[tuple]:
    preset = get_preset("kimi-k2").replace(n_layer=n_layer)
    out = []
    for s in tensor_specs(preset, "split"):
        shape = (K2_VOCAB, s.shape[1]) if s.role in ("embed", "output") else s.shape
        qtype = _QTYPES.get(s.role, Q.Q8_0)
        block, size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in shape:
            n *= d
        out.append((s.name, qtype, shape, n // block * size))
    return out


@pytest.fixture(scope="module")
def k2():
    return k2_tensors(), k2_config()


def test_k2_fits_24gib_with_core_on_gpu_and_experts_in_ram(k2):
    tensors, cfg = k2
    plan = make_plan(tensors, cfg, gpu_mem=24 * GIB, ram=1024 * GIB, n_ctx=8192)
    for t in plan.tensors:
        want = "cpu" if t.component in ("experts", "embed") else "gpu"
        assert t.device == want, t.name
    assert set(plan.expert_layers.values()) == {"cpu"} and len(plan.expert_layers) == 60
    assert plan.gpu_total <= 24 * GIB
    left = 24 * GIB - (plan.gpu_total - plan.cache_slots * plan.slot_bytes)
    assert 0 <= left - plan.cache_slots * plan.slot_bytes < plan.slot_bytes  # every whole slot used
    assert 20e6 < plan.slot_bytes < 40e6  # one K2 expert at Q4_K/Q6_K ~ 28.5 MB
    assert plan.cache_slots > 50
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["cache_slots"] == plan.cache_slots and d["components"]["experts"]["gpu"] == 0


def test_cpu_moe_has_no_cache(k2):
    plan = make_plan(*k2, gpu_mem=24 * GIB, ram=1024 * GIB, cpu_moe=True)
    assert plan.cache_slots == 0 and set(plan.expert_layers.values()) == {"cpu"}


def test_n_cpu_moe_puts_later_layers_on_gpu_when_they_fit():
    tensors, cfg = k2_tensors(n_layer=6), k2_config(n_layer=6)  # 5 MoE layers of ~11 GB
    plan = make_plan(tensors, cfg, gpu_mem=20 * GIB, ram=1024 * GIB, n_cpu_moe=3)
    assert plan.expert_layers == {1: "cpu", 2: "cpu", 3: "cpu", 4: "gpu", 5: "cpu"}  # layer 5 does not fit
    assert all(t.device == "gpu" for t in plan.tensors if t.component == "experts" and t.layer == 4)
    assert plan.gpu_total <= 20 * GIB


def test_overrides(k2):
    tensors, cfg = k2
    plan = make_plan(tensors, cfg, gpu_mem=40 * GIB, ram=1024 * GIB,
                     overrides=[r"blk\.(1|2)\.ffn_.*_exps=GPU", r"^output\.=CPU", "exps=CPU"])
    assert plan.expert_layers[1] == plan.expert_layers[2] == "gpu" and plan.expert_layers[3] == "cpu"
    assert plan.gpu_total <= 40 * GIB
    assert plan.device_of("output.weight") == "cpu" and plan.device_of("blk.5.attn_output.weight") == "gpu"
    with pytest.raises(InvalidRequestError):
        make_plan(tensors, cfg, gpu_mem=24 * GIB, ram=1024 * GIB, overrides=["blk.1.ffn_up_exps=GPU"])
    with pytest.raises(InvalidRequestError):
        make_plan(tensors, cfg, gpu_mem=24 * GIB, ram=1024 * GIB, overrides=["exps=TPU"])


def test_too_small_budgets_say_how_much_is_needed(k2):
    with pytest.raises(HybridError, match=r"needs .*GiB.*budget is 8.00 GiB"):
        make_plan(*k2, gpu_mem=8 * GIB, ram=1024 * GIB)
    with pytest.raises(HybridError, match="RAM"):
        make_plan(*k2, gpu_mem=24 * GIB, ram=64 * GIB)


def test_no_gpu_puts_everything_on_cpu(k2):
    plan = make_plan(*k2, gpu_mem=0, ram=1024 * GIB)
    assert {t.device for t in plan.tensors} == {"cpu"} and plan.cache_slots == 0 and plan.gpu_total == 0


def test_embedding_on_gpu_when_everything_fits():
    tensors, cfg = k2_tensors(n_layer=2), k2_config(n_layer=2)
    plan = make_plan(tensors, cfg, gpu_mem=80 * GIB, ram=1024 * GIB)
    assert plan.device_of("token_embd.weight") == "gpu"
    assert plan.cache_slots == 384  # never more slots than experts in RAM


def test_budget_arithmetic_is_exact():
    tensors, cfg = k2_tensors(n_layer=2), k2_config(n_layer=2)
    kw = dict(ram=1024 * GIB, n_ctx=1024, kv_bytes_per_token=1000, overrides=["token_embd=CPU"])
    base = make_plan(tensors, cfg, gpu_mem=24 * GIB, cpu_moe=True, **kw)
    need = base.gpu_weight_bytes + 1000 * 1024 + RUNTIME_RESERVE
    assert base.prefill_slots == PREFILL_RING and base.cache_slots == 0
    assert base.gpu_total == need + PREFILL_RING * base.slot_bytes
    with pytest.raises(HybridError):
        make_plan(tensors, cfg, gpu_mem=need - 1, cpu_moe=True, **kw)
    # the prefill ring comes first (at least 2 buffers or none), then the cache slots
    exact = make_plan(tensors, cfg, gpu_mem=need + (PREFILL_RING + 3) * base.slot_bytes, **kw)
    assert (exact.prefill_slots, exact.cache_slots) == (PREFILL_RING, 3)
    small = make_plan(tensors, cfg, gpu_mem=need + 5 * base.slot_bytes + base.slot_bytes // 2, **kw)
    assert (small.prefill_slots, small.cache_slots) == (5, 0)
    one = make_plan(tensors, cfg, gpu_mem=need + base.slot_bytes, **kw)
    assert (one.prefill_slots, one.cache_slots) == (0, 1)
    for p in (exact, small, one):
        assert p.gpu_total <= p.gpu_budget and p.to_dict()["prefill_slots"] == p.prefill_slots


def test_components():
    assert component_of("token_embd.weight") == "embed"
    assert component_of("output.weight") == "head"
    assert component_of("output_norm.weight") == "norm"
    assert component_of("blk.3.attn_kv_a_norm.weight") == "norm"
    assert component_of("blk.3.attn_k_b.weight") == "attn"
    assert component_of("blk.3.ffn_gate_inp.weight") == "router"
    assert component_of("blk.3.exp_probs_b.bias") == "router"
    assert component_of("blk.3.ffn_up_shexp.weight") == "shared"
    assert component_of("blk.0.ffn_up.weight") == "dense_ffn"
    assert component_of("blk.3.ffn_down_exps.weight") == "experts"


def test_parse_size():
    assert parse_size("24GiB") == 24 * GIB == parse_size("24G") == parse_size("24 gib")
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5G") == 3 * GIB // 2
    assert parse_size("1000") == 1000
    for bad in ("", "lots", "-1G", "24XB"):
        with pytest.raises(InvalidRequestError):
            parse_size(bad)


def test_describe_plan_renders(k2):
    plan = make_plan(*k2, gpu_mem=24 * GIB, ram=1024 * GIB)
    buf = io.StringIO()
    describe_plan(plan, Console(file=buf, width=120))
    text = buf.getvalue()
    assert "experts" in text and "hot-expert cache" in text and f"{plan.cache_slots} slots" in text
