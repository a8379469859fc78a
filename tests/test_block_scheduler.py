"""The per-parameter-block gradient-aware scheduler (cmalign.objective.block_scheduler): it throttles the blocks
where the alignment gradient opposes (or dwarfs) the contrastive one, leaves the others alone, lets a throttled
block recover, and resumes exactly; in the TPC-CMA step its measurement leaves the update unchanged."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from cmalign.objective.block_scheduler import BlockScheduler, block_of, parameter_blocks
from cmalign.objective.cma_loss import CMALoss
from cmalign.objective.config import GradSchedulerConfig
from cmalign.objective.grad_scheduler import GradScheduler
from cmalign.objective.step import TPCCMAStep
from cmalign.train.optimizer import apply_block_scales, step_optimizer


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(4, 4)
        self.second = torch.nn.Linear(4, 4)


def block_sums(model: torch.nn.Module, loss_c: torch.Tensor, loss_a: torch.Tensor) -> dict:
    """(<g_c, g_a>, |g_c|², |g_a|²) per block, from autograd on the two losses."""
    names, params = zip(*model.named_parameters(), strict=True)
    gc = torch.autograd.grad(loss_c, params, retain_graph=True, allow_unused=True)
    ga = torch.autograd.grad(loss_a, params, allow_unused=True)
    sums: dict[str, list[float]] = {}
    for n, p, a, b in zip(names, params, gc, ga, strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        s = sums.setdefault(block_of(n), [0.0, 0.0, 0.0])
        s[0] += float((a * b).sum())
        s[1] += float((a * a).sum())
        s[2] += float((b * b).sum())
    return {k: tuple(v) for k, v in sums.items()}


def opposing_losses(model: TwoBlocks, conflict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """L_c pulls both blocks' weights one way; L_a pulls ``first`` the opposite way (if ``conflict``) and
    ``second`` the same way, at a third of L_c's strength: cos = −1 on ``first``, +1 on ``second``, ratio < 1."""
    c1 = torch.linspace(-1, 1, 16).reshape(4, 4)
    c2 = torch.linspace(0.5, 2, 16).reshape(4, 4)
    f, s = model.first.weight, model.second.weight
    loss_c = (c1 * f).sum() + (c2 * s).sum()
    loss_a = ((-c1 if conflict else c1) * f).sum() / 3 + (c2 * s).sum() / 3
    return loss_c, loss_a


def scheduler(**kw) -> BlockScheduler:
    model = TwoBlocks()
    return BlockScheduler(GradSchedulerConfig(mode="block", **kw), list(parameter_blocks(model.named_parameters())))


def test_blocks_are_transformer_layers_or_modules() -> None:
    assert block_of("visual.transformer.resblocks.3.mlp.c_fc.weight") == "visual.transformer.resblocks.3"
    assert block_of("transformer.resblocks.11.ln_1.bias") == "transformer.resblocks.11"
    assert block_of("visual.conv1.weight") == "visual.conv1"
    assert block_of("logit_scale") == "logit_scale"
    assert block_of("visual.conv1.weight", "tensor") == "visual.conv1.weight"


def test_conflicting_block_is_throttled_and_aligned_block_left_alone() -> None:
    model, sched = TwoBlocks(), scheduler()
    m = sched.update(block_sums(model, *opposing_losses(model)), alpha=1.0)
    assert m.cos["first"] == pytest.approx(-1.0, abs=1e-6)
    assert m.cos["second"] == pytest.approx(1.0, abs=1e-6)
    assert sched.scales["first"] == 0.25  # max(min_lr_scale, 1 + cos) = max(0.25, 0)
    assert sched.scales["second"] == 1.0
    assert sched.to_log() == {"blocks_throttled": 0.5, "block_lr_scale_mean": 0.625, "alpha_scale": 1.0}


def test_partial_conflict_scales_by_one_plus_cosine() -> None:
    sched = scheduler()
    sched.update({"first": (-0.3, 1.0, 1.0), "second": (0.0, 1.0, 0.0)}, alpha=0.5)  # cos −0.3, ratio 0.5
    assert sched.scales["first"] == pytest.approx(0.7)
    assert sched.scales["second"] == 1.0  # the alignment term does not reach it


