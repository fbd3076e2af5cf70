"""The lean engine is the same model as transformers', per architecture it serves.

For each configuration nlgen's lean forwards serve (GPT-2, and the Llama family as transformers
configures it), on tiny random models built here:

- greedy decoding gives generate()'s tokens, 64 of them, in float32 and in bfloat16;
- the logits of every step are within 1e-4 of transformers' full forward over the same tokens in
  float32; in bfloat16 the bound is exact equality with transformers' forward fed the same
  pieces (a prompt, then one token at a time, as generate() feeds it) with its attention
  computed in float32 as the lean forward computes it (:func:`attention_in_float32`): the lean
  forward runs the same operations in the same order, so it rounds the same way (a different
  split of the tokens rounds differently in bfloat16, transformers' own forward included, so
  that is the comparison that holds the arithmetic); against stock transformers in bfloat16
  (attention in bfloat16) the logits stay within a stated bound, and no farther from float32
  than transformers' own;
- a prompt fed in pieces at positions > 0 gives the logits of the prompt in one piece.

What the lean forwards do not compute exactly goes to generate(), with the reason on -v; with
--engine nlgen it is an error naming the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import pytest

from nlgen.engine import decode, lean_gpt2, lean_llama, lean_weights, slots
from nlgen.engine.options import ENGINES, GenerationOptions
from nlgen.errors import EXIT_FAILURE, EXIT_USAGE, ModelError, UsageError
from nlgen.models import capabilities
from nlgen.models.loading import LoadedModel

V = 400  # the vocabulary of the tiny models (the tiny GPT-2's tokenizer has 400 tokens)
NEW = 64
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             tie_word_embeddings=True, initializer_range=0.3)
GPT2_SIZES = dict(vocab_size=V, n_positions=128, n_layer=2, n_head=2, n_embd=32,
                  initializer_range=0.3)
SERVED = {
    "gpt2": ("gpt2", {}),
    "gpt2-scaled-by-layer-gelu": ("gpt2", {"scale_attn_by_inverse_layer_idx": True,
                                           "activation_function": "gelu", "n_inner": 48}),
    "llama": ("llama", {}),
    "llama-untied-head": ("llama", {"tie_word_embeddings": False}),
    "llama-gqa-1-kv-head": ("llama", {"num_key_value_heads": 1}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2-bias": ("qwen2", {}),
    "llama3-rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "yarn-rope": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "head-dim-24": ("llama", {"head_dim": 24}),
}


def build(name: str, dtype: str = "float32"):
    """A tiny random model of the SERVED entry ``name``, in eval mode."""
    import torch
    import transformers as tf

    family, overrides = SERVED[name] if isinstance(name, str) else name
    if family == "gpt2":
        config = tf.GPT2Config(**{**GPT2_SIZES, **overrides})
        cls = tf.GPT2LMHeadModel
    else:
        sizes = {k: v for k, v in LLAMA.items() if family == "llama" or k != "tie_word_embeddings"}
        make = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[family]
        config, cls = make[0](**{**sizes, **overrides}), make[1]
    torch.manual_seed(0)
    # As nlgen loads a model to generate: for inference only, nothing requires grad.
    model = cls(config).eval().to(getattr(torch, dtype)).requires_grad_(False)
    # No EOS: every run makes all its tokens.
    model.generation_config = tf.GenerationConfig(pad_token_id=0)
    return model


def loaded(model) -> LoadedModel:
    dtype = str(model.dtype).removeprefix("torch.")
    return LoadedModel(model, None, "tiny", "", "cpu", dtype)


def greedy_config():
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, pad_token_id=0)


def prompt(length: int = 12, seed: int = 1):
    import torch

    return torch.randint(0, V, (1, length), generator=torch.Generator().manual_seed(seed))


F32_ATTENTION = "nlgen_tests_sdpa_in_float32"


def _sdpa_in_float32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention on the float32 values of bfloat16 q/k/v, rounded back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dtype.is_floating_point:
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                          attention_mask, **kwargs)
    return out.to(query.dtype), weights


@contextlib.contextmanager
def attention_in_float32(model):
    """transformers' own forward and generate() with the attention computed in float32, as the
    lean forward computes it in bfloat16 (nlgen.engine.lean_llama.sdpa); a no-op in float32."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.dtype != torch.bfloat16:
        yield model
        return
    AttentionInterface.register(F32_ATTENTION, _sdpa_in_float32)
    AttentionMaskInterface.register(F32_ATTENTION, sdpa_mask)
    before = model.config._attn_implementation
    model.config._attn_implementation = F32_ATTENTION
    try:
        yield model
    finally:
        model.config._attn_implementation = before


