"""Published DiT-MoE weights (feizc/DiT-MoE) served as they are: both attention layouts map onto RaceDiT
with forward parity and the same top-k experts for every token, through racedit's own sparse dispatch,
batch-invariant, with expert usage reported; and `calibrate` with routing "threshold" gives such a
token-choice checkpoint threshold routing on its own gates (the compute dial then works on it).

DiT-MoE's code is not a package and is not copied here: `Reference` below is an independent
re-expression of its forward from the published definition (module names chosen so its state dict
carries DiT-MoE's keys), tiny and random."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from racedit.model import CheckpointError, generate, load, save
from racedit.model.training.calibrate import calibrate
from racedit.model.training.config import Calibration
from racedit.model.training.import_dit_moe import detect_layout, import_dit_moe

D, HEADS, DEPTH, EXPERTS, K, PATCH, SIZE, CHANNELS, CLASSES = 64, 4, 2, 4, 2, 2, 8, 4, 10


# ------------------------------------------------------- the reference ----
def sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos | sin] of t times frequencies 10000^(-i / (dim/2)), i = 0 .. dim/2 - 1."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def dit_positions(dim: int, grid: int) -> torch.Tensor:
    """DiT's fixed table [L, dim]: token (r, c) = [sin, cos](c w) | [sin, cos](r w), w_i = 10000^(-i / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def axis(pos):
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


class SwiGLUExpert(nn.Module):
    """down(silu(gate_proj x) * up_proj x), no biases."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Softmax over all experts of x gate^T, each token's top-k weighted as they are, plus a shared expert."""

    def __init__(self, dim, experts, k):
        super().__init__()
        self.k = k
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.randn(experts, dim) * 0.25)
        self.experts = nn.ModuleList(SwiGLUExpert(dim, 4 * dim) for _ in range(experts))
        self.shared_experts = SwiGLUExpert(dim, 2 * dim)
        self.chosen = None  # the top-k experts of the last call [B, L, k]

    def forward(self, x):
        probs = torch.softmax(x @ self.gate.weight.t(), dim=-1)
        weight, index = probs.topk(self.k, dim=-1)
        self.chosen = index
        every = torch.stack([expert(x) for expert in self.experts], dim=-2)  # [B, L, E, D]: a reference, dense
        picked = every.gather(-2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))
        return (weight.unsqueeze(-1) * picked).sum(-2) + self.shared_experts(x)


class Attention(nn.Module):
    """timm layout: qkv, proj. Fused layout: Wqkv, LayerNorm(head dim) on q and k, out_proj."""

    def __init__(self, dim, heads, fused):
        super().__init__()
        self.heads, self.fused = heads, fused
        if fused:
            self.Wqkv = nn.Linear(dim, 3 * dim)
            self.q_norm = nn.LayerNorm(dim // heads, eps=1e-6)
            self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6)
            self.out_proj = nn.Linear(dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = (self.Wqkv if self.fused else self.qkv)(x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.unbind(2)  # [b, n, heads, d_head]
        if self.fused:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return (self.out_proj if self.fused else self.proj)(out)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, HEADS, fused)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.moe = MoE(D, EXPERTS, K)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        s1, a1, g1, s2, a2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, a1))
        return x + g2[:, None] * self.moe(modulate(self.norm2(x), s2, a2))


