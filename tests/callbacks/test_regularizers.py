"""Regularizers: each pure function against a hand-checkable reference, each switch, state round-trips, a real run."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mnemoguard.baselines import Baseline
from mnemoguard.callbacks import (
    REGULARIZERS,
    AntiGradientControl,
    BaselinePreservation,
    Callback,
    CaptionDropout,
    CaptionWordRepetition,
    GaussianEmbeddingNoise,
    MitigationPolicy,
    MultipleCaptions,
    RandomCaptionReplacement,
    RandomTokenAddition,
    TrainerControl,
    TrainerState,
    WenFilter,
    build_regularizer,
    build_regularizers,
)
from mnemoguard.callbacks.regularizers import (
    DuplicateWeight,
    TokenVocab,
    agc_keep,
    agc_update,
    caption_dropout,
    caption_word_repetition,
    drop_samples,
    duplicate_weights,
    gaussian_embedding_noise,
    insert_word,
    multiple_captions,
    preservation_loss,
    random_caption_replacement,
    random_token_addition,
    timestep_buckets,
    wen_filter_weights,
    wen_threshold,
)
from mnemoguard.config import ConfigError
from mnemoguard.family import Conditioning
from mnemoguard.prompts import PromptEncoder
from mnemoguard.trainer import Trainer

from ..contexts import make_context
from ..trainer_utils import tiny_recipe, unet_weights


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


VOCAB = TokenVocab(torch.tensor([10, 11, 12, 13]), lambda ids: " ".join(f"tok{i}" for i in ids))


# ---------------------------------------------------------------------------------------------------- pure functions
def test_drop_samples_renormalises_over_the_samples_still_active():
    w = torch.ones(4)
    assert drop_samples(w, torch.tensor([True, False, True, False])).tolist() == [2.0, 0.0, 2.0, 0.0]
    assert drop_samples(w, torch.tensor([True, False, True, False]), renormalize=False).tolist() == [1, 0, 1, 0]
    # An earlier filter dropped sample 1: 3 active -> 2 kept, survivors x 3/2 (filters compose).
    w = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert drop_samples(w, torch.tensor([True, True, False, True])).tolist() == [1.5, 0.0, 0.0, 1.5]
    assert drop_samples(w, torch.zeros(4, dtype=torch.bool)).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="shape"):
        drop_samples(w, torch.ones(3, dtype=torch.bool))


def test_wen_filter_weights_drop_the_samples_at_or_above_the_threshold():
    eps_u = torch.zeros(4, 1, 2, 2)
    eps_c = torch.zeros(4, 1, 2, 2)
    eps_c[:, 0, 0, 0] = torch.tensor([1.0, 3.0, 0.5, 2.0])  # per-sample L2 gaps 1, 3, 0.5, 2
    w, keep, gap = wen_filter_weights(torch.ones(4), eps_c, eps_u, threshold=2.0)
    assert gap.tolist() == [1.0, 3.0, 0.5, 2.0]
    assert keep.tolist() == [True, False, True, False] and w.tolist() == [2.0, 0.0, 2.0, 0.0]
    # Samples outside the band are kept whatever their gap.
    w, keep, _ = wen_filter_weights(torch.ones(4), eps_c, eps_u, 2.0, eligible=torch.tensor([1, 0, 1, 1]).bool())
    assert keep.tolist() == [True, True, True, False] and w.tolist() == pytest.approx([4 / 3, 4 / 3, 4 / 3, 0])
    assert wen_threshold(2.0, strength=2.0) == 1.0 and wen_threshold(2.0, 0.0) == math.inf
    assert wen_threshold(2.0, 1.0, numel=4096, reference_dim=16384) == pytest.approx(1.0)


def _sequential_update(table, loss, buckets, beta, valid=None):
    """The authors' loop, sample by sample in batch order (the reference the vectorised update must equal)."""
    new = table.clone()
    for i, (b, value) in enumerate(zip(buckets.tolist(), loss.tolist())):
        if valid is None or bool(valid[i]):
            new[b] = beta * new[b] + (1 - beta) * value
    return new