def transformers_steps(model, ids, pieces):
    """transformers' logits (1, V) after each piece ``(start, end)`` of ``ids``, fed as
    generate() feeds them: with a DynamicCache, the last position's logits only, in float32."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = []
    with torch.inference_mode():
        for start, end in pieces:
            logits = model(input_ids=ids[:, start:end], cache=cache, use_cache=True,
                           logits_to_keep=1).logits
            out.append(logits[:, -1].float())
    return out


def lean_steps(lm, ids, pieces, max_len=None):
    import torch

    step = decode.stepper(lm, max_len or ids.shape[1])
    with torch.inference_mode():
        return [step(ids[:, start:end], start) for start, end in pieces]


def one_at_a_time(ids, first):
    return [(0, first)] + [(i, i + 1) for i in range(first, ids.shape[1])]


def greedy_both(model):
    """(prompt ids, nlgen's loop's output, generate()'s output) for NEW greedy tokens, the
    reference with its attention in float32 as the lean forward computes it in bfloat16."""
    import torch

    ids = prompt()
    run = decode.runner(loaded(model), greedy_config(), rows=1, engine="nlgen")
    with torch.inference_mode():
        with attention_in_float32(model):
            expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      generation_config=greedy_config(), max_new_tokens=NEW)
        got = run(input_ids=ids, max_new_tokens=NEW)
    return ids, got, expected


# ----------------------------------------------------------------------------- served


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(SERVED))
def test_greedy_64_tokens_equal_generate(name, dtype):

    model = build(name, dtype)
    ids, got, expected = greedy_both(model)
    assert expected.shape == (1, ids.shape[1] + NEW)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, ids.shape[1]:].tolist())) > 8  # a real text, not one token repeated
    family = lean_weights.GPT2Weights if SERVED[name][0] == "gpt2" else lean_weights.Weights
    assert isinstance(slots._made.get(model), family)  # the lean forward ran


@pytest.mark.parametrize("name", list(SERVED))
def test_step_logits_within_1e_4_of_the_full_forward_float32(name):
    import torch

    model = build(name)
    ids = prompt(12 + NEW, seed=2)
    with torch.inference_mode():
        full = model(ids).logits.float()  # (1, T, V): every position at once
    steps = lean_steps(loaded(model), ids, one_at_a_time(ids, 12))
    for i, got in enumerate(steps):
        torch.testing.assert_close(got, full[:, 11 + i], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(SERVED))
def test_step_logits_equal_transformers_fed_the_same_pieces(name, dtype):
    import torch

    model = build(name, dtype)
    ids = prompt(40, seed=3)
    pieces = one_at_a_time(ids, 12)
    with attention_in_float32(model):
        expected_steps = transformers_steps(model, ids, pieces)
    for got, expected in zip(lean_steps(loaded(model), ids, pieces), expected_steps, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list(SERVED))
def test_bfloat16_stays_within_bfloat16s_own_error_of_stock_transformers(name):
    """The one departure from stock transformers in bfloat16, attention in float32, moves the
    logits less than bfloat16 itself moves them from the float32 model (largest difference at
    any step and token), and leaves the mean error against float32 within 10% of stock
    transformers' own (measured on these models: -4% to +5%)."""
    import torch

    ids = prompt(40, seed=3)
    pieces = one_at_a_time(ids, 12)
    exact = transformers_steps(build(name), ids, pieces)
    bf16 = build(name, "bfloat16")
    stock = transformers_steps(bf16, ids, pieces)
    lean = lean_steps(loaded(bf16), ids, pieces)

    def largest(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))

    def mean(a, b):
        return torch.stack([(x - y).abs().mean() for x, y in zip(a, b, strict=True)]).mean()

    assert largest(lean, stock) < largest(stock, exact)
    assert mean(lean, exact) <= 1.1 * mean(stock, exact)
    assert largest(lean, stock) > 0  # the attention really is computed another way