def test_dwarfing_alignment_gradient_is_capped_by_ratio() -> None:
    # aligned directions, but α|g_a| = 4 |g_c|: the block's learning rate scales by block_max_ratio / ratio
    sched = scheduler(block_max_ratio=1.0, min_lr_scale=0.1)
    sched.update({"first": (4.0, 1.0, 16.0), "second": (1.0, 1.0, 1.0)}, alpha=1.0)
    assert sched.scales["first"] == pytest.approx(0.25)
    sched = scheduler(block_max_ratio=2.0)
    sched.update({"first": (4.0, 1.0, 16.0), "second": (1.0, 1.0, 1.0)}, alpha=1.0)
    assert sched.scales["first"] == pytest.approx(0.5)
    assert sched.scales["second"] == 1.0


def test_conflict_threshold_ignores_mild_conflicts() -> None:
    sched = scheduler(conflict_cos=0.2)
    sched.update({"first": (-0.1, 1.0, 1.0), "second": (-0.5, 1.0, 1.0)}, alpha=0.5)
    assert sched.scales == {"first": 1.0, "second": 0.5}


def test_throttled_block_recovers_once_the_conflict_passes() -> None:
    model, sched = TwoBlocks(), scheduler(recovery=0.5)
    sched.update(block_sums(model, *opposing_losses(model)), alpha=1.0)
    seen = []
    for _ in range(3):
        sched.update(block_sums(model, *opposing_losses(model, conflict=False)), alpha=1.0)
        seen.append(sched.scales["first"])
    assert seen == pytest.approx([0.625, 0.8125, 0.90625])
    assert sched.throttles == 1  # only the first measurement lowered a scale
    # a new conflict drops it at once, not by EMA
    sched.update(block_sums(model, *opposing_losses(model)), alpha=1.0)
    assert sched.scales["first"] == 0.25


def test_alpha_is_scaled_when_the_alignment_gradient_outweighs_the_contrastive_one() -> None:
    # over the model α|g_a| / |g_c| = 0.5 · sqrt(8 + 8) / sqrt(1 + 1) = 1.41 > ρ_α = 0.5: α_eff = α · 0.5 / 1.41
    sched = scheduler(balance_ratio=0.5, block_max_ratio=100.0)
    m = sched.update({"first": (2.0, 1.0, 8.0), "second": (2.0, 1.0, 8.0)}, alpha=0.5)
    assert m.model_ratio == pytest.approx(0.5 * 8 ** 0.5)
    assert sched.alpha_scale == pytest.approx(0.5 / (0.5 * 8 ** 0.5))
    assert sched.scales == {"first": 1.0, "second": 1.0}  # aligned, under ρ: the blocks keep their lr
    # measured again at the α that acted, now under ρ_α: the scale recovers by EMA towards 1, not at once
    low = sched.alpha_scale
    m = sched.update({"first": (0.1, 1.0, 0.01), "second": (0.1, 1.0, 0.01)}, alpha=0.5 * low)
    assert m.model_ratio < 0.5
    assert sched.alpha_scale == pytest.approx(low + 0.5 * (1.0 - low))
    assert sched.to_log()["alpha_scale"] == sched.alpha_scale
    assert sched.min_alpha_scale_seen == pytest.approx(low)


def test_alpha_balance_off_and_under_ratio_leave_alpha_alone() -> None:
    assert GradSchedulerConfig().balance_ratio == 0.0  # opt-in: it did not earn the default (docs/method.md)
    off = scheduler(balance_ratio=0.0)
    off.update({"first": (2.0, 1.0, 100.0), "second": (2.0, 1.0, 100.0)}, alpha=0.5)
    assert off.alpha_scale == 1.0
    under = scheduler(balance_ratio=2.0)
    under.update({"first": (0.5, 1.0, 1.0), "second": (0.5, 1.0, 1.0)}, alpha=1.0)  # model ratio 1
    assert under.alpha_scale == 1.0