def test_agc_keep_and_update_follow_the_authors_rule():
    table = torch.tensor([0.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    loss = torch.tensor([0.5, 0.7, 2.0, 0.1])
    buckets = torch.tensor([0, 1, 2, 3])
    level = table[buckets] / 1.25  # a loss below avg / mem_ratio is flagged
    # keep iff l >= avg / 1.25: 0.5>=0, 0.7<0.8, 2.0>=1.6, 0.1>=0 (an unseen bucket keeps everything).
    assert agc_keep(loss, level).tolist() == [True, False, True, True]
    assert agc_keep(loss, level, strength=0.0).all()
    assert agc_keep(loss, level, strength=2.0).tolist() == [True, False, False, True]
    # Sequential update: two samples of one bucket both count, in batch order; the input table is untouched.
    new = agc_update(table, torch.tensor([1.0, 2.0]), torch.tensor([1, 1]), beta=0.8)
    assert new[1].item() == pytest.approx(0.8 * (0.8 * 1.0 + 0.2 * 1.0) + 0.2 * 2.0) and table[1] == 1.0
    # The vectorised update equals the sample-by-sample loop on a shuffled batch with repeats and invalid samples.
    g = gen(3)
    table = torch.rand(10, generator=g, dtype=torch.float64)
    b, loss = torch.randint(0, 10, (64,), generator=g), torch.rand(64, generator=g, dtype=torch.float64)
    valid = torch.rand(64, generator=g) > 0.2
    loss[~valid] = float("nan")
    torch.testing.assert_close(agc_update(table, loss, b, 0.8, valid), _sequential_update(table, loss, b, 0.8, valid))
    assert timestep_buckets(torch.tensor([0, 999, 500, 99]), 1000, 10).tolist() == [0, 9, 5, 0]
    assert timestep_buckets(torch.tensor([0, 999]), 1000, 1000).tolist() == [0, 999]


def test_insert_word_is_dcr_split_insert_join():
    assert insert_word("a b c", "X", 0) == "X a b c"
    assert insert_word("a b c", "X", 3) == "a b c X"
    assert insert_word("a  b", "X", 2) == "a  X b"  # split(" ") keeps empty words, as DCR does
    with pytest.raises(ValueError, match=r"position must be in \[0, 3\]"):
        insert_word("a b c", "X", 4)


def test_caption_word_repetition_matches_a_replay_of_the_draws():
    caps = ["a red car", "one"]
    out = caption_word_repetition(caps, 1.0, gen(5))
    g = gen(5)
    torch.rand(2, generator=g)  # the selection draws
    ref = []
    for c in caps:
        words, cur = c.split(" "), c
        for _ in range(2):
            word = words[int(torch.randint(0, len(words), (1,), generator=g))]
            cur = insert_word(cur, word, int(torch.randint(0, len(cur.split(" ")) + 1, (1,), generator=g)))
        ref.append(cur)
    assert out == ref
    assert out[1] == "one one one"
    for c, o in zip(caps, out):
        extra = o.split(" ")
        for w in c.split(" "):
            extra.remove(w)
        assert len(extra) == 2 and set(extra) <= set(c.split(" "))


def test_random_tokens_replace_and_insert_from_the_vocabulary():
    caps = ["a red car", "a dog"]
    rc = random_caption_replacement(caps, 1.0, VOCAB, gen(0))
    for c in rc:
        toks = c.split(" ")
        assert len(toks) == 4 and set(toks) <= {"tok10", "tok11", "tok12", "tok13"}
    rt = random_token_addition(caps, 1.0, VOCAB, gen(0))
    for c, o in zip(caps, rt):
        words = o.split(" ")
        assert len(words) == len(c.split(" ")) + 2
        assert [w for w in words if not w.startswith("tok")] == c.split(" ")  # original order kept
    # prob 0, or not eligible: unchanged; the selection draw u <= p selects about p of the captions.
    assert random_caption_replacement(caps, 0.0, VOCAB, gen(0)) == caps
    assert random_token_addition(caps, 1.0, VOCAB, gen(0), eligible=[False, False]) == caps
    many = random_caption_replacement(["x"] * 4000, 0.1, VOCAB, gen(1))
    assert abs(sum(c != "x" for c in many) / 4000 - 0.1) < 0.02
    with pytest.raises(ValueError, match="one entry per caption"):
        random_caption_replacement(caps, 1.0, VOCAB, gen(0), eligible=[True])


def test_multiple_captions_and_caption_dropout():
    caps = ["a", "b", "c"]
    pools = [["a1", "a2"], None, ["c1"]]
    out = multiple_captions(caps, pools, gen(0))
    assert out[0] in ("a1", "a2") and out[1] == "b" and out[2] == "c1"
    seen = {multiple_captions(["a"], [["a1", "a2"]], gen(s))[0] for s in range(20)}
    assert seen == {"a1", "a2"}  # uniform over the pool
    assert caption_dropout(caps, 1.0, gen(0)) == ["", "", ""]
    assert caption_dropout(caps, 0.0, gen(0)) == caps
    assert caption_dropout(caps, 1.0, gen(0), eligible=[True, False, True]) == ["", "b", ""]


def test_gaussian_embedding_noise_is_lambda_times_the_generators_normal_draw():
    emb = torch.zeros(3, 2, 4)
    out = gaussian_embedding_noise(emb, 0.1, gen(7))
    assert torch.allclose(out, 0.1 * torch.randn(3, 2, 4, generator=gen(7)))
    out = gaussian_embedding_noise(emb, 0.1, gen(7), eligible=torch.tensor([True, False, True]))
    assert out[1].abs().sum() == 0 and out[0].abs().sum() > 0


def test_preservation_loss_weighs_flagged_samples_like_the_main_loss():
    mask = torch.tensor([True, False, True, False])
    term, per = preservation_loss(torch.ones(4, 1, 2, 2), torch.zeros(4, 1, 2, 2), mask, weight=0.5)
    assert per.tolist() == [1.0] * 4 and term.item() == pytest.approx(0.5 * 2 / 4)
    with pytest.raises(ValueError, match="one entry per sample"):
        preservation_loss(torch.ones(3, 1), torch.zeros(3, 1), mask, 1.0)


def test_token_vocab_from_a_tokenizer_skips_special_tokens(tmp_path):
    from mnemoguard.trainer.tiny import build_tiny_clip_tokenizer

    tok = build_tiny_clip_tokenizer(tmp_path)
    vocab = TokenVocab.from_tokenizer(tok)
    assert vocab.ids.numel() == len(tok) - len(set(tok.all_special_ids))
    assert not set(vocab.ids.tolist()) & set(tok.all_special_ids)
    assert TokenVocab.from_tokenizer(tok, limit=5).ids.tolist() == [0, 1, 2, 3, 4]
    assert isinstance(vocab.decode(vocab.sample(2, gen(0))), str)


# ---------------------------------------------------------------------------------------------------- hooks, fakes
class FakeUNet(nn.Module):
    """ε = the mean of the text embedding, everywhere: the unconditional ε of a zero embedding is 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.config = SimpleNamespace(in_channels=1, sample_size=2)

    def forward(self, x, t, encoder_hidden_states=None, return_dict=True):
        out = self.w * encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x)
        return (out,) if not return_dict else SimpleNamespace(sample=out)


class Encoded(list):
    """The captions the fake text encoder was asked for, in order."""

    def __call__(self, captions):
        self.extend(captions)
        return torch.stack([torch.full((2, 3), float(len(c))) for c in captions])


def fake_context(**fields):
    encoded = Encoded()
    return make_context(unet=FakeUNet(), prompts=PromptEncoder(encoded), **fields), encoded


def batch(B=4, captions=None, t=None):
    """A micro-batch's inputs as ``Guard.before_forward`` hands them to the hooks (DDPM: levels = timesteps)."""
    captions = captions or ["a red car", "a dog", "", "one two"]
    timesteps = torch.tensor(t if t is not None else [100, 400, 600, 900][:B])
    ehs = torch.stack([torch.full((2, 3), float(len(c))) for c in captions[:B]])
    return {
        "captions": list(captions[:B]),
        "indices": torch.arange(B),
        "timesteps": timesteps,
        "levels": timesteps,
        "noisy_model_input": torch.zeros(B, 1, 2, 2),
        "encoder_hidden_states": ehs,
        "conditioning": Conditioning(ehs),
        "weights": torch.ones(B),
        "extra_loss": torch.zeros(()),
    }


def run_loss_hook(cb, inputs, context=None):
    cb.on_loss(TrainerState(), TrainerControl(), context=context or fake_context()[0], inputs=inputs)
    return inputs


def step_logs(cb, step=1):
    """What the regularizer reports at a logged step."""
    state, control, logs = TrainerState(global_step=step), TrainerControl(should_log=True), {}
    cb.on_step_end(state, control, context=None, logs=logs)
    return logs


def test_wen_filter_hook_drops_large_gaps_reports_and_switches():
    wen = WenFilter()
    param = nn.Parameter(torch.ones(4))
    inputs = batch()
    inputs["model_pred"] = torch.zeros(4, 1, 2, 2)
    inputs["model_pred"][:, 0, 0, 0] = torch.tensor([1.0, 3.0, 0.5, 2.5])  # eps_uncond = 0: gaps 1, 3, 0.5, 2.5
    inputs["loss_per_sample"] = param * 1.0
    context, encoded = fake_context()
    run_loss_hook(wen, inputs, context)
    assert inputs["weights"].tolist() == [2.0, 0.0, 2.0, 0.0] and encoded == [""]
    assert inputs["wen_gap"].tolist() == [1.0, 3.0, 0.5, 2.5]
    logs = step_logs(wen)
    assert logs["reg/wen_filter/kept_fraction"] == 0.5 and logs["reg/wen_filter/strength"] == 1.0
    # strength 2 halves the threshold: gap 1 is now dropped too, but only samples with t in [0, 500) are filtered.
    wen.activate(strength=2.0, band=(0, 500))
    inputs.update(weights=torch.ones(4))
    run_loss_hook(wen, inputs, context)
    assert inputs["weights"].tolist() == [0.0, 0.0, 2.0, 2.0] and encoded == [""]  # "" came from the cache
    wen.deactivate()
    inputs.update(weights=torch.ones(4))
    run_loss_hook(wen, inputs, context)
    assert inputs["weights"].tolist() == [1.0] * 4 and not wen.active
    assert "reg/wen_filter/kept_fraction" in step_logs(wen, 2)  # the logged window where it ran
    assert step_logs(wen, 3) == {}  # nothing since the last log: nothing reported


def test_agc_gates_on_the_loss_flag_table_before_it_is_updated():
    from mnemoguard.callbacks import LowLossFlags
    from mnemoguard.config import LossFlagsConfig

    context, _ = fake_context()
    flags = LowLossFlags(LossFlagsConfig(num_buckets=4))
    flags.on_train_begin(TrainerState(), TrainerControl(), context=context)
    agc = AntiGradientControl(enabled=False)

    def micro_batch(losses):
        inputs = {"loss_per_sample": torch.tensor(losses), "timesteps": torch.tensor([0, 250]),
                  "levels": torch.tensor([0, 250]),
                  "weights": torch.ones(2), "extra_loss": torch.zeros(()), "indices": torch.tensor([-1, -1]),
                  "captions": ["a", "b"]}
        for cb in (flags, agc):
            cb.on_loss(TrainerState(), TrainerControl(), context=context, inputs=inputs)
        return inputs

    inputs = micro_batch([1.0, 1.0])  # off; the table tracks all the same
    assert inputs["weights"].tolist() == [1.0, 1.0] and flags.table.tolist() == pytest.approx([0.2, 0.2, 0, 0])
    agc.activate()
    inputs = micro_batch([0.1, 1.0])  # 0.1 < 0.2 / 1.25: dropped (and flagged); 1.0 kept (x2)
    assert inputs["weights"].tolist() == [0.0, 2.0] and inputs["low_loss"].tolist() == [True, False]
    assert flags.table.tolist() == pytest.approx([0.8 * 0.2 + 0.2 * 0.1, 0.8 * 0.2 + 0.2 * 1.0, 0, 0])
    assert flags.last_ratio.tolist() == pytest.approx([0.5, 5.0])
    assert step_logs(agc)["reg/iet_agc/kept_fraction"] == 0.5
    with pytest.raises(ValueError, match="low_loss_level"):
        agc.on_loss(TrainerState(), TrainerControl(), context=context,
                    inputs=batch() | {"loss_per_sample": torch.ones(4)})


def test_caption_hooks_re_encode_changed_rows_and_leave_empty_captions():
    context, encoded = fake_context()
    state, control = TrainerState(), TrainerControl()
    cwr = CaptionWordRepetition(prob=1.0)
    inputs = batch()
    before = inputs["conditioning"].embeds.clone()
    cwr.on_before_forward(state, control, context=context, inputs=inputs)
    assert inputs["captions"][2] == ""  # the loop's dropped caption stays dropped
    for i in (0, 1, 3):
        assert len(inputs["captions"][i].split(" ")) == len(batch()["captions"][i].split(" ")) + 2
        assert inputs["conditioning"].embeds[i, 0, 0].item() == len(inputs["captions"][i])
    assert torch.equal(inputs["conditioning"].embeds[2], before[2])
    assert encoded == [inputs["captions"][i] for i in (0, 1, 3)] and len(context.prompts) == 0  # one-off: uncached

    rc = RandomCaptionReplacement(vocab=VOCAB, prob=1.0)
    rc.activate(band=(0, 500))
    inputs = batch()
    rc.on_before_forward(state, control, context=context, inputs=inputs)
    assert inputs["captions"][0].startswith("tok") and inputs["captions"][1].startswith("tok")
    assert inputs["captions"][3] == "one two"  # t = 900 is outside the band

    rt = RandomTokenAddition(vocab=VOCAB, prob=0.05)
    assert rt.prob == 0.05
    rt.activate(strength=40.0)
    assert rt.prob == 1.0  # strength multiplies the probability, capped at 1

    drop = CaptionDropout(prob=1.0)
    inputs = batch()
    drop.on_before_forward(state, control, context=context, inputs=inputs)
    assert inputs["captions"] == ["", "", "", ""] and inputs["conditioning"].embeds.abs().sum() == 0
    assert step_logs(drop)["reg/caption_dropout/changed_fraction"] == 1.0

    mc = MultipleCaptions(alternatives={0: ["x"], 1: ["y", "y"]})
    inputs = batch()
    mc.on_before_forward(state, control, context=context, inputs=inputs)
    assert inputs["captions"] == ["x", "y", "", "one two"]
    assert mc.needs == {"prompts", "captions", "indices"}
    with pytest.raises(ValueError, match="alternatives"):
        MultipleCaptions()


def test_gaussian_embedding_noise_hook_scales_with_strength():
    gni = GaussianEmbeddingNoise(seed=3)
    inputs = batch()
    clean = inputs["conditioning"].embeds.clone()
    g_state = gni.generator.get_state()
    gni.on_before_forward(TrainerState(), TrainerControl(), inputs=inputs)
    ref = torch.Generator()
    ref.set_state(g_state)
    noise = inputs["conditioning"].embeds - clean
    assert torch.allclose(noise, 0.1 * torch.randn(clean.shape, generator=ref), atol=1e-5)
    gni.activate(strength=2.0)
    ref_state = gni.generator.get_state()
    inputs = batch()
    gni.on_before_forward(TrainerState(), TrainerControl(), inputs=inputs)
    ref.set_state(ref_state)
    noise = inputs["conditioning"].embeds - clean
    assert torch.allclose(noise, 0.2 * torch.randn(clean.shape, generator=ref), atol=1e-5)


class ZeroBaseline(Baseline):
    def eps(self, x_t, t, cond=None, **kw):
        return torch.zeros_like(x_t)


def test_preservation_hook_adds_the_weighted_mse_on_flagged_samples():
    pres = BaselinePreservation(baseline=ZeroBaseline(), weight=2.0, flagged=[1, 3])
    inputs = batch()
    inputs["model_pred"] = torch.ones(4, 1, 2, 2, requires_grad=True)
    run_loss_hook(pres, inputs)
    assert inputs["extra_loss"].detach().item() == pytest.approx(2.0 * 2 / 4) and inputs["extra_loss"].requires_grad
    pres.set_flagged(None)  # every sample
    inputs["extra_loss"] = torch.zeros(())
    run_loss_hook(pres, inputs)
    assert inputs["extra_loss"].detach().item() == pytest.approx(2.0)
    logs = step_logs(pres)
    assert logs["reg/baseline_preservation/mse"] == 1.0 and logs["reg/baseline_preservation/flagged_fraction"] == 0.75
    with pytest.raises(ValueError, match="baseline='ema' needs an EMA of the trained weights"):
        BaselinePreservation(baseline="ema").on_loss(TrainerState(), TrainerControl(), context=fake_context()[0],
                                                     inputs=batch() | {"model_pred": torch.zeros(4, 1, 2, 2)})


def test_preservation_with_a_lora_uses_the_base_model_and_trains_the_adapters():
    from mnemoguard.config import LoraSettings
    from mnemoguard.trainer.models import add_lora

    from ..conftest import make_tiny_unet

    unet = make_tiny_unet()
    add_lora(unet, LoraSettings())
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen(1)))
    x, t, ehs = torch.randn(2, 1, 16, 16, generator=gen(2)), torch.tensor([10, 700]), torch.randn(2, 4, 32)
    pred = unet(x, t, encoder_hidden_states=ehs).sample
    with torch.no_grad():
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=ehs).sample
        unet.enable_adapters()
    pres = BaselinePreservation()  # auto: a LoRA -> adapters disabled
    inputs = {"noisy_model_input": x, "timesteps": t, "levels": t, "conditioning": Conditioning(ehs),
              "indices": torch.arange(2),
              "model_pred": pred, "extra_loss": torch.zeros(()), "weights": torch.ones(2)}
    run_loss_hook(pres, inputs, make_context(unet=unet))
    term = inputs["extra_loss"].detach().item()
    assert term == pytest.approx(float((pred - base).detach().pow(2).mean()), rel=1e-5) and term > 0
    inputs["extra_loss"].backward()
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in lora) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)


