"""Specification of model.py: the GPT-2 module, its helpers and its loaders.

Every model here is tiny (2 layers, width 32), so the whole file runs in seconds on a CPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, peak_flops, training_memory
from sophia import math_attention

V, T, C, L, H = 65, 16, 32, 2, 2  # vocab, block size, width, layers, heads
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def tiny(seed: int = 0, **overrides) -> GPT:
    args = {"vocab_size": V, "block_size": T, "n_layer": L, "n_head": H, "n_embd": C, "bias": True}
    args.update(overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**args)).eval()


def tokens(b: int = 3, t: int = T, seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randint(vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The GPT-2 forward pass written out by hand, with an explicit causal softmax
    attention: scores q.k / sqrt(head_dim), further divided by (layer index + 1) when
    scale_attn_by_inverse_layer_idx is set, future positions masked to -inf."""
    cfg = model.config
    tr = model.transformer
    b, t = idx.shape
    hd = cfg.n_embd // cfg.n_head
    x = tr.wte(idx) + tr.wpe(torch.arange(t))
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    for layer, block in enumerate(tr.h):
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(cfg.n_embd, dim=2)
        q, k, v = (z.view(b, t, cfg.n_head, hd).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        if cfg.scale_attn_by_inverse_layer_idx:
            scores = scores / (layer + 1)
        att = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, cfg.n_embd)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(tr.ln_f(x))


def hf_shaped_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """What GPT2LMHeadModel.state_dict() looks like for the same weights: Conv1D
    weights are stored transposed, and (older transformers) each attention layer
    carries a causal-mask buffer `.attn.bias` and a scalar `.attn.masked_bias`."""
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = v.t().clone() if k.endswith(HF_TRANSPOSED) else v.clone()
    t = model.config.block_size
    for i in range(model.config.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.ones(t, t, dtype=torch.bool).tril().view(1, 1, t, t)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


# ----------------------------------------------------------------------------- forward

def test_logits_cover_every_position_without_targets():
    logits, loss = tiny()(tokens(b=3, t=T))
    assert logits.shape == (3, T, V)
    assert loss is None


def test_last_only_returns_just_the_last_position_and_matches_the_full_pass():
    model, idx = tiny(), tokens(b=3, t=10)
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert last.shape == (3, 1, V)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_shorter_sequences_than_block_size_are_accepted():
    logits, _ = tiny()(tokens(b=2, t=5))
    assert logits.shape == (2, 5, V)


def test_sequence_longer_than_block_size_is_a_value_error():
    with pytest.raises(ValueError, match=f"exceeds block_size {T}"):
        tiny()(tokens(t=T + 1))


def test_loss_at_init_is_close_to_log_vocab_size():
    """With 0.02-std weights the initial logits are nearly uniform, so the cross-entropy
    of random targets is about ln(V): a larger value would mean a bad init."""
    model = tiny()
    _, loss = model(tokens(b=8, seed=1), tokens(b=8, seed=2))
    assert loss.item() == pytest.approx(math.log(V), abs=0.1)


def test_targets_minus_one_are_ignored_by_the_loss():
    model, idx, targets = tiny(), tokens(), tokens(seed=2)
    masked = targets.clone()
    masked[:, ::2] = -1
    logits, loss = model(idx, masked)
    expected = F.cross_entropy(logits[:, 1::2].reshape(-1, V), targets[:, 1::2].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_causal_future_tokens_do_not_change_past_logits():
    model, idx = tiny(), tokens(b=1)
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % V
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


# ----------------------------------------------------------------------------- init and structure

def test_token_embedding_is_tied_to_lm_head():
    model = tiny()
    assert model.transformer.wte.weight is model.lm_head.weight
    # The tied matrix is one parameter, counted once.
    assert sum(p is model.lm_head.weight for p in model.parameters()) == 1


def test_residual_projections_get_gpt2_scaled_init_std():
    """GPT-2 init: N(0, 0.02) everywhere, except the two residual projections per block
    (attn.c_proj, mlp.c_proj), which get 0.02/sqrt(2 n_layer); biases start at 0."""
    n_layer = 8
    model = tiny(n_layer=n_layer, n_embd=64, n_head=4)
    scaled = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(scaled, rel=0.1), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name


def test_gptconfig_rejects_n_embd_not_divisible_by_n_head_naming_both():
    with pytest.raises(ValueError) as e:
        GPTConfig(n_embd=30, n_head=4)
    assert "n_embd=30" in str(e.value) and "n_head=4" in str(e.value)


@pytest.mark.parametrize("field", ["block_size", "vocab_size", "n_layer", "n_head", "n_embd"])
def test_gptconfig_rejects_non_positive_sizes(field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{field: 0})


def test_gptconfig_rejects_dropout_outside_0_1():
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)


def test_bias_false_model_has_no_biases():
    model = tiny(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]


# ----------------------------------------------------------------------------- attention

def test_attention_backends_agree_with_a_hand_written_causal_attention():
    """Default SDPA, the flash kernel forced (PyTorch has one for CPUs too, so this runs a
    fused kernel, not the math fallback), the math kernel forced by sophia.math_attention(), and
    an explicit softmax(q k^T / sqrt(d)) v all give the same logits (float64, so only
    rounding can differ)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny().double()
    idx = tokens()
    with torch.no_grad():
        default, _ = model(idx)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash, _ = model(idx)
        with math_attention():
            math_kernel, _ = model(idx)
        reference = reference_logits(model, idx)
    for logits in (default, flash, math_kernel):
        torch.testing.assert_close(logits, reference, rtol=0, atol=1e-10)


def test_math_attention_supports_double_backward():
    """Sophia-H's Hessian-vector products differentiate through attention twice."""
    model = tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    with math_attention():
        _, loss = model(tokens(b=2), tokens(b=2, seed=3))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.randn_like(p) for p in params]
        hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)
    assert all(h.shape == p.shape for h, p in zip(hvp, params))
    assert any(h.abs().sum() > 0 for h in hvp)


