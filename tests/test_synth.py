"""The synthetic deepseek2 models: they load in llama.cpp, their twins hold the dequantized values,
the tokenizer round-trips text, and the scale models hold valid quant blocks."""

from __future__ import annotations

import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

from hybrid_runtime.synth import cached_model, get_preset, make_scale_model, make_tiny_model  # noqa: E402
from hybrid_runtime.synth import tokenizer  # noqa: E402
from hybrid_runtime.synth.corpus import CORPUS  # noqa: E402
from hybrid_runtime.synth.tiny import dequantized  # noqa: E402

QUANTS = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    return cached_model("kimi-k2-tiny", "Q4_K_M", tmp_path_factory.mktemp("synth"))


def _llama(path, **kw):
    from hybrid_runtime.oracle import _model_params

    with _model_params(extra_bufts=False):  # see oracle.py: the AMX/repack buffers crash here
        return llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False, **kw)


def _eval_logits(path) -> np.ndarray:
    model = _llama(path, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    # 16 distinct tokens: a repeated token at consecutive positions can give equal logits (seen once
    # in CI: the test below then read 0.0), and the test asks whether the output follows the input
    tokens = np.random.default_rng().choice(2000, size=16, replace=False).tolist()
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)])


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("preset, kw", [
    ("kimi-k2-tiny", {}),
    ("deepseek-v3-tiny", {}),
    ("deepseek-v2-lite-tiny", {}),
    ("deepseek-v2-lite-tiny", {"kv_layout": "split", "gating_key": False, "tied_output": True}),
    ("kimi-k2-tiny", {"kv_layout": "combined", "tied_output": True}),
])
def test_preset_loads_and_evaluates_in_llama_cpp(tmp_path, preset, kw):
    path = make_tiny_model(preset, "Q4_0", tmp_path / "m.gguf", seed=1, **kw)
    logits = _eval_logits(path)
    assert logits.shape == (16, 2048) and np.isfinite(logits).all()
    assert logits.std(axis=1).min() > 0.5            # a real spread, not a constant
    # the output depends on the input: consecutive positions give clearly different logits
    # (a deep random net may still prefer one token everywhere, so argmaxes are no test)
    assert np.abs(np.diff(logits, axis=0)).mean(axis=1).min() > 0.05