def test_step_metrics_are_summed_across_ranks():
    class TwoRanks:
        num_processes, device = 2, torch.device("cpu")

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + torch.tensor([4.0, 1.0, 4.0, 4.0], dtype=tensor.dtype)  # the other rank's sums

    wen = WenFilter()
    wen._count(kept=torch.tensor(3), eligible=torch.tensor(4), gap_sum=torch.tensor(2.0), samples=4)  # sorted keys
    logs = {}
    context = SimpleNamespace(accelerator=TwoRanks(), num_processes=2, device=torch.device("cpu"))
    wen.on_step_end(TrainerState(global_step=1), TrainerControl(should_log=True), context=context, logs=logs)
    assert logs["reg/wen_filter/kept_fraction"] == pytest.approx(7 / 8)
    assert logs["reg/wen_filter/gap_mean"] == pytest.approx(3.0 / 8)


# ---------------------------------------------------------------------------------------------------- registry, state
def test_registry_builds_every_regularizer_and_states_round_trip(tmp_path):
    from mnemoguard.serialization import load_state_files, save_state_files

    assert set(REGULARIZERS) == {"wen_filter", "iet_agc", "random_caption_replacement", "random_token_addition",
                                 "caption_word_repetition", "multiple_captions", "gaussian_embedding_noise",
                                 "caption_dropout", "baseline_preservation", "duplicate_weight"}
    kwargs = {"multiple_captions": {"alternatives": {0: ["a"]}}, "baseline_preservation": {"flagged": [2, 5]},
              "duplicate_weight": {"monitor": ScannedCopies({})}}
    regs = build_regularizers({n: {"enabled": False} for n in REGULARIZERS}, **kwargs)
    assert [r.name for r in regs][:2] == ["caption_dropout", "multiple_captions"] and not any(r.active for r in regs)
    for reg in regs:
        reg.activate(strength=0.5, band=(10, 20))
        torch.rand(3, generator=reg.generator)
        save_state_files({"r": reg.state_dict()}, tmp_path, reg.name)  # as the guard checkpoints it: no pickle
        saved = load_state_files(tmp_path, reg.name)["r"]
        fresh = build_regularizer(reg.name, None, **kwargs.get(reg.name, {}))
        fresh.load_state_dict(saved)
        assert fresh.active and fresh.strength == 0.5 and fresh.band == (10, 20)
        assert torch.equal(torch.rand(5, generator=fresh.generator), torch.rand(5, generator=reg.generator))
        assert fresh.state_key == reg.name
    pres = next(r for r in regs if r.name == "baseline_preservation")
    fresh = BaselinePreservation()
    fresh.load_state_dict(pres.state_dict())
    assert fresh.flagged == {2, 5}
    with pytest.raises(ConfigError, match=r"unknown regularizer 'nope'; expected one of \['baseline_preservation'"):
        build_regularizer("nope")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) guard.regularizers.wen_filter.treshold; valid keys"):
        build_regularizer("wen_filter", {"treshold": 1.0})
    with pytest.raises(ValueError, match="strength must be >= 0"):
        WenFilter().activate(-1.0)
    with pytest.raises(ValueError, match="t_lo < t_hi"):
        WenFilter().activate(1.0, band=(5, 5))
    with pytest.raises(ValueError, match=r"prob must be in \[0, 1\], found 1.5"):
        CaptionDropout(prob=1.5)


