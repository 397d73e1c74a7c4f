"""Packed chat rows: first-fit packing, attention within a row against a NumPy block-diagonal reference,
packed rows giving the logits and losses each row gets alone, and losses that count the target tokens only."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_naive import _config, _module, _params64
from tokenizers import Tokenizer

from distill.config import DistillationParams
from distill.features import FeatureProjections
from distill.objective import Objective, TeacherOutputs
from models import ModelConfig, init_model, prepare_inputs
from vishwam.config.cli import load_config
from vishwam.data.chat import ChatTemplate
from vishwam.data.chat_rows import encode_rows, pack_rows
from vishwam.data.windows import PackedDataset
from vishwam.errors import DataError
from vishwam.io.checkpoint import open_pretrained
from vishwam.teacher.cache import TeacherCache, build_cache
from vishwam.teacher.fingerprint import fingerprint
from vishwam.teacher.streamed import StreamedTeacher
from vishwam.train.evaluation import eval_sums
from vishwam.train.step import StepConfig, init_state, make_optimizer, make_train_step

DEMO = Path(__file__).resolve().parents[1] / "vishwam" / "assets" / "demo" / "teacher"
# Plain-text turns with the demo tokenizer's EOS: no token outside its 512 ids.
TEMPLATE = """{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\
{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}\
{% if add_generation_prompt %}Assistant: {% endif %}"""
CHATS = [
    [{"role": "user", "content": "Seven plus five?"}, {"role": "assistant", "content": "Seven plus five is twelve."}],
    [{"role": "system", "content": "Count."}, {"role": "user", "content": "After three?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": "Five, then six."}],
    [{"role": "user", "content": "Who did Mira meet at the river?"}, {"role": "assistant", "content": "She met Kai."}],
]


def _rows(tmp_path, loss_on="assistant", chats=CHATS):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    template = ChatTemplate("test", TEMPLATE, (("eos_token", "<|endoftext|>"),))
    return encode_rows(str(path), Tokenizer.from_file(str(DEMO / "tokenizer.json")), template, loss_on=loss_on,
                       eos_id=0)


# ------------------------------------------------------------------------------------------------- packing


def test_first_fit_packing_truncation_and_drops():
    def row(n, first_target):
        return np.arange(1, n + 1, dtype=np.int32), np.arange(n) >= first_target

    # Windows of 11 tokens, in file order: 6 -> w0; 7 -> w1; 4 -> w0 (the first window with room, not the last
    # opened); 15 -> truncated to 11 (its one target left is its last token), w2; 3 whose only target is its first
    # token -> dropped; 4 -> w1.
    rows = [row(6, 2), row(7, 1), row(4, 1), row(15, 10), (np.arange(1, 4, dtype=np.int32), np.array([1, 0, 0], bool)),
            row(4, 3)]
    logs = []
    data = pack_rows(rows, 10, name="data.train", log=logs.append)
    assert logs == ["data.train: 5 rows packed into 3 windows (1 truncated, 1 dropped)"]
    np.testing.assert_array_equal(data.windows, [[1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 0], [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4],
                                                 list(range(1, 12))])
    np.testing.assert_array_equal(data.segment_ids, [[1] * 6 + [2] * 4 + [0], [1] * 7 + [2] * 4, [1] * 11])
    # A row's first token is never a target (nothing before it in its row predicts it).
    np.testing.assert_array_equal(data.targets, [[0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0], [0] + [1] * 6 + [0, 0, 0, 1],
                                                 [0] * 10 + [1]])
    batch = data.batch(np.array([0, 1]))
    np.testing.assert_array_equal(batch["loss_mask"], data.targets[[0, 1], 1:])
    np.testing.assert_array_equal(batch["mask"], data.segment_ids[[0, 1], :-1] > 0)
    np.testing.assert_array_equal(batch["segment_ids"], data.segment_ids[[0, 1], :-1])
    with pytest.raises(DataError, match="data.eval: none of its 1 rows has a target token"):
        pack_rows([rows[4]], 10, name="data.eval", log=logs.append)


# --------------------------------------------------------------------------------------- segment attention

SEQ = 128
# Each row's packed segments (lengths), then padding: three rows, a whole row, two rows and 48 padding positions.
LAYOUT = ([50, 30, 48], [128], [20, 60])
# As in test_attention_naive (the same module, inputs of the same size, fp32 at DEFAULT precision): the longest
# accumulation chain is 240 terms, whose rounding errors add like a random walk (~29 eps = 3.5e-6 of the values'
# size) and at worst 240 eps = 2.9e-5; 1e-5 (84 eps) sits between. A segment's softmax sums fewer keys, not more.
TOL = 1e-5


def _layout():
    """Segment ids, key validity, the block-diagonal causal mask and the positions, spelled out row by row."""
    seg = np.zeros((len(LAYOUT), SEQ), np.int32)
    allowed = np.zeros((len(LAYOUT), SEQ, SEQ), bool)
    pos = np.zeros((len(LAYOUT), SEQ), np.int64)
    for b, lengths in enumerate(LAYOUT):
        start = 0
        for number, n in enumerate(lengths, start=1):
            seg[b, start:start + n] = number
            allowed[b, start:start + n, start:start + n] = np.tril(np.ones((n, n), bool))
            pos[b, start:start + n] = np.arange(n)
            start += n
    return seg, seg > 0, allowed, pos


def _rope64(pos, cfg):
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
    ang = np.concatenate([pos[..., None] * inv, pos[..., None] * inv], -1)
    return np.cos(ang), np.sin(ang)


def _reference(x, p, allowed, cos, sin, heads, kv_heads, hd):
    """float64 GQA attention with an explicit `[b, s, s]` mask (query i sees key j iff allowed[b, i, j]); a query
    that sees no key outputs zeros before o_proj. **Returns:** `(output, probabilities [b, heads, s, s])`."""
    b, s, _ = x.shape
    q = (x @ p["q_proj"][0].T + p["q_proj"][1]).reshape(b, s, heads, hd)
    k = (x @ p["k_proj"][0].T + p["k_proj"][1]).reshape(b, s, kv_heads, hd)
    v = (x @ p["v_proj"][0].T + p["v_proj"][1]).reshape(b, s, kv_heads, hd)

    def rope(a):
        rotated = np.concatenate([-a[..., hd // 2:], a[..., : hd // 2]], -1)
        return a * cos[:, :, None] + rotated * sin[:, :, None]

    q, k = rope(q), rope(k)
    kv_of = [h // (heads // kv_heads) for h in range(heads)]
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k[:, :, kv_of], v[:, :, kv_of]))
    scores = np.where(allowed[:, None], q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -np.inf)
    top = np.max(scores, -1, keepdims=True)
    e = np.where(allowed[:, None], np.exp(scores - np.where(np.isfinite(top), top, 0)), 0.0)
    probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, heads * hd)
    return out @ p["o_proj"][0].T + (0 if p["o_proj"][1] is None else p["o_proj"][1]), probs


@pytest.fixture
def default_precision():
    with jax.default_matmul_precision(None):
        yield


def test_segment_attention_matches_block_diagonal_reference(default_precision):
    cfg = _config("qwen2")
    attn = _module(cfg, seed=3)
    seg, valid, allowed, pos = _layout()
    x = np.random.default_rng(5).standard_normal((len(LAYOUT), SEQ, cfg.hidden_size)).astype(np.float32)
    mask, cos, sin = prepare_inputs(cfg, jnp.zeros(seg.shape, jnp.int32), jnp.asarray(valid),
                                    segment_ids=jnp.asarray(seg))
    # Positions restart in every segment: the RoPE tables equal float64 ones at the spelled-out positions, to
    # the fp32 angle's rounding (pos · eps relative, pos < 128) plus cos/sin's own ulp.
    cos64, sin64 = _rope64(pos, cfg)
    bound = SEQ * np.finfo(np.float32).eps + np.finfo(np.float32).eps
    np.testing.assert_allclose(np.asarray(cos, np.float64), cos64, rtol=0, atol=bound)
    np.testing.assert_allclose(np.asarray(sin, np.float64), sin64, rtol=0, atol=bound)
    # The dense mask (the cuDNN path's) is the block-diagonal causal mask exactly.
    np.testing.assert_array_equal(np.asarray(mask.dense())[:, 0, 0], allowed)

    h, g, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ref, ref_probs = _reference(x.astype(np.float64), _params64(attn, np), allowed, cos64, sin64, h, g, hd)
    for need_probs in (False, True):  # causal query blocks; the one-block path that returns probabilities
        out = jax.jit(lambda x: attn(x, cos, sin, mask, implementation="xla", output_attentions=need_probs))(x)
        ours = np.asarray(out.output, np.float64)
        err = np.max(np.abs(ours[valid] - ref[valid])) / np.max(np.abs(ref[valid]))
        assert err <= TOL, f"max error {err:.3g} (probabilities {need_probs})"
        # Padding positions see no key: exactly o_proj(0) (qwen2 has no o_proj bias).
        assert attn.o_proj.bias is None and np.all(ours[~valid] == 0)
        if need_probs:
            probs = np.asarray(out.probs)
            assert np.all(probs[~np.broadcast_to(allowed[:, None], probs.shape)] == 0)  # never across rows
            assert np.max(np.abs(probs - ref_probs)) <= TOL
    assert np.mean(ref_probs.max(-1).transpose(0, 2, 1)[valid]) > 0.3  # peaked softmaxes: the mask matters


# ------------------------------------------------------------------------------------------ packed = alone

STUDENT = ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, qkv_bias=True)
TEACHER = dataclasses.replace(STUDENT, hidden_size=48, num_hidden_layers=3, head_dim=12)
# Packed and alone, a row's outputs are the same sums over the same keys (masked keys add exact zeros); they
# differ only by the order XLA sums them in (another shape, other causal blocks). fp32 rounding through the
# models' accumulation chains (embedding + 3 layers of projections of 32-96 terms, softmax sums of <= 64 keys,
# the 512-term head) adds like a random walk to a few tens of eps of the logits' size; 1e-5 (84 eps) bounds it,
# and the losses, means of smooth functions of the logits over the same tokens, inherit that relative error.
ALONE_TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    init = eqx.filter_jit(init_model)
    return init(STUDENT, key=jax.random.key(1)), init(TEACHER, key=jax.random.key(0))


def _objective():
    return Objective.build(DistillationParams(kd_weight=1.0, ce_weight=0.5, feature_weight=0.5),
                           student_layers=STUDENT.num_hidden_layers, teacher_layers=TEACHER.num_hidden_layers,
                           total_steps=10)


def _step_loss(student, objective, batch, *, teacher=None, t_out=None) -> dict:
    """The train step's metrics (before its update) for `batch`, from a fresh state (the step donates it)."""
    optimizer, schedule = make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10, weight_decay=0.0,
                                         grad_clip=1.0)
    fresh = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, student)
    projections = FeatureProjections(objective.feature_pairs, STUDENT.hidden_size, TEACHER.hidden_size,
                                     key=jax.random.key(4))
    state = init_state(fresh, projections, None, optimizer, jax.random.key(2), objective.feature_pairs)
    step = _STEPS.setdefault(objective, make_train_step(StepConfig(objective, jnp.float32, 1, False), optimizer,
                                                        schedule))
    _, metrics = step(teacher, state, {k: jnp.asarray(v) for k, v in batch.items()}, t_out)
    return {k: float(v) for k, v in metrics.items()}