@pytest.mark.parametrize("kv_layout", ["split", "combined"])
def test_metadata_follows_the_kv_layout(tmp_path, kv_layout):
    p = get_preset("kimi-k2-tiny").replace(n_layer=2)
    fields = _fields(make_tiny_model(p, "F32", tmp_path / "m.gguf", kv_layout=kv_layout))
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert fields["general.architecture"] == "deepseek2"
    assert fields["deepseek2.expert_gating_func"] == 2
    assert fields["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    assert "blk.1.exp_probs_b.bias" in names
    if kv_layout == "split":
        assert fields["deepseek2.attention.head_count_kv"] == 1
        assert fields["deepseek2.attention.key_length"] == p.kv_lora + p.rope_dim
        assert fields["deepseek2.attention.key_length_mla"] == p.nope_dim + p.rope_dim
        assert {"blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"} <= names
    else:
        assert fields["deepseek2.attention.head_count_kv"] == p.n_head
        assert "deepseek2.attention.key_length_mla" not in fields
        assert "blk.0.attn_kv_b.weight" in names and "blk.0.attn_k_b.weight" not in names


@pytest.mark.parametrize("gating_key", [True, False])
def test_lite_preset_metadata(tmp_path, gating_key):
    path = make_tiny_model("deepseek-v2-lite-tiny", "Q8_0", tmp_path / "m.gguf", gating_key=gating_key)
    fields = _fields(path)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert fields["deepseek2.block_count"] == 26                   # llama.cpp's "lite": no q-LoRA
    assert "deepseek2.attention.q_lora_rank" not in fields and "blk.0.attn_q.weight" in names
    assert fields.get("deepseek2.expert_gating_func") == (1 if gating_key else None)
    assert fields["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)
    assert not any("exp_probs_b" in n for n in names)
    assert "blk.1.attn_kv_b.weight" in names                       # legacy layout by default


def test_twin_holds_the_dequantized_values(kimi):
    quant, twin = kimi
    q_reader, t_reader = gguf.GGUFReader(quant), gguf.GGUFReader(twin)
    twin_tensors = {t.name: t for t in t_reader.tensors}
    assert set(twin_tensors) == {t.name for t in q_reader.tensors}
    kinds = set()
    for t in q_reader.tensors:
        kinds.add(t.tensor_type)
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        got = twin_tensors[t.name]
        assert got.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(got.shape) == list(t.shape)
        np.testing.assert_array_equal(np.asarray(got.data).reshape(ref.shape), ref)
    assert gguf.GGMLQuantizationType.Q4_K in kinds      # K-quants really were used
    q_fields, t_fields = _fields(quant), _fields(twin)
    assert t_fields.pop("general.file_type") == 0
    q_fields.pop("general.file_type")
    assert q_fields == t_fields


def test_twin_and_quantized_file_agree_in_llama_cpp(kimi):
    quant, twin = kimi
    tokens = [5, 900, 1300, 77]
    out = []
    for path in (quant, twin):
        model = _llama(path, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        model.eval(tokens)
        out.append(np.array(model.scores[: len(tokens)]))
    rel = np.linalg.norm(out[0] - out[1]) / np.linalg.norm(out[1])
    assert rel < 0.2                                      # same weights up to activation rounding


@pytest.mark.parametrize("quant", QUANTS)
def test_every_quant_type_builds(tmp_path, quant):
    p = get_preset("kimi-k2-tiny").replace(n_layer=2)
    path = make_tiny_model(p, quant, tmp_path / "m.gguf", f32_twin=tmp_path / "t.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    twin = {t.name: t for t in gguf.GGUFReader(tmp_path / "t.gguf").tensors}
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    expected = {"F32": "F32", "F16": "F16"}.get(quant, quant.split("_K")[0] + "_K" if "_K" in quant else quant)
    assert gate.tensor_type.name == expected
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(dequantized(twin[gate.name]), dequantized(gate))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    p = get_preset("kimi-k2-tiny").replace(n_layer=2)
    a = make_tiny_model(p, "Q8_0", tmp_path / "a.gguf", seed=3).read_bytes()
    b = make_tiny_model(p, "Q8_0", tmp_path / "b.gguf", seed=3).read_bytes()
    c = make_tiny_model(p, "Q8_0", tmp_path / "c.gguf", seed=4).read_bytes()
    assert a == b and a != c


def _random_text(rng: np.random.Generator, n: int) -> str:
    pools = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x4E00, 0x4F00), range(0x1F600, 0x1F650),
             range(0x400, 0x450), [0x0A, 0x09, 0x20, 0x20]]
    out = []
    for _ in range(n):
        pool = pools[rng.integers(len(pools))]
        out.append(chr(pool[rng.integers(len(pool))]))
    return "".join(out)


def test_tokenizer_round_trips_random_text(kimi):
    vocab = llama_cpp.Llama(str(kimi[0]), vocab_only=True, verbose=False)
    assert vocab.n_vocab() == 2048
    rng = np.random.default_rng()
    texts = [_random_text(rng, int(rng.integers(1, 80))) for _ in range(50)]
    texts += ["Once upon a time, the clockmaker said: «hello» <|im_end|> [BOS] 1234567"]
    for text in texts:
        ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
        assert vocab.detokenize(ids).decode() == text


def _reference_bpe(text: str) -> list[str]:
    """Plain byte-level BPE over the ASCII pre-tokenizer, applying merges by rank."""
    v = tokenizer.build_vocab()
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(v.merges)}
    b2u = tokenizer.byte_to_unicode()
    out = []
    for piece in re.findall(r"[^\r\n\w]?[A-Za-z]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", text):
        word = [b2u[b] for b in piece.encode()]
        while len(word) > 1:
            rank, i = min((ranks.get(pair, np.inf), i) for i, pair in enumerate(zip(word, word[1:])))
            if rank == np.inf:
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        out += word
    return out


def test_tokenizer_applies_the_learned_merges(kimi):
    vocab = llama_cpp.Llama(str(kimi[0]), vocab_only=True, verbose=False)
    tokens = tokenizer.build_vocab().tokens
    rng = np.random.default_rng()
    words = sorted(set(re.findall(r"[A-Za-z]+", CORPUS)))
    text = " ".join(words[i] for i in rng.integers(len(words), size=40)) + ", 123 and 45."
    ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
    assert [tokens[i] for i in ids] == _reference_bpe(text)
    assert len(ids) < len(text) / 2                       # the merges do their job


def test_special_tokens_are_single_control_tokens(kimi):
    vocab = llama_cpp.Llama(str(kimi[0]), vocab_only=True, verbose=False)
    for special in ["<|im_end|>", "<|im_user|>", "<|tool_call_begin|>", "<think>", "[BOS]"]:
        ids = vocab.tokenize(special.encode(), add_bos=False, special=True)
        assert len(ids) == 1, special
    fields = _fields(kimi[0])
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[fields["tokenizer.ggml.eot_token_id"]] == "<|im_end|>"
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == "[BOS]"
    assert fields["tokenizer.ggml.pre"] == "kimi-k2" and fields["tokenizer.ggml.add_bos_token"] is False


def test_chat_template_renders_kimi_k2_turns(kimi):
    template = _llama_metadata(kimi[0])["tokenizer.chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    text = env.from_string(template).render(messages=messages, tools=tools, add_generation_prompt=True)
    assert text.startswith("<|im_system|>tool_declare<|im_middle|>[")
    assert "<|im_system|>system<|im_middle|>You are Kimi" in text
    assert "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>" in text
    assert ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>') in text
    assert "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>" in text
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>")


def test_thinking_template_keeps_the_last_reasoning(tmp_path):
    p = get_preset("kimi-k2-tiny").replace(n_layer=2)
    template = _fields(make_tiny_model(p, "F32", tmp_path / "m.gguf", thinking=True))["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]
    text = ImmutableSandboxedEnvironment().from_string(template).render(messages=messages)
    assert "<|im_assistant|>assistant<|im_middle|><think>two and two</think>4<|im_end|>" in text


def _llama_metadata(path) -> dict:
    return _llama(path).metadata


SMALL_SCALE = dict(hidden=256, n_head=4, q_lora=256, kv_lora=128, rope_dim=32, nope_dim=64, v_dim=64,
                   n_expert=16, expert_ff=256, dense_ff=512)


def test_scale_model_writes_valid_blocks(tmp_path):
    path = make_scale_model("medium", tmp_path / "s.gguf", layers=1, seed=int(np.random.default_rng().integers(1000)),
                            **SMALL_SCALE)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    Q = gguf.GGMLQuantizationType
    expected = {"blk.0.ffn_gate_exps.weight": Q.Q4_K, "blk.0.ffn_up_exps.weight": Q.Q4_K,
                "blk.0.ffn_down_exps.weight": Q.Q6_K, "blk.0.attn_q_b.weight": Q.Q8_0}
    for name, qtype in expected.items():
        t = tensors[name]
        assert t.tensor_type == qtype
        values = dequantized(t)
        target = 0.5 / np.sqrt(values.shape[-1])
        assert np.isfinite(values).all()
        assert 0.7 * target < values.std() < 1.4 * target, name
    assert "blk.0.ffn_gate.weight" not in tensors          # one layer: an MoE layer
    logits = _eval_logits(path)
    assert np.isfinite(logits).all()


def test_metadata_only_is_a_sparse_kimi_k2_header(tmp_path):
    path = make_scale_model("kimi-k2", tmp_path / "k2.gguf", metadata_only=True)
    st = path.stat()
    assert st.st_size > 500 * 2**30
    assert st.st_blocks * 512 < 16 * 2**20
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["deepseek2.block_count"] == 61 and fields["deepseek2.expert_count"] == 384
    down = next(t for t in reader.tensors if t.name == "blk.60.ffn_down_exps.weight")
    assert list(down.shape) == [2048, 7168, 384]
    assert down.tensor_type == gguf.GGMLQuantizationType.Q6_K
    # the real vocabulary: the embedding and head are planned at their true sizes
    assert fields["deepseek2.vocab_size"] == 163840 and len(fields["tokenizer.ggml.tokens"]) == 163840
    head = next(t for t in reader.tensors if t.name == "output.weight")
    assert list(head.shape) == [7168, 163840]


def test_cached_model_builds_once(tmp_path):
    a = cached_model("kimi-k2-tiny", "Q8_0", tmp_path, seed=7)
    mtime = a[0].stat().st_mtime_ns
    b = cached_model("kimi-k2-tiny", "Q8_0", tmp_path, seed=7)
    assert a == b and b[0].stat().st_mtime_ns == mtime and b[1].exists()
    c = cached_model("kimi-k2-tiny", "Q8_0", tmp_path, seed=8)
    assert c[0] != a[0]