def test_state_resumes_exactly() -> None:
    model, a = TwoBlocks(), scheduler(balance_ratio=2.0)
    a.update(block_sums(model, *opposing_losses(model)), alpha=1.0)
    b = scheduler(balance_ratio=2.0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for sched in (a, b):
        sched.update({"first": (0.1, 1.0, 1.0), "second": (-0.2, 1.0, 1.0)}, alpha=1.0)
        sched.update({"first": (0.1, 1.0, 90.0), "second": (-0.2, 1.0, 1.0)}, alpha=1.0)  # lowers α
    assert a.alpha_scale < 1.0
    assert b.state_dict() == a.state_dict()
    # a checkpoint written before the α balance existed: α was never scaled
    old = {k: v for k, v in a.state_dict().items() if "alpha" not in k}
    c = scheduler()
    c.load_state_dict(old)
    assert c.alpha_scale == 1.0 and c.min_alpha_scale_seen == 1.0


def test_due_only_in_acting_phases_every_k_steps_with_alpha() -> None:
    sched = scheduler(every=10, from_phase=3)
    assert [s for s in range(40) if sched.due(s, 3, 0.5)] == [0, 10, 20, 30]
    assert not sched.due(10, 2, 0.05)
    assert not sched.due(10, 3, 0.0)


def test_scales_lower_only_their_blocks_learning_rate() -> None:
    model, sched = TwoBlocks(), scheduler()
    from cmalign.train.optimizer import split_by_block

    opt = torch.optim.SGD(split_by_block(model, [{"params": list(model.parameters())}], "layer"), lr=1.0)
    sched.update(block_sums(model, *opposing_losses(model)), alpha=1.0)
    apply_block_scales(opt, sched.scales)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.logit_scale = torch.nn.Parameter(torch.zeros(()))  # step_optimizer clamps it
    step_optimizer(model, opt, None, lr=0.1)
    assert torch.allclose(before["first.weight"] - model.first.weight, torch.full((4, 4), 0.025))
    assert torch.allclose(before["second.weight"] - model.second.weight, torch.full((4, 4), 0.1))


# ------------------------------------------------------------------ inside the TPC-CMA step, on a real tiny CLIP


@pytest.fixture(scope="module")
def tiny():
    from cmalign.model.loading import load_model

    torch.manual_seed(0)
    lm = load_model("cmalign-tiny", None)
    lm.model.eval()  # deterministic forward for comparing gradients between passes
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = lm.tokenizer([f"a caption about shape {i}" for i in range(8)])
    return lm.model, images, tokens


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("grad_div", [1.0, 2.0])
def test_measuring_step_accumulates_the_plain_gradient(tiny, grad_div: float) -> None:
    model, images, tokens = tiny
    cfg = GradSchedulerConfig(mode="block")
    blocks = BlockScheduler(cfg, list(parameter_blocks(model.named_parameters())))
    step = TPCCMAStep(model, CMALoss(), GradScheduler(cfg), blocks=blocks)
    model.zero_grad(set_to_none=True)
    step(images, tokens, 0.5, nullcontext, None, grad_div=grad_div)
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    _, d = step(images, tokens, 0.5, nullcontext, None, grad_div=grad_div, measure_blocks=True)
    measured = _grads(model)
    model.zero_grad(set_to_none=True)
    assert set(measured) == set(plain) and len(plain) > 10
    for n, g in plain.items():
        assert float((measured[n] - g).norm()) <= 1e-5 * float(g.norm()) + 1e-12, n
    assert blocks.measurements == 1 and d.blocks is not None
    assert set(d.blocks.cos) == set(blocks.blocks)
    assert d.to_log()["block_cos_min"] == min(c for c in d.blocks.cos.values() if c is not None)


def test_step_weights_the_alignment_term_by_alpha_times_its_scale(tiny) -> None:
    model, images, tokens = tiny
    cfg = GradSchedulerConfig(mode="block")
    step = TPCCMAStep(model, CMALoss(), GradScheduler(cfg),
                      blocks=BlockScheduler(cfg, list(parameter_blocks(model.named_parameters()))))
    model.zero_grad(set_to_none=True)
    row, d = step(images, tokens, 0.5, nullcontext, None, alpha_scale=0.25)
    scaled = _grads(model)
    model.zero_grad(set_to_none=True)
    ref_row, _ = step(images, tokens, 0.125, nullcontext, None)
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    assert (d.alpha, d.alpha_eff) == (0.5, 0.125)
    assert row["total"] == pytest.approx(ref_row["total"], rel=1e-6)
    for n, g in ref.items():
        assert float((scaled[n] - g).norm()) <= 1e-5 * float(g.norm()) + 1e-12, n