_STEPS: dict = {}


@eqx.filter_jit
def _logits(models, ids, mask, segment_ids):
    return [model(ids, attention_mask=mask, segment_ids=segment_ids).logits for model in models]


def test_packed_rows_give_each_row_its_own_logits_and_losses(tmp_path, models):
    student, teacher = models
    rows = _rows(tmp_path)
    seq_len = 128  # four causal query blocks of 32
    data = pack_rows(rows, seq_len, name="data.train", log=lambda _: None)
    assert data.num_windows == 1 and data.segment_ids.max() == len(rows)  # all three rows in one window
    packed = data.batch(np.array([0]))
    packed.pop("window")
    segments = packed["segment_ids"][0]
    objective = _objective()
    for number, (ids, targets) in enumerate(rows, start=1):
        at = np.flatnonzero(segments == number)  # the row's positions in the window
        # The row alone, at the start of a sequence of the same length, padded after (no segment ids).
        alone = np.zeros((1, seq_len + 1), np.int32)
        alone[0, : len(ids)] = ids
        target = np.zeros((1, seq_len + 1), bool)
        target[0, 1: len(ids)] = targets[1:]
        single = {"input_ids": alone[:, :-1], "labels": alone[:, 1:],
                  "mask": (np.arange(seq_len) < len(ids))[None].astype(np.int32),
                  "loss_mask": target[:, 1:].astype(np.int32)}
        together = _logits((student, teacher), packed["input_ids"], packed["mask"], packed["segment_ids"])
        alone = _logits((student, teacher), single["input_ids"], single["mask"], None)
        for a, b in zip(together, alone):
            a, b = a[0, at], b[0, :len(at)]
            assert np.max(np.abs(a - b)) <= ALONE_TOL * np.max(np.abs(b))
        # The train step's loss on the packed window counting only this row's targets is the row's loss alone.
        only = dict(packed, loss_mask=packed["loss_mask"] * (segments == number)[None])
        got = _step_loss(student, objective, only, teacher=teacher)
        want = _step_loss(student, objective, single, teacher=teacher)
        # The KD term is a small difference of fp32 sums of the cross-entropy's size (sum p log p - sum p log q,
        # ~6 here, KD ~0.016): its rounding is relative to those sums, i.e. to the loss, not to the difference.
        for key in ("loss", "distill/kd", "distill/ce", "distill/feature"):
            assert got[key] == pytest.approx(want[key], rel=ALONE_TOL, abs=ALONE_TOL * want["loss"]), key