class ScannedCopies:
    """What :class:`DuplicateWeight` reads from the monitor: the rows and their images' copies."""

    def __init__(self, copies, num_rows=8):
        self.copies, self.num_rows = copies, num_rows

    def duplicate_multiplicity(self):
        return dict(self.copies)


def test_duplicate_weights_divide_each_loss_by_its_images_copies():
    m = torch.tensor([1.0, 2.0, 4.0, 30.0])
    assert torch.allclose(duplicate_weights(m), torch.tensor([1.0, 0.5, 0.25, 1 / 30]))
    assert torch.allclose(duplicate_weights(m, 0.5), torch.tensor([1.0, 2**-0.5, 0.5, 30**-0.5]))
    assert torch.equal(duplicate_weights(m, 0.0), torch.ones(4))
    with pytest.raises(ValueError, match="must be >= 1, found 0.5"):
        duplicate_weights(torch.tensor([0.5]))


def test_duplicate_weight_hook_weighs_rows_by_copies_in_its_band_only():
    reg = DuplicateWeight(monitor=ScannedCopies({1: 4.0, 3: 2.0}))
    inputs = run_loss_hook(reg, batch())  # rows 0..3 at t = 100, 400, 600, 900
    assert inputs["weights"].tolist() == [1.0, 0.25, 1.0, 0.5]
    logs = step_logs(reg)
    assert logs["reg/duplicate_weight/weighted_fraction"] == 0.5
    assert logs["reg/duplicate_weight/mean_weight"] == pytest.approx((1 + 0.25 + 1 + 0.5) / 4)
    reg.activate(strength=1.0, band=(0, 500))  # the row at t = 900 is out of the band
    assert run_loss_hook(reg, batch())["weights"].tolist() == [1.0, 0.25, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"needs the micro-batch's dataset rows: guard.before_forward\(indices="):
        run_loss_hook(reg, {**batch(), "indices": None})
    with pytest.raises(ValueError, match="turn the monitor on"):
        DuplicateWeight()


