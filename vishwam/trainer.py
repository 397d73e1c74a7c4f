"""The distillation run: teacher and student set up, the sharded training loop, evaluation, checkpoints,
tracking and export. `run.py` calls `train(config, options)`."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from distill.eplb import LossBalancer, best_monotone_assignment, cka_matrix, remap_pairs, replace_projections
from distill.features import FeatureProjections
from distill.mapping import layer_mapping, seed_attention_layers, validate_pairs
from distill.objective import ObjectiveSpec
from models import CausalLM, ModelConfig, cast_floating, init_model

from . import data as data_lib
from .checkpoint import open_pretrained, save_pretrained
from .config import RunConfig, config_to_dict, save_config
from .errors import ConfigError, VishwamError
from .memory import peak_rss_bytes
from .pytree import count_parameters, named_leaves
from .sharding import batch_sharding, make_mesh, shard_tree, tree_shardings
from .train_state import StepConfig, TrainState, init_state, make_eval_step, make_optimizer, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def log(msg: str):
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- set-up


def setup_distributed(cfg: RunConfig):
    d = cfg.distributed
    if d.num_processes > 1 or d.coordinator_address:
        if not d.coordinator_address:
            raise ConfigError("config key 'distributed.coordinator_address' is required when num_processes > 1")
        jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id)


def student_config(cfg: RunConfig, teacher: ModelConfig) -> ModelConfig:
    s = cfg.distillation.student_model
    changes = {k: getattr(s, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "intermediate_size", "head_dim",
                                          "tie_word_embeddings") if getattr(s, k) is not None}
    if s.init == "from_teacher":
        from distill.student_init import student_config_from_teacher

        # Pruning needs the student to fit inside the teacher (narrower, GQA groups kept whole).
        return student_config_from_teacher(teacher, **changes)
    try:
        return teacher.replace(**changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section 'distillation.student_model' describes an impossible architecture: {e}")


def init_layer_pairs(s_cfg: ModelConfig, t_cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
    """Which teacher layer initialises each student layer: evenly spread from the first to the last teacher
    layer, both kept (dropping the first layer costs more than any other in depth pruning)."""
    s, t = s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
    if s == 1:
        return ((0, t - 1),)
    return tuple((i, int(np.floor(i * (t - 1) / (s - 1) + 0.5))) for i in range(s))


def build_spec(cfg: RunConfig, s_cfg: ModelConfig, t_cfg: ModelConfig) -> tuple[ObjectiveSpec, tuple]:
    p = cfg.distillation_params
    lm = p.layer_mapping
    pairs = layer_mapping(lm.strategy, student_layers=s_cfg.num_hidden_layers,
                          teacher_layers=t_cfg.num_hidden_layers, k=lm.k, pairs=lm.pairs or None)
    if p.attention_layers:
        teacher_of = dict(pairs)
        uniform = dict(layer_mapping("uniform", student_layers=s_cfg.num_hidden_layers,
                                     teacher_layers=t_cfg.num_hidden_layers))
        for s in p.attention_layers:
            if not 0 <= s < s_cfg.num_hidden_layers:
                raise ConfigError(f"config key 'distillation_params.attention_layers' names student layer {s}, "
                                  f"out of range for {s_cfg.num_hidden_layers} layers")
        attention_pairs = tuple((s, teacher_of.get(s, uniform[s])) for s in p.attention_layers)
    elif lm.strategy == "seed":
        attention_pairs = seed_attention_layers(student_layers=s_cfg.num_hidden_layers,
                                                teacher_layers=t_cfg.num_hidden_layers, k=lm.k)
    else:
        attention_pairs = pairs[-1:]
    attention_pairs = validate_pairs(attention_pairs, student_layers=s_cfg.num_hidden_layers,
                                     teacher_layers=t_cfg.num_hidden_layers)
    t, e = p.temperature, p.eplb
    spec = ObjectiveSpec(
        kd_weight=p.kd_weight, ce_weight=p.ce_weight, feature_weight=p.feature_weight,
        attention_weight=p.attention_weight, kd_kind=p.kd_loss, jsd_beta=p.jsd_beta,
        temperature_schedule=t.schedule, temperature_start=t.start, temperature_end=t.end, temperature_min=t.min,
        temperature_max=t.max, total_steps=cfg.training.max_steps, label_smoothing=p.label_smoothing,
        chunk_size=p.logit_chunk_size, fused_logit_loss=p.fused_logit_loss, feature_pairs=tuple(pairs),
        feature_kind=p.feature_loss, feature_normalize=p.feature_normalize, attention_pairs=tuple(attention_pairs),
        attention_kind=p.attention_loss, head_mapping=p.attention_head_mapping, relation_heads=p.relation_heads,
        eplb=e.enabled and p.feature_weight > 0, eplb_stages=min(e.num_stages, len(pairs)),
        eplb_stage_steps=e.stage_steps, eplb_ramp_steps=e.ramp_steps, eplb_balance=e.balance,
    )
    if spec.eplb:
        spec.progressive()  # validates the stage settings early
    return spec, tuple(pairs)


class Tracker:
    """metrics.jsonl always (process 0), plus an Aim run when `tracking.aim` is on."""

    def __init__(self, cfg: RunConfig, out: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = out / "metrics.jsonl"
        self.run = None
        if not self.enabled:
            return
        self._truncate(resume_step)
        if cfg.tracking.aim:
            try:
                import aim

                repo = cfg.tracking.repo or str(out)
                self.run = aim.Run(repo=repo, experiment=cfg.tracking.experiment)
                self.run["hparams"] = json.loads(json.dumps(config_to_dict(cfg)))
            except Exception as e:  # tracking must never take down a run
                log(f"warning: Aim tracking disabled ({type(e).__name__}: {e})")
                self.run = None

    def _truncate(self, resume_step: int):
        """On resume, drop lines logged after the checkpoint, so the file equals an uninterrupted run's."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= resume_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                break
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict, context: str = "train"):
        if not self.enabled:
            return
        if context == "train":
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.run.track(v, name=k.replace("/", "."), step=step, context={"subset": context})

    def log_mapping(self, step: int, pairs, similarity=None):
        """Record the layer mapping (at start and at every EPLB re-mapping) in the Aim run."""
        if self.run is not None:
            history = self.run.get("mapping_history", None) or []
            entry = {"step": step, "pairs": [list(map(int, p)) for p in pairs]}
            if similarity is not None:
                entry["cka"] = np.round(np.asarray(similarity), 4).tolist()
            self.run["mapping_history"] = history + [entry]

    def close(self):
        if self.run is not None:
            self.run.close()