def test_losses_count_assistant_tokens_only(tmp_path, models):
    """With `loss_on: assistant`, garbage teacher logits, hidden states and labels at every position whose label
    is not an assistant token (user and system turns, the template's headers) leave the loss exactly as it was
    (those positions are multiplied out); the same garbage at one assistant position, or with `loss_on: all`,
    changes it."""
    student, teacher = models
    objective = _objective()
    rng = np.random.default_rng(0)

    def batch_of(loss_on):
        batch = pack_rows(_rows(tmp_path, loss_on), 128, name="data.train", log=lambda _: None).batch(np.array([0]))
        batch.pop("window")
        return batch

    batch = batch_of("assistant")
    out = teacher(jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["mask"]),
                  segment_ids=jnp.asarray(batch["segment_ids"]), output_hidden_states=True)
    clean = TeacherOutputs(logits=out.logits, hidden_states=out.hidden_states)

    def garbage(t_out, batch, where):
        w = jnp.asarray(where)[..., None]
        logits = jnp.where(w, jnp.asarray(rng.normal(0, 30, t_out.logits.shape), jnp.float32), t_out.logits)
        hidden = tuple(jnp.where(w, jnp.asarray(rng.normal(0, 30, h.shape), jnp.float32), h)
                       for h in t_out.hidden_states)
        labels = np.where(where, rng.integers(0, STUDENT.vocab_size, where.shape), batch["labels"])
        return TeacherOutputs(logits=logits, hidden_states=hidden), dict(batch, labels=labels.astype(np.int32))

    not_assistant = (batch["mask"] == 1) & (batch["loss_mask"] == 0)
    assert not_assistant.sum() > 40 and batch["loss_mask"].sum() > 20
    base = _step_loss(student, objective, batch, t_out=clean)
    dirty_t, dirty_batch = garbage(clean, batch, not_assistant)
    dirty = _step_loss(student, objective, dirty_batch, t_out=dirty_t)
    for key in ("loss", "distill/kd", "distill/ce", "distill/feature"):
        assert dirty[key] == base[key], key
    one = np.zeros_like(not_assistant)
    one[0, np.flatnonzero(batch["loss_mask"][0])[3]] = True
    one_t, one_batch = garbage(clean, batch, one)
    changed = _step_loss(student, objective, one_batch, t_out=one_t)
    assert abs(changed["loss"] - base["loss"]) > 1e-3 * base["loss"]
    # Evaluation counts the same tokens.
    sums = [eval_sums(None, student, {k: jnp.asarray(v) for k, v in b.items()}, t, compute_dtype=jnp.float32)
            for b, t in ((batch, clean), (dirty_batch, dirty_t))]
    assert float(sums[0]["tokens"]) == batch["loss_mask"].sum()
    for key in ("student_nll", "teacher_nll", "kl", "agree"):
        assert float(sums[1][key]) == float(sums[0][key]), key
    # loss_on: all counts every token but each row's first: the same garbage now changes the loss.
    every = batch_of("all")
    assert every["loss_mask"].sum() == every["mask"].sum() - 3 and (every["loss_mask"] >= batch["loss_mask"]).all()
    base_all = _step_loss(student, objective, every, t_out=clean)
    dirty_t, dirty_every = garbage(clean, every, not_assistant)
    assert abs(_step_loss(student, objective, dirty_every, t_out=dirty_t)["loss"] - base_all["loss"]) > 0.1


