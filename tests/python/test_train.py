"""The trainer (train/): a short run learns, a resumed run repeats the uninterrupted one bit for
bit, DDP over loopback gives the single process's losses, the twins differ only in attention, and
the passkey generator and evaluation say what they claim."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from train import data, evaluate, model, trainer  # noqa: E402
from train.presets import preset  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def _text(tmp_path_factory):
    """The tests' 'tinyshakespeare': this repository's Markdown, so the suite needs no download
    (the experiments use the real text)."""
    text = b"".join(p.read_bytes() for p in sorted([*REPO.glob("*.md"), *REPO.glob("docs/*.md")]))
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_bytes(text[:300_000])
    old = os.environ.get("NSA_SHAKESPEARE")
    os.environ["NSA_SHAKESPEARE"] = str(path)
    yield
    if old is None:
        del os.environ["NSA_SHAKESPEARE"]
    else:
        os.environ["NSA_SHAKESPEARE"] = old


def _losses(log):
    return [(e["step"], e["loss"], e.get("val_loss")) for e in log]


def test_short_run_learns(tmp_path):
    log = trainer.train(preset("tiny", "nsa"), tmp_path, threads=2, progress=False)
    first, last = log[0]["loss"], sum(e["loss"] for e in log[-5:]) / 5
    # ln(256) = 5.55 at the start; 30 steps of byte statistics reach about 3.4.
    assert first > 5.4 and last < 0.7 * first, (first, last)
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "log.jsonl").exists()
    assert log[-1]["val_loss_full"] < 0.7 * first


@pytest.mark.parametrize("attn", ["nsa", "full"])
def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, attn):
    p = preset("tiny", attn, steps=12, ckpt_every=4)
    whole = trainer.train(p, tmp_path / "whole", threads=2, progress=False)
    trainer.train(p, tmp_path / "cut", stop_at=7, threads=2, progress=False)
    assert json.loads((tmp_path / "cut/log.jsonl").read_text().splitlines()[-1])["step"] == 7
    resumed = trainer.train(p, tmp_path / "cut", resume=True, threads=2, progress=False)
    assert _losses(resumed) == _losses(whole)        # exact: same bits, not close
    a = trainer.load_model(tmp_path / "whole").state_dict()
    b = trainer.load_model(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_keeps_its_directory(tmp_path):
    p = preset("tiny", "nsa", steps=3)
    trainer.train(p, tmp_path, threads=2, progress=False)
    with pytest.raises(ValueError, match="holds a run already"):
        trainer.train(p, tmp_path, threads=2, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(steps\)"):
        trainer.train(preset("tiny", "nsa", steps=5), tmp_path, resume=True, progress=False)
    # Resuming a finished run trains nothing and keeps its log.
    assert _losses(trainer.train(p, tmp_path, resume=True, progress=False)) == _losses(
        [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()])


def test_ddp_over_loopback_gives_the_single_process_losses(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "train", "run",
           "--preset", "tiny", "--steps", "8", "--threads", "1", "--out", str(tmp_path / "ddp")]
    env = dict(os.environ, PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME="lo")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    ddp = [json.loads(s) for s in (tmp_path / "ddp/log.jsonl").read_text().splitlines()]
    single = trainer.train(preset("tiny", "nsa", steps=8), tmp_path / "one", threads=1,
                           progress=False)
    assert len(ddp) == len(single) == 8
    # Same global batch, gradients averaged over the two halves: the same function, summed in
    # another order (f32, ~1e-7 relative per step); eight AdamW steps keep it far below 1e-4.
    for d, s in zip(ddp, single):
        assert d["loss"] == pytest.approx(s["loss"], abs=1e-4), (d, s)
    assert ddp[-1]["loss"] < ddp[0]["loss"] - 0.5


def test_twins_share_every_parameter_but_the_nsa_extras():
    m = {a: model.GPT(preset("tiny", a).model, seed=3) for a in model.ATTENTIONS}
    full = dict(m["full"].named_parameters())
    assert set(full) == set(dict(m["window"].named_parameters()))
    extras = 0
    for name, p in m["nsa"].named_parameters():
        if name in full:
            assert torch.equal(p, full[name]), name
        else:
            assert ".attn.gate." in name or name.split(".")[-1][:2] in ("k_", "v_"), name
            extras += p.numel()
    assert extras == model.parameter_counts(m["nsa"])["nsa_only"] > 0
    assert not torch.equal(model.GPT(preset("tiny", "full").model, seed=4).embed.weight,
                           full["embed.weight"])


def test_banded_attention_is_the_window_mask():
    torch.manual_seed(0)
    B, T, H, Hkv, D, w = 2, 150, 4, 2, 8, 32          # T not a multiple of w
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    i = torch.arange(T)
    mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True).transpose(1, 2)
    # f32 softmax over at most 32 keys either way; 1e-5 covers the different summation order.
    torch.testing.assert_close(model.banded_attention(q, k, v, w), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", model.ATTENTIONS)
def test_generation_through_the_caches_gives_the_forward_logits(attn):
    torch.set_num_threads(2)
    m = model.GPT(preset("tiny", attn).model, seed=1).eval()
    tokens = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(tokens)[0]
    caches = model.new_caches(m, 100)
    got = [model.extend(m, tokens[:, :50], caches)]
    got += [model.extend(m, tokens[:, t:t + 1], caches) for t in range(50, 90)]
    # f32 throughout; the decode kernels and SDPA sum in other orders than the forward.
    torch.testing.assert_close(torch.stack(got), ref[49:], rtol=1e-4, atol=1e-4)


def test_passkey_sample_holds_the_key_where_it_says():
    g = torch.Generator().manual_seed(0)
    for T, depth in [(256, 0.0), (512, 0.5), (2048, 0.99), (300, 0.3)]:
        s = data.passkey_sample(T, depth, g)
        text = bytes(s.tokens.tolist()).decode("ascii")
        assert s.tokens.shape == (T + 1,)
        assert len(s.key) == 5 and s.key.isdigit()
        assert text[s.key_pos:s.key_pos + 5] == s.key
        assert text[s.key_pos - len("The pass key is "):s.key_pos] == "The pass key is "
        assert text.endswith(data.QUESTION + s.key)
        # The answer is the last five tokens, one per digit, the digits' ASCII codes.
        assert s.tokens[-5:].tolist() == [ord(c) for c in s.key]
        # Digits only in the key's two statements and the answer.
        assert sum(c.isdigit() for c in text) == 15
        assert abs(s.depth - (len(data.INTRO) + depth * (T - 100)) / T) < 0.2
    with pytest.raises(ValueError, match="too short"):
        data.passkey_sample(100, 0.5, g)


def test_passkey_eval_set_covers_every_decile_in_order():
    seen = {}
    for decile, s in data.Passkey.eval_set(1024, 3):
        seen.setdefault(decile, []).append(s.depth)
    assert sorted(seen) == list(range(10)) and all(len(v) == 3 for v in seen.values())
    means = [sum(v) / 3 for _, v in sorted(seen.items())]
    assert means == sorted(means)


class _KnowsEvenKeys(torch.nn.Module):
    """Predicts the key's digits (read from the text) when its first digit is even, else '0'."""

    def __init__(self):
        super().__init__()
        self.cfg = preset("tiny", "full").model
        self.blocks = torch.nn.ModuleList()

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, 256)
        for b, row in enumerate(tokens.tolist()):
            text = bytes(row).decode("ascii")
            key = text[text.index("The pass key is ") + 16:][:5]
            answer = key if int(key[0]) % 2 == 0 else "00000"
            # Position T-5 predicts the first digit, ..., T-1 the fifth.
            for i, c in enumerate(answer):
                logits[b, len(row) - 5 + i, ord(c)] = 1.0
        return logits


def test_passkey_accuracy_counts_exact_matches_per_decile():
    r = evaluate.passkey_accuracy(_KnowsEvenKeys(), 512, 6, progress=False)
    expect = [0] * 10
    for decile, s in data.Passkey.eval_set(512, 6):
        expect[decile] += int(s.key[0]) % 2 == 0
    assert r["samples"] == 60
    assert r["per_decile"] == [e / 6 for e in expect]
    # The odd keys' answer "00000" gets each digit that is a 0 right, the even keys' all five.
    digits = [0.0] * 10
    for decile, s in data.Passkey.eval_set(512, 6):
        digits[decile] += 1 if int(s.key[0]) % 2 == 0 else s.key.count("0") / 5
    assert r["digits_per_decile"] == pytest.approx([d / 6 for d in digits])
    assert 0 < r["accuracy"] < 1