class Reference(nn.Module):
    """A DiT-MoE: patches + DiT positions, c = MLP(sinusoid(t)) + class table, adaLN-Zero blocks of
    attention and MoE, a final adaLN layer to p*p*2C (the second half: learned variance), unpatchify."""

    def __init__(self, fused: bool, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(CHANNELS, D, PATCH, stride=PATCH)
        grid = SIZE // PATCH
        self.pos_embed = nn.Parameter(dit_positions(D, grid)[None], requires_grad=False)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(CLASSES + 1, D)
        self.blocks = nn.ModuleList(Block(fused) for _ in range(DEPTH))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(D, PATCH * PATCH * 2 * CHANNELS)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        with torch.no_grad():  # random everywhere (no zero-initialised parts), gates peaked enough to route
            for name, p in self.named_parameters():
                if name != "pos_embed" and not name.endswith("gate.weight"):
                    p.add_(torch.randn_like(p) * 0.05)
                if "norm" in name:  # q_norm / k_norm affine
                    p.add_(torch.randn_like(p) * 0.3)

    def forward(self, x, t, y):
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(sinusoid(t)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        out = self.final_layer.linear(modulate(self.final_layer.norm_final(h), shift, scale))
        g, p, ch = SIZE // PATCH, PATCH, 2 * CHANNELS
        out = out.reshape(-1, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(-1, ch, g * p, g * p)


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def inputs(n=6, seed=0, native_t=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CHANNELS, SIZE, SIZE, generator=g)
    steps = torch.tensor([0, 1, 250, 500, 998, 999])[:n]  # DiT's integer timesteps
    y = torch.tensor([0, 3, 9, 10, 5, 1])[:n]  # 10 = the null class
    return x, steps, y


# -------------------------------------------------------------- mapping ----
@pytest.mark.parametrize("fused", [False, True], ids=["timm-S/B", "fused-XL/G"])
def test_dit_moe_weights_import_with_forward_parity_and_the_same_experts(fused):
    reference = Reference(fused).eval()
    state = reference.state_dict()
    assert detect_layout(state) == ("fused" if fused else "timm")
    model = import_dit_moe(state, num_heads=HEADS)  # timm-layout weights do not record it
    cfg = model.config
    family = cfg.family
    assert (cfg.objective, family.family, family.time, family.time_scale, cfg.qk_norm, cfg.learn_sigma) == (
        ("rectified_flow", "dit-moe", "noise_at_1", 1.0, True, True)
        if fused
        else ("ddpm_eps", "dit-moe", "timesteps", 1.0, False, True)
    )
    moe = cfg.moe
    assert (moe.spec, moe.routing, moe.gating, moe.expert_kind, moe.shared_expert_hidden) == (
        "2in4",
        "token_choice",
        "softmax",
        "swiglu",
        2 * D,
    )
    x, steps, y = inputs()
    t = steps / 999 if fused else steps.float()  # what each family's network is fed
    with torch.no_grad():
        want = reference(x, t, y)[:, :CHANNELS]
        chosen = [block.moe.chosen for block in reference.blocks]
        out = model(x, t, y, return_stats=True)  # S/B: DiT's integer timesteps pass through as they are
    assert rel_l2(out.prediction[:, :CHANNELS], want) <= 1e-5  # S/B also return DiT's variance half
    for layer, (routing, index) in enumerate(zip(out.stats.routing, chosen)):
        want_mask = torch.zeros_like(routing.mask).scatter_(-1, index, True)
        assert torch.equal(routing.mask, want_mask), f"layer {layer} chose other experts"
    assert (out.stats.experts_per_token == K).all()


def test_a_pt_file_imports_and_a_pickle_with_objects_is_refused(tmp_path):
    reference = Reference(fused=True)
    torch.save({"ema": reference.state_dict(), "opt": {}}, tmp_path / "dit_moe.pt")  # nested as training saves
    model = import_dit_moe(tmp_path / "dit_moe.pt")
    assert model.config.moe.num_experts == EXPERTS
    torch.save({"ema": reference.state_dict(), "args": object()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        import_dit_moe(tmp_path / "pickled.pt")


def test_an_unknown_layout_names_the_keys_that_did_not_fit():
    state = Reference(fused=False).state_dict()
    state["blocks.1.attn.extra.weight"] = state.pop("blocks.1.attn.proj.weight")
    with pytest.raises(CheckpointError, match=r"timm.*missing blocks\.1\.attn\.proj\.weight.*blocks\.1\.attn\.extra"):
        import_dit_moe(state, num_heads=HEADS)


# ---------------------------------------------------- serving its weights ----
@pytest.fixture(scope="module")
def served():
    """The fused (rectified-flow) tiny DiT-MoE as racedit serves it."""
    return import_dit_moe(Reference(fused=True, seed=1).state_dict())


def test_dit_moe_rows_are_batch_invariant_and_report_their_experts(served):
    x, steps, y = inputs()
    t = steps / 999
    with torch.no_grad():
        together = served(x, t, y, return_stats=True)
        alone = [served(x[i : i + 1], t[i : i + 1], y[i : i + 1]).prediction for i in range(len(y))]
    assert all(torch.equal(together.prediction[i : i + 1], a) for i, a in enumerate(alone))
    images, usage = generate(served, [1, 2], cfg_scale=[4.0, 1.0], num_steps=3, seeds=[0, 1], as_float=True)
    assert images.shape == (2, CHANNELS, SIZE, SIZE)
    assert [u.mean_experts_per_token for u in usage] == [K, K]  # token choice: k for every token
    assert all(sum(sum(layer.expert_load) for layer in u.per_layer) > 0 for u in usage)


def test_calibrate_gives_a_token_choice_checkpoint_threshold_routing_on_its_own_gates(served, tmp_path):
    model = import_dit_moe(Reference(fused=True, seed=1).state_dict())
    with pytest.raises(ValueError, match="routing 'threshold'"):
        calibrate(model)  # a token-choice model has no threshold to re-estimate
    calibration = Calibration(num_images=4, num_steps=4)
    record = calibrate(model, calibration, routing="threshold", budgets=[0.5, 1.0, 1.5])
    assert model.config.moe.routing == "threshold"
    assert (record["routing_before"], record["routing"]) == ("token_choice", "threshold")
    history = record["mean_experts_per_token_by_iteration"]
    assert history[0] == K and abs(history[-1] - K) < 0.35  # top-k first, then its thresholds: near k
    realised = record["budget_table"]["mean_experts_per_token"]
    assert realised[0] < realised[1] < realised[2]
    path = save(model, tmp_path / "dit-moe-race", metadata=model.metadata)
    loaded = load(path)
    assert loaded.config.moe.routing == "threshold"
    labels, seeds = [1, 2, 3], [0, 1, 2]
    _, full = generate(loaded, labels, cfg_scale=4.0, num_steps=4, seeds=seeds)
    _, half = generate(loaded, labels, cfg_scale=4.0, num_steps=4, seeds=seeds, expert_budget=0.5)
    assert sum(u.mean_experts_per_token for u in half) < sum(u.mean_experts_per_token for u in full)
    per_step = full[0].per_step
    assert len(per_step) == 4 and len(set(per_step)) > 1  # compute follows t
    # `inference: topk` gives the checkpoint's own top-k routing back
    loaded.config.moe.inference = "topk"
    x, steps, y = inputs()
    with torch.no_grad():
        topk = loaded(x, steps / 999, y).prediction
        original = served(x, steps / 999, y).prediction
    assert torch.equal(topk, original)


def test_the_new_moe_options_are_typed():
    from racedit.model.config import ConfigError, ModelConfig, preset_config

    with pytest.raises(ConfigError, match="shared_expert_hidden is set but moe.shared_expert is false"):
        preset_config("tiny", moe={"shared_expert_hidden": 32})
    with pytest.raises(ConfigError, match="moe.expert_kind must be gelu or swiglu"):
        preset_config("tiny", moe={"expert_kind": "relu"})
    with pytest.raises(ConfigError, match="model.conventions.time_scale must be > 0"):
        preset_config("tiny", conventions={"time_scale": 0.0})
    old = preset_config("tiny").to_dict()
    for key in ("conventions", "qk_norm"):  # a checkpoint written before these fields loads as before
        old.pop(key)
    for key in ("expert_kind", "expert_bias", "shared_expert_hidden", "router_bias"):
        old["moe"].pop(key)
    config = ModelConfig.from_dict(old)
    assert (config.family.time_scale, config.qk_norm, config.moe.expert_kind, config.moe.expert_bias) == (
        1000.0,
        False,
        "gelu",
        True,
    )


def test_a_dit_moe_exports_to_onnx_with_its_routing(tmp_path):
    import onnxruntime as ort

    from racedit.export.onnx_export import ServedDenoiser, example_inputs, export_onnx
    from racedit.model import EXPORT

    model = import_dit_moe(Reference(fused=True, seed=1).state_dict()).with_execution(EXPORT)
    session = ort.InferenceSession(
        str(export_onnx(model, tmp_path / "dit-moe.onnx")), providers=["CPUExecutionProvider"]
    )
    x, t, y = example_inputs(model, 3, seed=7)
    with torch.no_grad():
        v, ept, load_ = ServedDenoiser(model)(x, t, y)
    out_v, out_ept, out_load = session.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})
    assert abs(out_v - v.numpy()).max() < 1e-4
    assert (out_ept == ept.numpy()).all() and (out_load == load_.numpy()).all() and (out_ept == K).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled grouped SwiGLU kernel)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_a_dit_moes_rows_are_batch_invariant(dtype):
    from racedit.model import SERVING

    cpu = import_dit_moe(Reference(fused=True, seed=1).state_dict())
    model = import_dit_moe(Reference(fused=True, seed=1).state_dict()).prepare(torch.device("cuda"), dtype, SERVING)
    x, steps, y = (v.cuda() for v in inputs())
    t = steps / 999
    with torch.no_grad():
        together = model(x, t, y).prediction
        alone = [model(x[i : i + 1], t[i : i + 1], y[i : i + 1]).prediction for i in range(len(y))]
        reference = cpu(x.cpu(), t.cpu(), y.cpu()).prediction
    assert all(torch.equal(together[i : i + 1], a) for i, a in enumerate(alone))
    assert rel_l2(together.cpu(), reference) < (1e-5 if dtype == torch.float32 else 3e-2)


def test_the_cli_imports_a_dit_moe_file_and_gives_it_race_routing(tmp_path):
    """`racedit import FILE` recognises DiT-MoE by its gates; `racedit calibrate --routing threshold` then
    gives the imported token-choice checkpoint threshold routing and a budget table."""
    import subprocess
    import sys

    from racedit.model import load

    torch.save(Reference(fused=True, seed=2).state_dict(), tmp_path / "dit_moe_xl_tiny.pt")
    run = [sys.executable, "-m", "racedit.cli"]
    done = subprocess.run(
        [*run, "import", str(tmp_path / "dit_moe_xl_tiny.pt"), "--out", str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(dit-moe)" in done.stdout and load(tmp_path / "ck").config.family.family == "dit-moe"
    done = subprocess.run(
        [
            *run,
            "calibrate",
            str(tmp_path / "ck"),
            "--routing",
            "threshold",
            "--num-images",
            "2",
            "--num-steps",
            "3",
            "--budgets",
            "0.5",
            "1.0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model = load(tmp_path / "ck")
    assert model.config.moe.routing == "threshold" and model.budget_table.budgets == [0.5, 1.0]
    done = subprocess.run(
        [*run, "calibrate", str(tmp_path / "ck.missing")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "racedit calibrate: error" in done.stderr


def test_dit_moe_samples_as_its_sample_py_does():
    """S/B: DiT's ancestral DDPM with learned-range variance over respaced steps, guidance on 3 channels
    (tests/family_references.py's re-expression of DiT's p_sample_loop, which DiT-MoE's sample.py runs);
    XL/G: Euler from t = 1 to 0 with t fed unscaled and guidance on every channel. Same noise, relative
    L2 of the final samples <= 1e-5."""
    from family_references import dit_p_sample_loop

    label, seed, scale, steps = 3, 11, 4.0, 10

    def noise_of(count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:  # what racedit draws for the image
        g = torch.Generator().manual_seed(seed)
        shape = (1, CHANNELS, SIZE, SIZE)
        return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(count)]

    y = torch.tensor([label])
    timm = Reference(fused=False, seed=3).eval()
    got, _ = generate(
        import_dit_moe(timm.state_dict(), num_heads=HEADS),
        [label],
        cfg_scale=scale,
        num_steps=steps,
        seeds=[seed],
        sampler="ddpm",
        as_float=True,
    )
    noise, step_noises = noise_of(steps)
    with torch.no_grad():
        want = dit_p_sample_loop(lambda x, t, y: timm(x, t.float(), y), noise, y, CLASSES, scale, steps, step_noises)
    assert rel_l2(got, want) <= 1e-5, rel_l2(got, want)

    fused = Reference(fused=True, seed=4).eval()
    got, _ = generate(
        import_dit_moe(fused.state_dict()),
        [label],
        cfg_scale=scale,
        num_steps=steps,
        seeds=[seed],
        sampler="euler",
        as_float=True,
    )
    x, _ = noise_of(0)
    with torch.no_grad():
        for i in range(steps):
            t, t_next = 1 - i / steps, 1 - (i + 1) / steps
            rows = fused(torch.cat([x, x]), torch.full((2,), t), torch.cat([y, torch.tensor([CLASSES])]))[:, :CHANNELS]
            v = rows[1:] + scale * (rows[:1] - rows[1:])
            x = x + (t_next - t) * v
    assert rel_l2(got, x) <= 1e-5, rel_l2(got, x)