class Checkpointer:
    """Orbax checkpoints of the whole TrainState (saved as a flat dict of arrays named by pytree path).

    Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when complete), so a
    run killed mid-save leaves only complete checkpoints behind; re-running restores the newest of them.
    """

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict):
        """Start an asynchronous save of `state` at `step` (the caller decides when: `training.save_every`)."""
        arrays = dict(named_leaves(eqx.filter(state, eqx.is_array)))
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(arrays),
                                       meta=self.ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, like: TrainState, shardings) -> tuple[TrainState, dict]:
        arrays, static = eqx.partition(like, eqx.is_array)
        names = named_leaves(arrays)
        shard_named = dict(named_leaves(shardings))
        abstract = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard_named[n]) for n, a in names}
        args = self.ocp.args.Composite(state=self.ocp.args.StandardRestore(abstract),
                                       meta=self.ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        leaves, treedef = jax.tree_util.tree_flatten(arrays)
        new_leaves = [restored["state"][n] for n, _ in names]
        return eqx.combine(jax.tree_util.tree_unflatten(treedef, new_leaves), static), dict(restored["meta"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _global_batch(batch: dict, sharding) -> dict:
    """Every process computes the same global batch (a pure function of seed and step) and hands JAX its slice."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


def _atomic_json(path: Path, obj: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the run


class Run:
    """A configured distillation run. `Run(cfg).train()` does the whole job."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.on_step = None  # optional callback(step, state) after each step (tests stop runs with it)
        self.tracker = None
        tr = cfg.training
        setup_distributed(cfg)
        par = cfg.parallelism
        self.mesh = make_mesh(par.data, par.fsdp, par.tensor)
        self.out = Path(tr.output_dir)
        self.compute_dtype = DTYPES[tr.compute_dtype]
        self.param_dtype = DTYPES[tr.param_dtype]

        # Teacher: opened lazily (config, index and every shard header validated before any read).
        t_cfg = cfg.distillation.teacher_model
        self.lazy_teacher = open_pretrained(t_cfg.path)
        self.t_config = self.lazy_teacher.config
        self.s_config = student_config(cfg, self.t_config)
        self.spec, self.pairs = build_spec(cfg, self.s_config, self.t_config)
        self.loading = t_cfg.loading
        if self.loading == "cached":
            self._check_cached_spec()

        # Data: tokenized with the teacher's tokenizer unless pre-tokenized.
        self.teacher_dir = self.lazy_teacher.directory
        tokenizer = cfg.data.tokenizer or (str(self.teacher_dir / "tokenizer.json")
                                           if (self.teacher_dir / "tokenizer.json").is_file() else None)
        eos = self.t_config.eos_ids[0] if self.t_config.eos_ids else None
        train_tokens = data_lib.load_token_stream(cfg.data.train, tokenizer, eos)
        if cfg.data.eval:
            eval_tokens = data_lib.load_token_stream(cfg.data.eval, tokenizer, eos)
        elif cfg.data.eval_fraction > 0:
            train_tokens, eval_tokens = data_lib.split_eval(train_tokens, cfg.data.eval_fraction)
        else:
            eval_tokens = None
        vocab = min(self.s_config.vocab_size, self.t_config.vocab_size)
        data_lib.check_vocab(train_tokens, vocab, "data.train")
        self.train_data = data_lib.PackedDataset(train_tokens, tr.seq_len, name="data.train")
        self.eval_data = None
        if eval_tokens is not None:
            data_lib.check_vocab(eval_tokens, vocab, "data.eval")
            self.eval_data = data_lib.PackedDataset(eval_tokens, tr.seq_len, name="data.eval")
        self.batch_sharding = batch_sharding(self.mesh)

    # ---------------------------------------------------------------------------------------- models

    def load_teacher(self) -> CausalLM:
        dtype = DTYPES[self.cfg.distillation.teacher_model.dtype]
        return self.lazy_teacher.load(dtype=dtype, mesh=self.mesh)

    def _check_cached_spec(self):
        p = self.cfg.distillation_params
        bad = None
        if p.attention_weight > 0:
            bad = "distillation_params.attention_weight > 0 (attention maps are not cached)"
        elif p.kd_loss != "forward_kl" and p.kd_weight > 0:
            bad = f"distillation_params.kd_loss={p.kd_loss!r} (a top-k cache supports forward_kl)"
        elif p.temperature.schedule == "adaptive":
            bad = "distillation_params.temperature.schedule='adaptive' (needs full teacher logits)"
        if bad:
            raise ConfigError(f"config key 'distillation.teacher_model.loading' = 'cached' cannot be used with {bad}")

    def teacher_runner(self):
        """The teacher as the loop uses it: `(teacher_arg, outputs_fn)`; a resident teacher runs inside the
        jitted step (`outputs_fn` is None), a streamed or cached one produces `TeacherOutputs` per batch."""
        t = self.cfg.distillation.teacher_model
        dtype = DTYPES[t.dtype]
        if self.loading == "resident":
            self.teacher_forward = self.load_teacher()
            return self.teacher_forward, None
        if self.loading == "streamed":
            from .teacher import StreamedTeacher

            streamed = StreamedTeacher(self.lazy_teacher, dtype=dtype, max_resident_shards=t.max_resident_shards,
                                       mesh=self.mesh)
            self._closers.append(streamed.close)
            self.teacher_forward = streamed
            return None, lambda batch: streamed.outputs(batch, self.spec)
        from .teacher import TeacherCache

        layers = self.cached_layers()
        self.build_caches()
        self.caches = {
            split: TeacherCache(Path(t.cache_dir) / split, seq_len=data.seq_len, top_k=t.top_k,
                                num_windows=data.num_windows, hidden_layers=layers)
            for split, data in self._splits()
        }
        cache = self.caches["train"]
        n = self.t_config.num_hidden_layers
        return None, lambda batch: cache.outputs(batch, n)

    def _splits(self):
        return [(split, data) for split, data in (("train", self.train_data), ("eval", self.eval_data))
                if data is not None]

    def cached_layers(self) -> tuple[int, ...]:
        """The teacher layers whose hidden states a cache must hold (the mapped ones, with feature matching on)."""
        return tuple(sorted({tl for _, tl in self.pairs})) if self.spec.uses_features else ()

    def build_caches(self, *, always: bool = False) -> dict[str, dict]:
        """Build (or finish) the teacher cache of every split; the teacher is loaded once, only if a split needs
        it. Without `always`, a split whose index already covers all its windows is left as it is (its shards'
        checksums are verified when read). Returns each built split's index."""
        from .teacher import build_cache, cache_complete

        t = self.cfg.distillation.teacher_model
        todo = [(split, data) for split, data in self._splits()
                if always or not cache_complete(Path(t.cache_dir) / split)]  # missing or interrupted
        if not todo:
            return {}
        teacher = self.load_teacher()
        vocab = min(self.s_config.vocab_size, self.t_config.vocab_size)
        built = {}
        for split, data in todo:
            directory = Path(t.cache_dir) / split
            log(f"building teacher cache in {directory} (top-{t.top_k}, {data.num_windows} windows)")
            built[split] = build_cache(teacher, data, directory, top_k=t.top_k, vocab_size=vocab,
                                       hidden_layers=self.cached_layers(), meta={"teacher": str(self.teacher_dir)},
                                       log=log)
            log(f"teacher cache {split}: {data.num_windows} windows, {len(built[split]['shards'])} shard(s), "
                f"{built[split]['bytes_per_token']:.0f} bytes per token")
        return built

    def init_student(self, teacher: CausalLM, key) -> CausalLM:
        s = self.cfg.distillation.student_model
        if s.init == "path":
            from .checkpoint import load_pretrained

            student = load_pretrained(s.path, dtype=self.param_dtype)
            self.s_config = student.config
        elif s.init == "from_teacher":
            from distill.student_init import init_student_from_teacher

            probe = data_lib.batch_for_step(self.train_data, seed=self.cfg.training.seed, step=0,
                                            batch_size=min(8, self.cfg.training.batch_size))
            student = init_student_from_teacher(
                cast_floating(teacher, jnp.float32), self.s_config, pairs=init_layer_pairs(self.s_config,
                                                                                         self.t_config),
                probe_ids=jnp.asarray(probe["input_ids"]), probe_mask=jnp.asarray(probe["mask"]), key=key,
            )
        else:
            student = init_model(self.s_config, key=key)
        return shard_tree(cast_floating(student, self.param_dtype), self.mesh)

    # ------------------------------------------------------------------------------------------ train

    def train(self) -> dict:
        cfg, tr = self.cfg, self.cfg.training
        writer = jax.process_index() == 0
        if writer:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        from .planner import check_fits, print_plan_summary

        check_fits(print_plan_summary(cfg, self.t_config), cfg)  # stop before allocating what cannot fit
        key = jax.random.key(tr.seed)
        k_student, k_proj, k_state = jax.random.split(key, 3)
        self._closers = []
        teacher, teacher_fn = self.teacher_runner()
        log(f"teacher: {self.t_config.architecture} {self.t_config.num_parameters() / 1e6:.2f}M params from "
            f"{self.teacher_dir} ({self.loading})")
        init_teacher = teacher
        if cfg.distillation.student_model.init == "from_teacher" and teacher is None:
            init_teacher = self.load_teacher()  # pruning needs the whole teacher once
        student = self.init_student(init_teacher, k_student)
        del init_teacher
        log(f"student: {self.s_config.architecture} {count_parameters(student) / 1e6:.2f}M params "
            f"({cfg.distillation.student_model.init} init), mapping {list(self.pairs)}")
        projections = None
        if self.spec.uses_features:
            projections = shard_tree(cast_floating(FeatureProjections(
                self.pairs, self.s_config.hidden_size, self.t_config.hidden_size, key=k_proj), self.param_dtype),
                self.mesh)
        balancer = None
        if self.spec.eplb and self.spec.eplb_balance:
            balancer = LossBalancer(len(self.pairs), decay=cfg.distillation_params.eplb.ema_decay,
                                    target_ratio=cfg.distillation_params.eplb.target_ratio)
        optimizer, schedule = make_optimizer(
            learning_rate=tr.learning_rate, warmup_steps=tr.warmup_steps, total_steps=tr.max_steps,
            weight_decay=tr.weight_decay, grad_clip=tr.grad_clip)
        state = init_state(student, projections, balancer, optimizer, k_state, self.pairs)
        shardings = tree_shardings(eqx.filter(state, eqx.is_array), self.mesh)
        state = eqx.combine(jax.device_put(eqx.filter(state, eqx.is_array), shardings),
                            eqx.partition(state, eqx.is_array)[1])

        ckpt = Checkpointer(self.out / "checkpoints", tr.keep_checkpoints)
        start = 0
        latest = ckpt.latest()
        if latest is not None:
            state, meta = ckpt.restore(latest, state, shardings)
            start = int(state.step)
            self._set_pairs(np.asarray(state.mapping))
            log(f"resumed from checkpoint step {start} in {self.out / 'checkpoints'}")
        tracker = Tracker(cfg, self.out, start)
        self.tracker = tracker
        if self.spec.uses_features:
            tracker.log_mapping(start, self.pairs)

        step_cfg = StepConfig(self.spec, self.compute_dtype, tr.grad_accum_steps, tr.remat)
        train_step = make_train_step(step_cfg, optimizer, schedule, shardings)
        eval_step = make_eval_step(self.spec, self.compute_dtype)
        remap_steps = self._remap_steps()
        tokens_per_step = tr.batch_size * tr.seq_len
        bar = _progress(start, tr.max_steps)
        t0, t_last, tok_since = time.perf_counter(), time.perf_counter(), 0
        last_eval = None
        pending_check = None

        def check_nonfinite(at_step, run_length):
            if int(run_length) >= tr.max_nonfinite_steps:
                raise VishwamError(
                    f"{int(run_length)} non-finite steps in a row at step {at_step} (loss or gradient is NaN/inf): "
                    "lower training.learning_rate or check the data"
                )

        try:
            for step in range(start, tr.max_steps):
                if step in remap_steps and step > 0:
                    state = self._remap(teacher, state, key=jax.random.fold_in(k_proj, step))
                    train_step = make_train_step(StepConfig(self.spec, self.compute_dtype, tr.grad_accum_steps,
                                                            tr.remat), optimizer, schedule, shardings)
                batch = data_lib.batch_for_step(self.train_data, seed=tr.seed, step=step, batch_size=tr.batch_size)
                t_out = None if teacher_fn is None else teacher_fn(batch)
                batch.pop("window")
                state, metrics = train_step(teacher, state, _global_batch(batch, self.batch_sharding), t_out)
                tok_since += tokens_per_step
                done = step + 1
                # The run of non-finite steps is read one step behind, once the next step is queued: reading this
                # step's would wait for it to finish before the next batch is even made, idling the device.
                if pending_check is not None:
                    check_nonfinite(*pending_check)
                pending_check = (done, metrics["nonfinite_run"])
                if done % tr.log_every == 0 or done == tr.max_steps:
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    host["tokens_per_sec"] = tok_since / max(now - t_last, 1e-9)
                    host["skipped_total"] = int(state.skipped)
                    host["temperature"] = host.get("distill/temperature", float("nan"))
                    host["peak_rss_gb"] = peak_rss_bytes() / 2**30
                    t_last, tok_since = now, 0
                    tracker.log(done, host)
                    bar.update(done, host)
                if self.eval_data is not None and (done % tr.eval_every == 0 or done == tr.max_steps):
                    last_eval = self.evaluate(eval_step, teacher, state.student, done, teacher_fn)
                    tracker.log(done, last_eval, context="eval")
                if done % tr.save_every == 0 or done == tr.max_steps:
                    meta = {"step": done, "pairs": [list(p) for p in self.pairs], "config": config_to_dict(cfg)}
                    ckpt.save(done, state, meta)
                if self.on_step is not None:
                    self.on_step(done, state)
            if pending_check is not None:
                check_nonfinite(*pending_check)
            if tr.max_steps == start and self.eval_data is not None:
                last_eval = self.evaluate(eval_step, teacher, state.student, start, teacher_fn)
        finally:
            bar.close()
            ckpt.close()
            tracker.close()
            for close in self._closers:
                close()
        student_dir = self.out / "student"
        save_pretrained(state.student, student_dir, tokenizer_from=self.teacher_dir)
        log(f"done: {tr.max_steps} steps in {time.perf_counter() - t0:.1f}s; student exported to {student_dir}")
        self.state = state
        return {"eval": last_eval, "state": state}

    # -------------------------------------------------------------------------------------------- EPLB

    def _set_pairs(self, mapping: np.ndarray):
        pairs = tuple((int(a), int(b)) for a, b in mapping)
        if self.spec.uses_features and pairs != self.pairs:
            self.pairs = pairs
            self.spec = self.spec.with_feature_pairs(pairs)

    def _remap_steps(self) -> set[int]:
        e = self.cfg.distillation_params.eplb
        if not (self.spec.eplb and e.remap and e.stage_steps > 0):
            return set()
        if self.loading == "cached":
            log("EPLB re-mapping is off with a cached teacher (the cache holds only the mapped layers)")
            return set()
        return {s * e.stage_steps for s in range(1, self.spec.eplb_stages)}

    def _remap(self, teacher, state: TrainState, key) -> TrainState:
        """At a stage boundary: CKA between every student and teacher layer on a probe batch, the best
        monotone assignment by dynamic programming, and the projections of changed pairs re-initialised."""
        probe = data_lib.batch_for_step(self.train_data, seed=self.cfg.training.seed + 1, step=0,
                                        batch_size=min(self.cfg.training.batch_size, 8))
        ids, mask = jnp.asarray(probe["input_ids"]), jnp.asarray(probe["mask"])
        s_h = state.student(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        t_h = self.teacher_forward(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        sim = np.asarray(cka_matrix(s_h, t_h, mask))
        new_pairs = tuple(best_monotone_assignment(sim, [s for s, _ in self.pairs]))
        changed = remap_pairs(self.pairs, new_pairs)
        log(f"EPLB re-mapping at step {int(state.step)}: {list(self.pairs)} -> {list(new_pairs)}")
        if self.tracker is not None:
            self.tracker.log_mapping(int(state.step), new_pairs, sim)
        if not changed:
            return state
        projections = replace_projections(state.projections, changed, key=key)
        projections = cast_floating(projections, self.param_dtype)
        self._set_pairs(np.asarray(new_pairs))
        return eqx.tree_at(lambda s: (s.projections, s.mapping), state,
                           (projections, jnp.asarray(new_pairs, jnp.int32)))

    # ------------------------------------------------------------------------------------------- eval

    def _cached_eval(self, student, batch, rows):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        rows = {k: jnp.asarray(v) for k, v in rows.items()}
        return _cached_eval_sums(student, self.compute_dtype, batch, rows)

    def evaluate(self, eval_step, teacher, student, step: int, teacher_fn=None) -> dict:
        tr = self.cfg.training
        sums: dict[str, float] = {}
        for batch in data_lib.eval_batches(self.eval_data, tr.batch_size, tr.eval_batches):
            windows = batch.pop("window")
            if self.loading == "cached":
                rows = self.caches["eval"].rows(windows)
                out = jax.device_get(self._cached_eval(student, batch, rows))
            else:
                logits = None
                if teacher is None:  # streamed
                    logits = teacher_fn(batch).logits
                out = jax.device_get(eval_step(teacher, student, _global_batch(batch, self.batch_sharding), logits))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        n = max(sums.get("tokens", 0.0), 1.0)
        result = {
            "student_loss": sums["student_nll"] / n, "teacher_loss": sums["teacher_nll"] / n,
            "kl": sums["kl"] / n, "top1_agreement": sums["agree"] / n, "step": step,
        }
        result["student_ppl"] = math.exp(min(result["student_loss"], 50.0))
        result["teacher_ppl"] = math.exp(min(result["teacher_loss"], 50.0))
        if jax.process_index() == 0:
            _atomic_json(self.out / "eval.json", result)
        log(f"eval @ {step}: student loss {result['student_loss']:.4f} (ppl {result['student_ppl']:.2f}), "
            f"teacher {result['teacher_loss']:.4f}, kl {result['kl']:.4f}, top-1 agree {result['top1_agreement']:.3f}")
        return result


@eqx.filter_jit
def _cached_eval_sums(student, compute_dtype, batch, rows):
    """Eval sums against a top-k cache: teacher NLL from the cached label log-prob (exact), KL between the
    collapsed (top-k + tail) distributions at T=1 (a lower bound of the full KL), agreement with the cached
    top-1 (exact)."""
    from distill.logits import sparse_kd_loss

    student = cast_floating(student, compute_dtype)
    mask = batch["mask"].astype(jnp.float32)
    logits = student(batch["input_ids"], attention_mask=batch["mask"]).logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    kl, _ = sparse_kd_loss(logits, rows["topk_values"], rows["topk_indices"], rows["tail_logsumexp"], batch["mask"],
                           temperature=1.0)
    agree = (jnp.argmax(logits, -1) == rows["topk_indices"][..., 0]).astype(jnp.float32)
    tokens = jnp.sum(mask)
    return {"student_nll": jnp.sum(nll * mask), "teacher_nll": -jnp.sum(rows["label_logprob"] * mask),
            "kl": kl * tokens, "agree": jnp.sum(agree * mask), "tokens": tokens}


class _progress:
    """A progress bar (tqdm on a terminal, plain log lines otherwise) with step, loss, tokens/s and ETA."""

    def __init__(self, start: int, total: int):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.bar = None
        if jax.process_index() == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="distill", dynamic_ncols=True)

    def update(self, step: int, m: dict):
        desc = f"loss {m['loss']:.4f} | {m['tokens_per_sec']:.0f} tok/s"
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(desc)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        log(f"step {step}/{self.total} | {desc} | eta {eta:.0f}s")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(cfg: RunConfig) -> dict:
    return Run(cfg).train()


__all__ = ["Run", "train", "build_spec", "student_config", "init_layer_pairs", "Checkpointer", "Tracker"]
