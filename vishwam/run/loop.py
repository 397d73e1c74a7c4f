"""The training loop: get batch -> step -> log -> maybe evaluate, save, re-map; then export the student.

`train(cfg)` is what `run.py` calls. `Run(cfg)` prepares the run (`vishwam.run.build.prepare`: everything that needs
no weights, so config mistakes stop it at once) and `Run.train()` runs the loop; `on_step(step, state)`, when
set, is called after every step (tests stop runs with it). Each part is its own module: the teacher source
(`vishwam.teacher.sources`), the jitted step (`vishwam.train.step`), evaluation (`vishwam.train.evaluation`), checkpoints
(`vishwam.train.resume`), tracking (`vishwam.tracking`) and EPLB re-mapping (`vishwam.train.remap`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from vishwam.compile.programs import dry_run_compile
from vishwam.compile.xla_cache import CacheUse, cache_dir, compilation_cache
from vishwam.config import specs
from vishwam.config.sections import RunConfig, config_to_dict, save_config
from vishwam.config.specs import DTYPES
from vishwam.data.chat_rows import is_chat
from vishwam.data.cross.alignment import token_byte_lengths
from vishwam.data.splits import cross_templates, run_template, tokenizer_path
from vishwam.data.text import load_tokenizer
from vishwam.data.windows import StepReader, batch_for_step
from vishwam.downstream.in_run import Downstream
from vishwam.errors import VishwamError
from vishwam.generation.on_policy import OnPolicy, host_rollout, merge, place_rollout, rollout_batch, step_rows
from vishwam.generation.sampler import checkpoint_eos_ids
from vishwam.generation.samples import Samples
from vishwam.io.export import remove_stale_exports, save_pretrained
from vishwam.run import build
from vishwam.run.cross_tokenizer import shared_ids, student_tokenizer_file
from vishwam.sharding import global_batch, rows_sharding
from vishwam.teacher.sources import TeacherSource, open_teacher
from vishwam.tracking import Progress, Tracker, log, peak_rss_bytes
from vishwam.train.cross_eval import cross_eval_sums
from vishwam.train.cross_step import cross_step_config, make_cross_train_step
from vishwam.train.evaluation import cross_evaluate, evaluate
from vishwam.train.remap import probe_batch, remap, remap_steps
from vishwam.train.step import StepConfig, interleave_micro_batches, make_train_step, optimizer_of


def eval_byte_lengths(cfg: RunConfig, teacher_dir, vocab_size: int):
    """The per-id byte table of the run's tokenizer for `eval.json`'s bits per byte (None without a tokenizer)."""
    path = tokenizer_path(cfg.data, teacher_dir)
    return None if path is None else token_byte_lengths(load_tokenizer(path), vocab_size)


class Run:
    """A configured distillation run. `Run(cfg).train()` does the whole job."""

    def __init__(self, cfg: RunConfig):
        self.on_step = None
        self.prepared = build.prepare(cfg)
        self.cfg = self.prepared.cfg  # as prepared: a student tokenizer equal to the teacher's is cleared
        self.cross = specs.cross_tokenizer(self.cfg)
        self.objective = self.prepared.objective
        self.state = None
        self.samples: Samples | None = None
        self.downstream: Downstream | None = None
        self.on_policy: OnPolicy | None = None
        self.cache_use: CacheUse | None = None
        self.chat_template: str | None = None

    @property
    def train_data(self):
        return self.prepared.train_data

    def open_teacher(self) -> TeacherSource:
        run = self.prepared
        return open_teacher(self.cfg, run.lazy_teacher, run.splits, run.objective, vocab_size=run.vocab_size,
                            mesh=run.mesh, log=log)

    def _start(self, stack: contextlib.ExitStack):
        """After `prepare` (config checks, the resume check, the memory plan, the data): samples and on-policy
        sampling, the compile check, the restored state (before the teacher), the teacher, a new state; then
        `config.yaml`, written only once every check has passed. **Returns:** `(teacher, state, shardings,
        optimizer, schedule, tracker, start)`."""
        cfg, tr, run = self.cfg, self.cfg.training, self.prepared
        stack.callback(run.checkpoints.close)
        eos = checkpoint_eos_ids(run.lazy_teacher.directory, run.teacher_config)
        pad = run.teacher_config.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        teacher_tokenizer = tokenizer_path(cfg.data, run.lazy_teacher.directory)
        self.chat_template = self._student_chat_template(run)  # read now: the export comes after the data is read
        teacher_side = None
        if self.cross:  # the student writes and is scored with its own tokenizer, the teacher with its
            teacher_side = {"tokenizer_path": teacher_tokenizer, "vocab_size": run.teacher_config.vocab_size,
                            "eos": eos, "pad": pad}
            s = run.student_config
            tokenizer, vocab, eos, pad = student_tokenizer_file(cfg), s.vocab_size, list(s.eos_ids), s.pad_token_id
        else:
            tokenizer, vocab = teacher_tokenizer, run.vocab_size
        self.samples = Samples(cfg, tokenizer, run.out, vocab_size=vocab, eos=eos, pad=pad, teacher=teacher_side)
        build.check_samples(run, self.samples)  # their lengths, before the compile check compiles them
        self.downstream = Downstream(cfg, run.out, eos_ids=eos, mesh=run.mesh, log=log, tokenizer_path=tokenizer,
                                     teacher=None if teacher_side is None else (teacher_tokenizer, teacher_side["eos"]))
        if self.objective.on_policy_rows:
            self.on_policy = OnPolicy(cfg.distillation_params.on_policy, run.prompts,
                                      rows=step_rows(self.objective, tr), seq_len=tr.seq_len,
                                      seed=tr.seed, eos=eos, pad=pad, compute_dtype=DTYPES[tr.compute_dtype])
        check = build.compile_check_due(cfg)
        # Through XLA's compilation cache the compile check's compiles are the run's (each program compiled once).
        self.cache_use = stack.enter_context(compilation_cache(cache_dir(cfg, check)))
        if check:  # a misfit raises its one-line ConfigError
            dry_run_compile(cfg, local=True, log=log, plan=run.memory)
        optimizer, schedule = optimizer_of(cfg)
        start = 0
        if run.resume_step is not None:  # before the teacher loads: a checkpoint whose arrays do not read is skipped
            state, shardings = build.build_state(run, None, optimizer, abstract=True)
            state = run.checkpoints.restore_newest(run.resume_step, state, shardings, cfg, log)
            start = int(state.step)
            self.objective = self.objective.with_feature_pairs(state.pairs)  # as re-mapped before the checkpoint
            log(f"resumed from checkpoint step {start} in {run.out / 'checkpoints'}")
        teacher = self.open_teacher()
        stack.callback(teacher.close)
        log(f"teacher: {run.teacher_config.architecture} {run.teacher_config.num_parameters() / 1e6:.2f}M params "
            f"from {run.lazy_teacher.directory} ({teacher.kind})")
        if run.resume_step is None:
            state, shardings = build.build_state(run, teacher, optimizer)
        run.checkpoints.set_aside()  # the unreadable checkpoints skipped, now that the run goes on
        if jax.process_index() == 0:
            for name in ("init_student", "student"):  # what an export killed mid-way left behind
                for path, done in remove_stale_exports(run.out / name):
                    log(f"{path}, left by an export that was killed: {done}")
            save_config(cfg, run.out / "config.yaml")
        self.samples.truncate(start)
        self.downstream.truncate(start)
        tracker = Tracker(cfg, run.out, start)
        stack.callback(tracker.close)
        if self.objective.uses_features:
            tracker.log_mapping(start, self.objective.feature_pairs)
        return teacher, state, shardings, optimizer, schedule, tracker, start

    def train(self) -> dict:
        cfg, tr, run = self.cfg, self.cfg.training, self.prepared
        compute_dtype = DTYPES[tr.compute_dtype]
        with contextlib.ExitStack() as stack:
            teacher, state, shardings, optimizer, schedule, tracker, start = self._start(stack)
            ckpt = run.checkpoints
            if self.cross:
                shared = shared_ids(cfg, run.lazy_teacher.directory, run.student_config.vocab_size,
                                    run.teacher_config.vocab_size)
                make_step = lambda objective: make_cross_train_step(  # noqa: E731
                    cross_step_config(cfg), optimizer, schedule, shardings, shared=shared)
            else:
                make_step = lambda objective: make_train_step(  # noqa: E731
                    StepConfig(objective, compute_dtype, tr.grad_accum_steps, tr.remat), optimizer, schedule,
                    shardings)
            train_step = make_step(self.objective)
            remaps = remap_steps(cfg, self.objective, teacher_runs=teacher.model is not None, log=log)
            on_data = run.eval_data is not None and tr.eval_batches > 0  # eval_batches: 0 turns it off
            evaluates = on_data or self.downstream.enabled
            byte_lengths = eval_byte_lengths(cfg, run.lazy_teacher.directory, run.vocab_size) \
                if on_data and not self.cross else None
            cross_sums = self._cross_sums(teacher) if on_data and self.cross else None

            def evaluate_at(step):
                result = {"step": step}
                if cross_sums is not None:
                    result = cross_evaluate(lambda micro: cross_sums(state.student, micro), run.eval_data, step=step,
                                            batch_size=tr.batch_size, micro_batch_size=tr.micro_batch_size,
                                            num_batches=tr.eval_batches,
                                            out_dir=None if self.downstream.enabled else run.out, log=log)
                elif on_data:  # eval.json is written here, or with the downstream metrics below
                    result = evaluate(state.student, teacher, run.eval_data, step=step, batch_size=tr.batch_size,
                                      micro_batch_size=tr.micro_batch_size, num_batches=tr.eval_batches,
                                      compute_dtype=compute_dtype, batch_sharding=run.batch_sharding,
                                      out_dir=None if self.downstream.enabled else run.out, log=log,
                                      chunk_size=self.objective.params.logit_chunk_size, byte_lengths=byte_lengths)
                result = self.downstream.at_eval(step, result, state.student, teacher.model,
                                                 lambda flat: tracker.log(step, flat, context="eval"))
                tracker.log(step, result, context="eval")
                tracker.log_samples(step, self.samples(step, state.student, teacher.model, compute_dtype))
                return result

            bar = Progress(start, tr.max_steps)
            stack.callback(bar.close)
            t0 = t_last = time.perf_counter()
            tok_since, last_eval, pending = 0, None, None
            sampler = self.on_policy
            rollout = None if sampler is None or start == 0 else host_rollout(state.rollout)
            data_rows = tr.batch_size - (sampler.rows if sampler else 0)
            # Rows read where they are used: a resident teacher runs inside the step on the same global batch, so
            # each process reads only the rows of its devices. (Streamed and cached teachers, and on-policy rows,
            # take every row on every process.)
            reader = None
            if sampler is None and teacher.kind == "resident":
                reader = StepReader(run.train_data, run.batch_sharding, seed=tr.seed, rows=data_rows,
                                    accum=tr.grad_accum_steps)
                stack.callback(reader.close)
            for step in range(start, tr.max_steps):
                if step in remaps and step > 0:
                    state, sim = remap(state, self.objective, teacher.model, probe_batch(cfg, run.train_data),
                                       param_dtype=DTYPES[tr.param_dtype], log=log, mesh=run.mesh)
                    self.objective = self.objective.with_feature_pairs(state.pairs)
                    tracker.log_mapping(step, self.objective.feature_pairs, sim)
                    train_step = make_step(self.objective)
                if sampler is not None and sampler.due(step):
                    rollout = sampler.sample(state.student, state.rng(step), step)
                    state = dataclasses.replace(state, rollout=place_rollout(rollout, shardings.rollout))
                if reader is not None:  # this process reads its own devices' rows, read ahead on a thread
                    batch, t_out = reader.get(step), None
                else:
                    batch = batch_for_step(run.train_data, seed=tr.seed, step=step, batch_size=data_rows)
                    if sampler is not None:
                        batch = merge(batch, rollout_batch(rollout, tr.seq_len), tr.grad_accum_steps)
                    batch = interleave_micro_batches(batch, tr.grad_accum_steps)  # as the step splits it
                    t_out = teacher.cross_outputs(batch) if self.cross else teacher.outputs(batch)
                    if self.cross and t_out is not None:
                        t_out = global_batch({k: np.asarray(v) for k, v in t_out.items()}, run.batch_sharding)
                batch = {k: v for k, v in batch.items() if k != "window"}
                state, metrics = train_step(teacher.in_step, state, global_batch(batch, run.batch_sharding), t_out)
                if reader is not None and step + 1 < tr.max_steps:
                    reader.ahead(step + 1)
                tok_since += tr.batch_size * tr.seq_len
                done = step + 1
                # The run of non-finite steps is read one step behind, once the next step is queued: reading this
                # step's would wait for it to finish before the next batch is even made, idling the device.
                if pending is not None:
                    _check_nonfinite(*pending, limit=tr.max_nonfinite_steps)
                pending = (done, metrics["nonfinite_run"])
                if done % tr.log_every == 0 or done == tr.max_steps:
                    now = time.perf_counter()
                    host = _host_metrics(metrics, state, tokens_per_sec=tok_since / max(now - t_last, 1e-9))
                    if sampler is not None:
                        host.update(sampler.metrics(rollout, seconds=now - t_last, batch_size=tr.batch_size))
                    t_last, tok_since = now, 0
                    tracker.log(done, host)
                    bar.update(done, host)
                if evaluates and (done % tr.eval_every == 0 or done == tr.max_steps):
                    last_eval = evaluate_at(done)
                if done % tr.save_every == 0 or done == tr.max_steps:
                    ckpt.save(done, state, {"step": done, "config": config_to_dict(cfg)})
                if self.on_step is not None:
                    self.on_step(done, state)
            if pending is not None:
                _check_nonfinite(*pending, limit=tr.max_nonfinite_steps)
            if tr.max_steps == start and evaluates:
                last_eval = evaluate_at(start)
            if self.cache_use is not None:
                log(self.cache_use.summary())
        student_dir = run.out / "student"
        tokenizer_from = student_tokenizer_file(cfg) if self.cross else run.lazy_teacher.directory
        save_pretrained(state.student, student_dir, tokenizer_from=tokenizer_from, chat_template=self.chat_template)
        log(f"done: {tr.max_steps} steps in {time.perf_counter() - t0:.1f}s; student exported to {student_dir}")
        self.state = state
        return {"eval": last_eval, "state": state, "compilation_cache": self.cache_use}

    def _student_chat_template(self, run) -> str | None:
        """The chat template the student was trained on (chat data only), which its export carries as
        `chat_template.jinja`: the run's (`data.chat_template` or the teacher's); across tokenizers, the student's
        own, else the teacher's (`vishwam.data.splits.cross_templates`)."""
        cfg = self.cfg
        if not is_chat(cfg.data.train):
            return None
        teacher_tokenizer = tokenizer_path(cfg.data, run.lazy_teacher.directory)
        if teacher_tokenizer is None:
            return None
        if self.cross:
            found = cross_templates(cfg.data, teacher_tokenizer, cfg.distillation.student_model.tokenizer)[0]
            return None if found is None else found[1]
        found = run_template(cfg.data, teacher_tokenizer)
        return None if found is None else found.text

    def _cross_sums(self, teacher: TeacherSource):
        """`(student, micro) -> sums` of a cross-tokenizer evaluation (`cross_eval_sums`, the resident teacher's
        or a streamed teacher's token log-probabilities), with both sides' byte tables."""
        cfg, run = self.cfg, self.prepared
        s_bytes = jnp.asarray(token_byte_lengths(load_tokenizer(student_tokenizer_file(cfg)),
                                                 run.student_config.vocab_size))
        t_bytes = jnp.asarray(token_byte_lengths(load_tokenizer(tokenizer_path(cfg.data, run.lazy_teacher.directory)),
                                                 run.teacher_config.vocab_size))
        step = cross_step_config(cfg)
        activations = rows_sharding(run.mesh, cfg.training.micro_batch_size, 3)

        def sums(student, micro):  # a host micro-batch (with its windows), placed here
            t_out = teacher.cross_outputs(micro, "eval")  # a streamed or cached teacher's token log-probabilities
            placed = global_batch({k: v for k, v in micro.items() if k != "window"}, run.batch_sharding)
            if t_out is not None:
                placed.update(global_batch({k: np.asarray(v) for k, v in t_out.items()}, run.batch_sharding))
            return cross_eval_sums(student, teacher.in_step, placed, num_chunks=step.num_chunks,
                                   alm_temperature=step.alm_temperature, chunk_size=step.chunk_size,
                                   compute_dtype=step.compute_dtype, student_bytes=s_bytes, teacher_bytes=t_bytes,
                                   activation_sharding=activations)
        return sums


def _host_metrics(metrics: dict, state, *, tokens_per_sec: float) -> dict:
    """A logged step's metrics on the host, with the run's counters and rates."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    host["tokens_per_sec"] = tokens_per_sec
    host["skipped_total"] = int(state.skipped)
    host["temperature"] = host.get("distill/temperature", float("nan"))
    host["peak_rss_gb"] = peak_rss_bytes() / 2**30
    return host


def _check_nonfinite(at_step: int, run_length, *, limit: int) -> None:
    if int(run_length) >= limit:
        raise VishwamError(f"{int(run_length)} non-finite steps in a row at step {at_step} (loss or gradient is "
                           "NaN/inf): lower training.learning_rate or check the data")


def train(cfg: RunConfig) -> dict:
    """The whole job of `python run.py --config C`: prepare, train, evaluate, export."""
    return Run(cfg).train()


__all__ = ["Run", "train"]