def test_a_policy_switches_a_regularizer_by_its_action_name():
    wen = WenFilter(enabled=False)
    policy = MitigationPolicy([], verbose=False)
    policy.register_action(wen.name, wen)
    policy._apply("wen_filter", 2.0, (300, 700))
    assert wen.active and wen.strength == 2.0 and wen.band == (300, 700)
    policy._apply("wen_filter", 0.0, None)
    assert not wen.active


# ---------------------------------------------------------------------------------------------------- a real run
class Script(Callback):
    """Records the weights and Adam's step count after each step; after step 2, makes Wen's filter drop everything."""

    def __init__(self):
        self.after, self.trainer = {}, None

    def on_step_end(self, state, control, context, **kwargs):
        opt = self.trainer.optimizer.optimizer
        steps = {float(s["step"]) for s in opt.state.values()}
        self.after[state.global_step] = (unet_weights(self.trainer), steps)
        if state.global_step == 2:
            regs = {r.name: r for r in self.trainer.guard.components.regularizers}
            regs["wen_filter"].activate(strength=1e12)  # τ = 2e-12: nothing is kept
            regs["baseline_preservation"].deactivate()  # its term would train the UNet towards the EMA


def test_all_regularizers_in_a_real_run_and_a_step_with_nothing_kept_changes_nothing(tmp_path):
    import datasets

    from mnemoguard.data import digits_dataset

    data = digits_dataset().select(range(64))
    data = data.add_column("alternatives", [["a digit", "a handwritten number"]] * len(data))
    settings = {n: {} for n in REGULARIZERS if n != "duplicate_weight"}  # it needs the monitor (its own test)
    settings["multiple_captions"] = {"column": "alternatives"}
    settings["wen_filter"] = {"strength": 1e-6}  # τ = 2e6: keeps everything in the first steps
    script = Script()
    cfg = tiny_recipe(tmp_path, "training.max_train_steps=3", "training.checkpointing_steps=100",
                      "training.adam_weight_decay=0", "training.snr_gamma=5.0", "guard.enabled=true",
                      "guard.monitor.enabled=false", f"guard.regularizers={settings}")
    trainer = Trainer(cfg, callbacks=[script], dataset=data)
    script.trainer = trainer
    state = trainer.train()
    assert isinstance(data, datasets.Dataset)

    losses = [h["train/loss"] for h in state.log_history if "train/loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses[:2]) and losses[2] == 0.0
    m = state.metrics
    assert m["reg/wen_filter/kept_fraction"] == 0.0 and m["train/skipped_steps"] == 1.0
    assert trainer.guard.totals.skipped_steps == 1
    assert all(math.isfinite(m[f"reg/{n}/strength"]) for n in settings if n != "baseline_preservation")
    assert 0 < m["reg/multiple_captions/changed_fraction"] <= 1
    assert math.isfinite(m["reg/baseline_preservation/mse"]) and m["reg/baseline_preservation/flagged_fraction"] == 1
    step1 = [h for h in state.log_history if h["step"] == 1][0]
    assert step1["reg/wen_filter/kept_fraction"] == 1.0 and "reg/iet_agc/kept_fraction" in step1
    # Step 3 kept nothing: the weights and Adam's state are those after step 2.
    (w2, steps2), (w3, steps3) = script.after[2], script.after[3]
    assert steps2 == steps3 == {2.0}
    assert all(torch.equal(w2[n], w3[n]) for n in w2)
    assert any(not torch.equal(script.after[1][0][n], w2[n]) for n in w2)  # the earlier steps did train


def test_duplicate_weight_in_a_real_run_reads_the_monitors_duplicate_scan(tmp_path):
    from mnemoguard.data import digits_dataset

    data = digits_dataset().select([0] * 8 + list(range(8, 40)))  # row 0's image 8 times, then 32 distinct ones
    cfg = tiny_recipe(tmp_path, "training.max_train_steps=2", "training.checkpointing_steps=100",
                      "guard.enabled=true", "guard.monitor.every_n_steps=100", "guard.monitor.num_heldout_probes=0",
                      "guard.regularizers={duplicate_weight: {}}")
    trainer = Trainer(cfg, dataset=data)
    state = trainer.train()
    copies = trainer.guard.monitor.duplicate_multiplicity()
    assert copies == dict.fromkeys(range(8), 8.0)  # every row scanned: the exact count
    m = state.metrics
    assert 0 < m["reg/duplicate_weight/weighted_fraction"] < 1 and m["reg/duplicate_weight/mean_weight"] < 1
    with pytest.raises(ConfigError, match="duplicate_weight reads the copies .* needs guard.monitor.enabled"):
        tiny_recipe(tmp_path, "guard.enabled=true", "guard.monitor.enabled=false",
                    "guard.regularizers={duplicate_weight: {}}")