def test_streamed_and_cached_teachers_see_the_segments(tmp_path):
    """The teacher run ahead of the step (streamed, group by group) and the offline cache's rows are computed with
    the batch's segment ids: equal to the resident teacher's packed forward, not to one across rows."""
    lazy = open_pretrained(DEMO)
    resident = lazy.load(dtype=jnp.float32)
    data = pack_rows(_rows(tmp_path), 128, name="data.train", log=lambda _: None)
    batch = data.batch(np.array([0]))
    ids, mask, seg = (jnp.asarray(batch[k]) for k in ("input_ids", "mask", "segment_ids"))
    want = np.asarray(_logits((resident,), ids, mask, seg)[0])
    across = np.asarray(_logits((resident,), ids, mask, None)[0])
    assert np.max(np.abs(want - across)) > 1.0  # the segments change the teacher's outputs
    streamed = StreamedTeacher(lazy, dtype=jnp.float32, max_resident_shards=2)
    try:
        got = np.asarray(streamed.outputs(batch, _objective()).logits)
    finally:
        streamed.close()
    np.testing.assert_array_equal(got, want)  # the same ops on the same values
    build_cache(resident, data, tmp_path / "cache", top_k=8, vocab_size=lazy.config.vocab_size, log=lambda _: None)
    cached = TeacherCache(tmp_path / "cache", seq_len=128, top_k=8).outputs(batch, lazy.config.num_hidden_layers)
    top = np.sort(want, axis=-1)[..., ::-1][..., :8]
    valid = batch["mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(cached.topk_values)[valid], top[valid], rtol=0,
                               atol=ALONE_TOL * np.max(np.abs(top)))


def test_a_cache_fingerprint_covers_the_packing(tmp_path):
    """The same tokens packed into other rows (other segment ids) are other teacher outputs: another fingerprint."""
    (tmp_path / "c.yaml").write_text(f"distillation: {{teacher_model: {{path: {DEMO}}}}}\n"
                                     f"data: {{train: {tmp_path / 'chat.jsonl'}}}\n")
    cfg, lazy = load_config(str(tmp_path / "c.yaml")), open_pretrained(DEMO)
    data = pack_rows(_rows(tmp_path), 128, name="data.train", log=lambda _: None)
    other = PackedDataset.of_rows(data.windows, np.minimum(data.segment_ids, 1), data.targets)

    def of(d):
        return fingerprint(cfg, lazy, "train", d, top_k=8, vocab_size=512, hidden_layers=(), version=1)["data"]

    assert of(data)["windows_sha256"] != of(other)["windows_sha256"]
    assert of(data) == of(pack_rows(_rows(tmp_path), 128, name="data.train", log=lambda _: None))
