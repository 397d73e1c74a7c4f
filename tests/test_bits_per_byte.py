"""eval.json's bits per UTF-8 byte (`student_bpb`, `teacher_bpb`) against a NumPy reference whose byte count comes
from decoding each window's labels back to text (not from the per-id table the evaluation uses)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

import vishwam
from vishwam.data.cross.alignment import token_byte_lengths
from vishwam.data.windows import PackedDataset
from vishwam.sharding import batch_sharding, make_mesh
from vishwam.teacher.sources import TeacherSource
from vishwam.train.evaluation import evaluate

TEACHER_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "assets", "pysrc", "teacher")


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_bits_per_byte_matches_a_decoded_reference(tmp_path):
    tok = Tokenizer.from_file(os.path.join(TEACHER_DIR, "tokenizer.json"))
    teacher = vishwam.load_pretrained(TEACHER_DIR, dtype=jnp.float32)
    student = jax.tree.map(lambda x: x * 0.9 if isinstance(x, jax.Array) and x.ndim == 2 else x, teacher)
    text = ("def area(r):\n    return 3.14159 * r ** 2\n\n\nclass Point:\n    def __init__(self, x, y):\n"
            "        self.x, self.y = x, y\n") * 4  # ASCII: any cut between tokens is a cut between characters
    ids = np.asarray(tok.encode(text).ids, np.int32)
    seq = 16
    n = (len(ids) - 1) // seq
    data = PackedDataset(ids[: n * seq + 1], seq, name="data.eval")
    result = evaluate(student, TeacherSource(teacher), data, step=1, batch_size=2, micro_batch_size=1,
                      num_batches=n // 2, compute_dtype=jnp.float32, batch_sharding=batch_sharding(make_mesh(1, 1, 1)),
                      out_dir=tmp_path, log=print, byte_lengths=token_byte_lengths(tok, 2048))
    rows = (n // 2) * 2
    inputs, labels = data.windows[:rows, :-1], data.windows[:rows, 1:]
    n_bytes = sum(len(tok.decode(row.tolist()).encode("utf-8")) for row in labels)
    for model, key in ((student, "student_bpb"), (teacher, "teacher_bpb")):
        lp = _log_softmax(np.asarray(model(jnp.asarray(inputs)).logits, np.float64))
        nll = -np.take_along_axis(lp, labels[..., None], -1)[..., 0].sum()
        assert result[key] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert result["student_bpb"] > result["teacher_bpb"]