@pytest.mark.parametrize("name", list(SERVED))
def test_a_prompt_in_pieces_gives_the_logits_of_one_piece(name):
    """Pieces at positions > 0 attend causally to their own positions (SDPA's is_causal alone
    would align them to the first key)."""
    import torch

    model = build(name)
    ids = prompt(30, seed=4)
    pieces = [(0, 7), (7, 19), (19, 30)]
    with torch.inference_mode():
        full = model(ids).logits.float()
    [whole] = lean_steps(loaded(model), ids, [(0, 30)])
    split = lean_steps(loaded(model), ids, pieces)
    torch.testing.assert_close(split[-1], whole, rtol=0, atol=1e-4)
    for (_, end), got in zip(pieces, split, strict=True):
        torch.testing.assert_close(got, full[:, end - 1], rtol=0, atol=1e-4)
    bf16 = build(name, "bfloat16")
    with attention_in_float32(bf16):
        expected_steps = transformers_steps(bf16, ids, pieces)
    for got, expected in zip(lean_steps(loaded(bf16), ids, pieces), expected_steps, strict=True):
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- refused


REFUSED = {
    "gpt2-upcast": (("gpt2", {"reorder_and_upcast_attn": True}),
                    "config reorder_and_upcast_attn"),
    "gpt2-cross-attention": (("gpt2", {"add_cross_attention": True}),
                             "config add_cross_attention"),
    "llama-dynamic-rope": (("llama", {"rope_parameters": {
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}),
        "config rope_type 'dynamic'"),
    "llama-eager": (("llama", {"attn_implementation": "eager"}),
                    "attention implementation eager"),
    "qwen2-sliding-window": (("qwen2", {"use_sliding_window": True, "sliding_window": 16,
                                        "max_window_layers": 0}),
                             "config use_sliding_window True"),
    "mistral": (("mistral", {}), "architecture MistralForCausalLM"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_it_does_not_compute_goes_to_generate_with_the_reason(name, caplog):
    spec, why = REFUSED[name]
    lm = loaded(build(spec))
    with caplog.at_level(logging.INFO, logger="nlgen"):
        assert decode.runner(lm, greedy_config(), rows=1) is None
    assert f"engine: transformers' generate(), as nlgen's loop cannot run this: {why}" \
        in caplog.messages
    with pytest.raises(ModelError, match=f"--engine nlgen cannot run this: {why}"):
        decode.runner(lm, greedy_config(), rows=1, engine="nlgen")
    assert lm.model not in slots._made


def test_a_layer_that_is_not_transformers_own_is_refused():
    import torch

    model = build("gpt2")

    class Adapter(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model.transformer.h[1].attn.c_attn = Adapter(model.transformer.h[1].attn.c_attn)
    assert lean_gpt2.reason(model) == "layer transformer.h.1.attn.c_attn is a Adapter, " \
        "not a Conv1D"
    assert lean_gpt2.reason(build("gpt2").to(torch.float16)) == "dtype float16"
    assert lean_llama.reason(build("gpt2")) == "architecture GPT2LMHeadModel"


def test_engine_choices(caplog):
    lm = loaded(build("gpt2"))
    beams = greedy_config()
    beams.num_beams = 2
    with caplog.at_level(logging.INFO, logger="nlgen"):
        assert decode.runner(lm, greedy_config(), rows=1, engine="transformers") is None
        assert decode.runner(lm, greedy_config(), rows=1) is not None
        assert decode.runner(lm, beams, rows=1) is None
        assert decode.runner(lm, greedy_config(), rows=3) is not None  # batches too
    assert caplog.messages == [
        "engine: transformers' generate() (--engine transformers)",
        "engine: nlgen's loop with the lean GPT-2 forward",
        "engine: transformers' generate(), as nlgen's loop cannot run this: generation "
        "setting num_beams=2"]
    timed = greedy_config()
    timed.max_time = 5.0
    for config, why in ((beams, "num_beams=2"), (timed, "max_time=5.0")):
        with pytest.raises(UsageError, match=f"--engine nlgen cannot run this: .*{why}"):
            decode.runner(lm, config, rows=1, engine="nlgen")
    with pytest.raises(UsageError, match="invalid --engine 'fast'"):
        GenerationOptions(engine="fast")


def test_cli_enum_is_the_cores_choices():
    from nlgen.cli.options import Engine

    assert tuple(e.value for e in Engine) == ENGINES


# ----------------------------------------------------------------------------- config files


def test_config_defaults_are_transformers_own():
    from transformers import LlamaConfig, Qwen2Config

    for model_type, cls in (("llama", LlamaConfig), ("qwen2", Qwen2Config)):
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert lean_weights.DEFAULTS[model_type] == {
            k: fields[k] for k in lean_weights.DEFAULTS[model_type]}


QWEN2_DEFAULT_KV = ("qwen2", {"num_attention_heads": 32, "num_key_value_heads": 32,
                              "hidden_size": 128})  # Qwen2's default: 32 KV heads


@pytest.mark.parametrize("name,drop", [
    ("qwen2-bias", ("rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")),
    (QWEN2_DEFAULT_KV, ("num_key_value_heads",)),
    ("llama-untied-head", ("head_dim", "rope_parameters", "rms_norm_eps", "attention_bias",
                           "mlp_bias", "hidden_act")),
    ("head-dim-24", ()),
    ("llama-gqa-1-kv-head", ("tie_word_embeddings",)),
], ids=["qwen2", "qwen2-default-kv-heads", "llama-untied", "head-dim-24", "llama-tie-default"])
def test_a_saved_directory_read_without_transformers_model_is_the_same_model(
        name, drop, tiny_model, tmp_path):
    """The files read (nlgen.engine.lean_weights.from_files) takes transformers' defaults for
    the keys a config.json leaves out, and gives from_pretrained's logits."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nlgen.models.loading import load_model

    model = build(name)
    if "tie_word_embeddings" in drop:  # the default (False) must then hold: an own head
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    lm = load_model(str(tmp_path), device="cpu", dtype="float32",
                    lean_reader=lean_weights.read)
    assert lm._model is None and isinstance(lm.lean, lean_weights.Weights)  # read from files
    ids = prompt(20, seed=5)
    pieces = one_at_a_time(ids, 8)
    for got, expected in zip(lean_steps(lm, ids, pieces), transformers_steps(
            reference, ids, pieces), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_scaled_rope_is_read_through_transformers_then_runs_lean(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from nlgen.models.loading import load_model

    build("llama3-rope").save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu", dtype="float32",
                    lean_reader=lean_weights.read)
    assert lm.lean is None and decode.lean_reason(lm) is None


# ----------------------------------------------------------------------------- the CLI


def test_cli_engines_give_the_same_text_and_say_which_ran(cli, tiny_model):
    base = ["generate", "--model", str(tiny_model), "--greedy", "-n", "12", "-v"]
    lean = cli(*base, "--engine", "nlgen", "The fox", "A cat")
    plain = cli(*base, "--engine", "transformers", "The fox", "A cat")
    auto = cli(*base, "-b", "2", "The fox", "A cat")
    beams = cli(*base, "--num-beams", "2", "The fox")
    assert lean.exit_code == plain.exit_code == auto.exit_code == 0, lean.stderr + plain.stderr
    assert lean.stdout == plain.stdout == auto.stdout
    assert "engine: nlgen's loop with the lean GPT-2 forward" in lean.stderr
    assert "engine: transformers' generate() (--engine transformers)" in plain.stderr
    assert "engine: nlgen's loop with the lean GPT-2 forward" in auto.stderr  # a batch too
    assert "as nlgen's loop cannot run this: generation setting num_beams=2" in beams.stderr


def test_cli_engine_nlgen_says_why_it_cannot(cli, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    beams = cli("generate", "--model", str(tiny_model), "--engine", "nlgen", "--num-beams", "2",
                "-n", "4", "The fox")
    assert beams.exit_code == EXIT_USAGE
    assert "--engine nlgen cannot run this: generation setting num_beams=2" in beams.stderr
    assert "Traceback" not in beams.stderr
    build(REFUSED["gpt2-upcast"][0]).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    upcast = cli("generate", "--model", str(tmp_path), "--engine", "nlgen", "-n", "4", "x")
    assert upcast.exit_code == EXIT_FAILURE
    assert "--engine nlgen cannot run this: config reorder_and_upcast_attn" in upcast.stderr


@pytest.mark.parametrize("name", ["gpt2", "gpt2-scaled-by-layer-gelu"])
def test_int8_gpt2_runs_on_the_engine_equal_to_generate(name):
    """--quantize int8 on GPT-2 replaces its Conv1D layers too (half the bytes a token of
    bfloat16); the lean forward calls those modules as generate() does: the same tokens."""
    import torch

    from nlgen.models import quantized

    model = build(name)
    reference = {n: m.weight.detach().t().clone() for n, m in model.named_modules()
                 if type(m).__name__ == "Conv1D"}
    assert quantized.quantize_model(model, "int8") == "int8"
    model.to(torch.bfloat16)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n in reference}
    # Every Conv1D whose input is whole blocks of 32 (n_inner 48 leaves one per layer dense).
    assert kinds == {n: "Int8Linear" if w.shape[1] % 32 == 0 else "Conv1D"
                     for n, w in reference.items()}
    assert "Int8Linear" in kinds.values()
    for n, dense in reference.items():
        if kinds[n] == "Conv1D":
            continue  # int8 rows of the (out, in) weight: each value within
        layer = model.get_submodule(n)  # half a step of its row's, plus the bfloat16 scale's
        rebuilt = layer.weight_int8.float() * layer.scale.float()[:, None]  # rounding (127
        step = dense.abs().amax(dim=1, keepdim=True) / 127  # steps x 2^-8 at most)
        assert bool(((rebuilt - dense).abs() <= step * (0.5 + 127 / 256) * 1.01).all()), n
    assert lean_gpt2.reason(model) is None
    ids, got, expected = greedy_both(model)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, ids.shape[1]:].tolist())) > 8
    assert isinstance(slots._made.get(model), lean_weights.GPT2Weights)


# ----------------------------------------------------------------------------- packed bfloat16


def packing_or_skip() -> None:
    why = capabilities.packed_bf16()
    if why is not None:
        pytest.skip(why)


def test_packed_products_are_addmms_bits_at_gpt2_small_shapes():
    """nlgen.engine.packed's claim at the shapes it is used at (the probe checks small ones)."""
    packing_or_skip()
    import torch

    from nlgen.engine import packed

    made = packed.packed_linear_class()
    g = torch.Generator().manual_seed(0)
    for (inp, out), bias in (((768, 2304), True), ((768, 768), True), ((768, 3072), True),
                             ((3072, 768), True), ((768, 50257), False)):
        if not capabilities.packed_bf16_matches((out,), inp, bias, "Conv1D" if bias else
                                                "Linear"):
            continue  # this machine's check keeps the shape plain: the engine never packs it
        weight = (torch.randn(inp, out, generator=g) * 0.02).to(torch.bfloat16)  # (in, out)
        b = (torch.randn(out, generator=g) * 0.02).to(torch.bfloat16) if bias else None
        layer = made(weight.T, b)
        for rows in (1, 7):
            x = torch.randn(1, rows, inp, generator=g).to(torch.bfloat16)
            want = torch.addmm(b, x[0], weight) if b is not None else x[0] @ weight
            assert torch.equal(layer(x), want[None]), (inp, out, rows)


# Wide enough that oneDNN adds the plain products too (torch leaves products of at most 16^3
# multiplications to another kernel; those layers stay plain): GPT-2's attn.c_proj (64 x 64)
# stays plain, everything else is packed.
WIDER_GPT2 = ("gpt2", {"n_embd": 64})
WIDER_LLAMA = ("llama", {"hidden_size": 128, "intermediate_size": 256})


def test_the_engine_packs_a_bfloat16_gpt2_and_generate_keeps_its_tokens():
    packing_or_skip()
    import torch

    model = build(WIDER_GPT2, "bfloat16")
    ids = prompt()

    def stock():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  generation_config=greedy_config(), max_new_tokens=NEW).tolist()

    before = stock()
    values = sum(p.numel() for p in model.parameters())
    # What this machine's check lets pack: a 64 x 64 product is torch's own kernel's (fewer
    # than 16^3 multiplications at one row), never oneDNN's, so attn.c_proj stays plain.
    layers = {n: m for n, m in model.named_modules()
              if n.endswith(lean_weights.GPT2_PRODUCTS) or n == "lm_head"}
    packs = {n: capabilities.packed_bf16_matches(
        (m.weight.shape[1],), m.weight.shape[0], True, "Conv1D") if n != "lm_head" else
        capabilities.packed_bf16_matches((V,), 64, False, "Linear") for n, m in layers.items()}
    assert not any(packs[n] for n in packs if n.endswith("attn.c_proj"))
    if not any(packs.values()):
        pytest.skip("this machine's oneDNN packs none of these shapes exactly")
    _, got, expected = greedy_both(model)  # the loop's first run packs the model
    assert got.tolist() == expected.tolist()
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n in layers}
    assert kinds == {n: "PackedLinear" if packs[n] else type(layers[n]).__name__
                     for n in layers} and len(kinds) == 4 * 2 + 1
    # The plain weights are let go (the embeddings keep the tied table) ...
    packed_values = sum(m.weight.numel() for n, m in layers.items()
                        if packs[n] and n != "lm_head")
    assert sum(p.numel() for p in model.parameters()) == values - packed_values
    assert model.transformer.wte.weight.shape == (V, 64)
    # ... and generate(), which calls the same modules, gives the same tokens as before.
    assert stock() == before
    assert lean_gpt2.reason(model) is None
    assert lean_weights.pack(model) == 0  # once


def test_a_packed_llama_is_the_same_model_from_the_files_and_in_place(tmp_path):
    packing_or_skip()
    import torch
    from transformers import LlamaForCausalLM

    build(WIDER_LLAMA).save_pretrained(tmp_path)
    # Loaded as a user's model is (a model cast with .to() would have its RoPE frequencies in
    # bfloat16 too; a loaded one keeps them in float32, as the weights read from the files do).
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model.requires_grad_(False)  # as nlgen loads a model to generate
    model.generation_config = greedy_config()
    model.generation_config.save_pretrained(tmp_path)
    ids = prompt(40, seed=3)
    pieces = one_at_a_time(ids, 12)
    with attention_in_float32(model):
        expected = transformers_steps(model, ids, pieces)
    shapes = [((128, 64, 64), 128), ((256, 256), 128), ((128,), 128), ((128,), 256),
              ((V,), 128)]  # q/k/v, gate/up, o, down, head: (widths, inputs)
    if not all(capabilities.packed_bf16_matches(w, k, False, "Linear") for w, k in shapes):
        pytest.skip("this machine's oneDNN packs not all of these shapes exactly")
    files = lean_weights.from_files(tmp_path, "bfloat16", None)  # q/k/v and gate/up joined
    assert all(layer.packed and layer.q_proj is None for layer in files.layers)
    assert type(files.head).__name__ == "PackedLinear"
    lean = lean_llama.LeanLlama(files, ids.shape[1])
    with torch.inference_mode():
        got = [lean.step(ids[:, a:b], a) for a, b in pieces]
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    # In place: the model's own modules, which generate() calls too.
    _, got, want = greedy_both(model)
    assert got.tolist() == want.tolist()
    assert {type(m).__name__ for n, m in model.named_modules()
            if n.endswith(lean_weights.LLAMA_PRODUCTS) or n == "lm_head"} == {"PackedLinear"}
    assert all(torch.equal(g, e) for g, e in zip(
        lean_steps(loaded(model), ids, pieces), expected, strict=True))


def test_packing_leaves_other_models_alone_and_says_when_the_machine_cannot(monkeypatch,
                                                                           caplog):
    from nlgen.engine import packed

    assert lean_weights.pack(build(WIDER_GPT2)) == 0  # float32: its own products
    training = build(WIDER_GPT2, "bfloat16").train()
    assert lean_weights.pack(training) == 0
    trainable = build(WIDER_GPT2, "bfloat16").requires_grad_(True)  # eval mode, but trainable
    assert lean_weights.pack(trainable) == 0
    monkeypatch.setattr(packed.capabilities, "packed_bf16", lambda: "no oneDNN here")
    model = build(WIDER_GPT2, "bfloat16")
    with caplog.at_level(logging.INFO, logger="nlgen"):
        assert lean_weights.pack(model) == 0
    assert "plain layout (no oneDNN here)" in caplog.text
    _, got, expected = greedy_both(model)  # and the loop runs on the plain layers
    assert got.tolist() == expected.tolist()
    assert type(model.lm_head).__name__ == "Linear"


def test_a_released_weight_leaves_the_process_and_reads_back_unchanged(tmp_path):
    """nlgen.engine.packed.release: the pages of a memory-mapped weight, once packed, leave
    this process (RssFile in /proc/self/status falls by the weight's size); reading it again
    maps them back with the same values. A tensor in torch's own memory is left alone."""
    import sys

    if sys.platform != "linux":
        pytest.skip("madvise is Linux's")
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nlgen.engine import packed

    def file_pages_kb() -> int:
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(ln for ln in f if ln.startswith("RssFile:")).split()[1])

    save_file({"w": torch.randn(4096, 2048).to(torch.bfloat16)}, tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        weight = f.get_tensor("w")  # 16 MB, memory-mapped
    assert not weight.untyped_storage().resizable()
    own = weight.clone()
    weight.float().sum()  # every page read
    read = file_pages_kb()
    packed.release([weight])
    assert read - file_pages_kb() > 12_000
    assert torch.equal(weight, own)  # mapped again, unchanged
    packed.release([own])  # torch's own memory
    assert torch.equal(weight, own)
    # Memory that is not a read-only mapping of a file (DONTNEED would zero it) is left alone.
    import numpy as np

    array = np.ones((4096, 1024), dtype=np.float32)  # 16 MB of anonymous memory
    borrowed = torch.from_numpy(array)
    assert not borrowed.untyped_storage().resizable()
    packed.release([borrowed])
    assert bool((borrowed == 1).all())
