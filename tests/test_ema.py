import pytest
import torch
from torch import nn

from mnemoguard.ema import EMAModel


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _perturb(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_update_matches_the_reference_recurrence():
    model = _model()
    ema = EMAModel(model, decay=0.9)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(1, 30):
        _perturb(model)
        ema.step(model)
        d = min((1 + (step - 1)) / (10 + (step - 1)), 0.9) if step > 1 else 0.0
        for n, p in model.named_parameters():
            ref[n] = d * ref[n] + (1 - d) * p.detach()
        assert ema.cur_decay_value == pytest.approx(d)
    for n in ref:
        torch.testing.assert_close(ema.shadow[n], ref[n])
    assert ema.optimization_step == 29


def test_lag_sets_the_decay_and_its_mean_lag():
    assert EMAModel(_model(), lag=99).decay == pytest.approx(0.99)
    # a constant-decay EMA of a linear ramp trails it by `lag` steps
    lin = nn.Linear(1, 1, bias=False)
    ema = EMAModel(lin, lag=20, min_decay=20 / 21)
    for t in range(1, 2001):
        with torch.no_grad():
            lin.weight.fill_(float(t))
        ema.step(lin)
    assert ema.shadow["weight"].item() == pytest.approx(2000 - 20, abs=0.5)


def test_only_trainable_parameters_are_tracked():
    model = _model()
    model[0].requires_grad_(False)
    ema = EMAModel(model)
    assert ema.names == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        EMAModel(_model().requires_grad_(False))


def test_functional_call_uses_ema_weights_and_leaves_live_weights_untouched():
    model = _model()
    ema = EMAModel(model, decay=0.5)
    for _ in range(5):
        _perturb(model)
        ema.step(model)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 4)
    out_functional = ema.functional_call(model, (x,))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, live[n], rtol=0, atol=0)
    with ema.average_parameters(model):
        out_swapped = model(x)
    torch.testing.assert_close(out_functional, out_swapped)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, live[n], rtol=0, atol=0)
    assert not torch.allclose(out_functional, model(x))


def test_average_parameters_restores_even_when_the_block_raises():
    model = _model()
    ema = EMAModel(model)
    _perturb(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with ema.average_parameters(model):
            raise RuntimeError("boom")
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_snapshot_ring_keeps_the_newest_live_weights():
    model = _model()
    ema = EMAModel(model, snapshot_every=2, num_snapshots=3)
    for step in range(1, 11):
        _perturb(model)
        ema.step(model)
        if step == 8:
            at_8 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ema.snapshot_steps == [6, 8, 10]
    for n in at_8:
        assert torch.equal(ema.weights(1)[n], at_8[n])
    with pytest.raises(ValueError, match="snapshot_every"):
        EMAModel(model, snapshot_every=2)


def test_state_dict_round_trip_keeps_counters_and_weights():
    model = _model()
    ema = EMAModel(model, snapshot_every=1, num_snapshots=2)
    for _ in range(4):
        _perturb(model)
        ema.step(model)
    restored = EMAModel(_model(seed=1), snapshot_every=1, num_snapshots=2)
    restored.load_state_dict(ema.state_dict())
    assert restored.optimization_step == 4 and restored.snapshot_steps == [3, 4]
    for n in ema.names:
        assert torch.equal(restored.shadow[n], ema.shadow[n])
    with pytest.raises(ValueError, match="do not match"):
        EMAModel(nn.Linear(2, 2)).load_state_dict(ema.state_dict())


def test_diffusers_style_parameters_iterable_and_store_restore():
    model = _model()
    ema = EMAModel(model)
    _perturb(model)
    ema.step(model.parameters())
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, ema.shadow[n])
    ema.restore(model.parameters())
    with pytest.raises(RuntimeError, match="without a previous store"):
        ema.restore(model.parameters())


def test_storage_dtype_and_device():
    model = _model()
    ema = EMAModel(model, device="cpu", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in ema.shadow.values())
    ema.step(model)
    out = ema.functional_call(model, (torch.randn(2, 4),))
    assert out.dtype == torch.float32