def test_scale_attn_by_inverse_layer_idx_divides_scores_by_layer_plus_one():
    plain = tiny().double()
    scaled = tiny(scale_attn_by_inverse_layer_idx=True).double()
    scaled.load_state_dict(plain.state_dict())  # same weights; only the flag differs
    idx = tokens()
    with torch.no_grad():
        a, _ = plain(idx)
        b, _ = scaled(idx)
        reference = reference_logits(scaled, idx)
    assert not torch.allclose(a, b)  # layer 1 scores are halved
    torch.testing.assert_close(b, reference, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- crop_block_size

def test_crop_block_size_keeps_the_first_positions():
    model = tiny()
    idx = tokens(t=8)
    before, _ = model(idx)
    wpe = model.transformer.wpe.weight.detach().clone()
    model.crop_block_size(8)
    assert model.config.block_size == 8
    assert model.transformer.wpe.weight.shape == (8, C)
    torch.testing.assert_close(model.transformer.wpe.weight, wpe[:8])
    assert any(p is model.transformer.wpe.weight for p in model.parameters())
    after, _ = model(idx)
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(tokens(t=9))


def test_crop_block_size_cannot_grow():
    with pytest.raises(ValueError, match="cannot grow"):
        tiny().crop_block_size(T + 1)


# ----------------------------------------------------------------------------- generate

def test_generate_appends_max_new_tokens():
    idx = tokens(b=2, t=5)
    out = tiny().generate(idx, max_new_tokens=7, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 12)
    assert torch.equal(out[:, :5], idx)
    assert int(out.max()) < V and int(out.min()) >= 0


def test_generate_beyond_block_size_conditions_on_the_last_block():
    out = tiny().generate(tokens(b=1, t=T), max_new_tokens=T + 3, temperature=0.0)
    assert out.shape == (1, 2 * T + 3)


def test_generate_with_temperature_zero_is_greedy_and_deterministic():
    model, idx = tiny(), tokens(b=2, t=4)
    a = model.generate(idx, max_new_tokens=6, temperature=0.0)
    b = model.generate(idx, max_new_tokens=6, temperature=0.0)
    assert torch.equal(a, b)
    greedy = idx
    for _ in range(6):
        logits, _ = model(greedy)
        greedy = torch.cat([greedy, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(a, greedy)
    # top_k=1 sampling is greedy too, whatever the temperature.
    c = model.generate(idx, max_new_tokens=6, temperature=5.0, top_k=1)
    assert torch.equal(c, greedy)


def test_generate_sampling_is_reproducible_with_a_seeded_generator():
    model, idx = tiny(), tokens(b=4, t=2)
    a = model.generate(idx, 20, temperature=2.0, generator=torch.Generator().manual_seed(5))
    b = model.generate(idx, 20, temperature=2.0, generator=torch.Generator().manual_seed(5))
    c = model.generate(idx, 20, temperature=2.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- Hugging Face weights

def test_load_hf_state_dict_maps_gpt2lmheadmodel_layout_back_exactly():
    source = tiny(seed=0)
    target = tiny(seed=1)
    target.load_hf_state_dict(hf_shaped_state_dict(source))
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert target.transformer.wte.weight is target.lm_head.weight  # still tied
    idx = tokens()
    assert torch.equal(target(idx)[0], source(idx)[0])


def test_load_hf_state_dict_rejects_missing_tensors_and_wrong_shapes():
    sd = hf_shaped_state_dict(tiny())
    missing = dict(sd)
    del missing["transformer.ln_f.weight"]
    with pytest.raises(ValueError, match="state dict mismatch"):
        tiny().load_hf_state_dict(missing)
    wrong = dict(sd)
    wrong["transformer.wpe.weight"] = torch.zeros(T + 1, C)
    with pytest.raises(ValueError, match="transformer.wpe.weight"):
        tiny().load_hf_state_dict(wrong)


@pytest.mark.parametrize("scale_by_layer", [False, True])
def test_load_hf_state_dict_reproduces_transformers_gpt2_logits(scale_by_layer):
    """Against the real GPT2LMHeadModel with GPT-2's own activation, the tanh GELU
    approximation "gelu_new" (skipped without `transformers`)."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        scale_attn_by_inverse_layer_idx=scale_by_layer)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = tiny(seed=1, scale_attn_by_inverse_layer_idx=scale_by_layer)
    ours.load_hf_state_dict(hf.state_dict())
    idx = tokens()
    with torch.no_grad():
        expected = hf(idx).logits
        actual, _ = ours(idx)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_from_pretrained_reads_the_local_cache_first_and_reproduces_gpt2_logits(gpt2_hub):
    model = GPT.from_pretrained("gpt2").eval()
    assert gpt2_hub.calls == [True], "cached weights need no network"
    idx = tokens(vocab=50257)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], gpt2_hub.model(idx).logits, rtol=1e-4, atol=1e-5)


def test_from_pretrained_downloads_what_the_cache_lacks(gpt2_hub):
    gpt2_hub.cached = False
    GPT.from_pretrained("gpt2")
    assert gpt2_hub.calls == [True, False]


def test_from_pretrained_without_cache_or_network_says_how_to_get_the_weights(gpt2_hub):
    gpt2_hub.cached = gpt2_hub.online = False
    with pytest.raises(OSError, match="neither in the Hugging Face cache nor reachable on the Hub.*HF_HOME"):
        GPT.from_pretrained("gpt2")


# ----------------------------------------------------------------------------- accounting

@pytest.mark.parametrize("shards", [1, 2])
def test_training_memory_counts_the_parameters_without_building_the_model(shards):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=False)
    need = training_memory(config, batch_size=3, activation_bytes=4, state_bytes=8, shards=shards)
    params = sum(p.numel() for p in GPT(config).parameters())
    assert need["params"] == params
    assert (need["weights"], need["gradients"], need["optimizer state"]) == (4 * params // shards,
                                                                              4 * params // shards, 8 * params // shards)
    assert need["activations"] == 3 * 16 * (17 * 2 * 32 * 4 + 65 * 12)


def test_get_num_params_matches_the_gpt2_formula():
    """Per block 12C^2 weights and 13C biases/gains, plus ln_f (2C) and the tied
    V x C embedding; the position embedding is left out by default."""
    model = tiny()
    non_embedding = V * C + L * (12 * C * C + 13 * C) + 2 * C
    assert model.get_num_params() == non_embedding
    assert model.get_num_params(non_embedding=False) == non_embedding + T * C


def test_flops_per_token_is_6n_plus_attention_term():
    model = tiny()
    assert model.flops_per_token() == 6 * model.get_num_params() + 12 * L * C * T


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10", 125e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA B200", 312e12),  # not in the table: the A100 fallback
])
def test_peak_flops_looks_up_the_gpu_by_model_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda") == peak
    model = tiny()
    assert model.estimate_mfu(tokens_per_iter=1000, dt=1.0, device="cuda") == pytest.approx(
        1000 * model.flops_per_token() / peak)


def test_estimate_mfu_is_none_on_cpu():
    model = tiny()
    assert peak_flops("cpu") is None
    assert model.estimate_mfu(tokens_per_iter=1024, dt=0.1, device="cpu") is None


@pytest.mark.parametrize("bias", [True, False])
def test_param_groups_hold_every_parameter_once_and_decay_only_matrices(bias):
    model = tiny(bias=bias)
    decay, no_decay = model.param_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(grouped) == len(set(grouped))  # no parameter twice (the tied matrix included)
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert any(p is model.lm_head.weight for p in decay["params"])
    assert no_decay["params"]  # LayerNorm gains, even without biases
