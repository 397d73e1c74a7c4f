"""The compile dry run (`--training.dry-run compile`): every device program of the run, compiled at its real
shapes for the target machine from abstract inputs, before any weight is read.

From `config.json` alone (`vishwam.config.specs`) the teacher, the train state and the batches are built as
`jax.ShapeDtypeStruct`s carrying their shardings on the run's mesh over the target's devices
(`vishwam.compile.targets`); each program the config will run is lowered and compiled by XLA for those devices, and
`compiled.memory_analysis()` gives its bytes per device. The programs are the same functions the run executes:

- `train`: `vishwam.train.step.make_train_step` (its teacher outputs precomputed when streamed or cached); a
  cross-tokenizer run's programs are `vishwam.compile.cross_programs`';
- `eval`: `vishwam.train.evaluation.eval_sums` on one micro-batch, when the run evaluates;
- `eplb_probe`: `vishwam.train.remap.probe_similarity` on the probe sample, when EPLB re-maps (with a streamed
  teacher `student_similarity`, the teacher's hidden states given);
- `streamed_group`, `streamed_head`: one streamed teacher group's forward and the final norm + LM head over the
  step's hidden states (`vishwam.teacher.streamed`), with `loading: streamed`;
- `cache_build`: the teacher's top-k rows of one micro-batch (`vishwam.teacher.cache.cache_rows`), with
  `loading: cached` (the run builds a missing cache, as `python -m vishwam.cache` does);
- `prune_importance`, `prune_slice`: `init: from_teacher`'s ranking and slicing (`distill.student_init`);
- `on_policy_prefill`, `on_policy_decode`: the student writing its on-policy completions
  (`vishwam.generation.sampler.generation_programs`), with `on_policy.fraction` > 0;
- `sample_prefill`, `sample_decode` (and `teacher_sample_prefill`, `teacher_sample_decode` with a resident
  teacher): the continuations of `training.sample_prompts` at each evaluation (`vishwam.generation.samples`), for
  the prompts as the teacher's tokenizer splits them (without one here: a token per UTF-8 byte, and one more).
- `downstream`, `downstream_teacher`: the student's (and a resident teacher's) lm-eval requests scored at the
  training micro-batch's shape (`vishwam.downstream.scoring.score_rows`), with `training.downstream.tasks`.

`output_dir/memory_plan.json` gets, per program, XLA's argument/output/alias/temp bytes and their total
(argument + output + temp − alias) per device, the planner's figure where it models the program (the train
step), the compile seconds, the capacity and `fits`; nothing else is written. A program that does not fit (or
that XLA's TPU compiler refuses for lack of HBM) ends the dry run with one line naming it; with a `cpu:N` target
the figures estimate another machine (a GPU host) and are reported, not binding (`"binding": false`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from distill.eplb import LossBalancer
from distill.features import FeatureProjections
from distill.objective import TeacherOutputs
from distill.student_init import activation_stats, slice_program
from models import cast_floating, init_model, prepare_inputs
from vishwam.compile.cross_programs import cross_programs
from vishwam.compile.targets import Target, resolve_target
from vishwam.config import specs
from vishwam.config.sections import RunConfig
from vishwam.data.chat_rows import is_chat
from vishwam.data.text import read_prompts
from vishwam.downstream.scoring import score_rows
from vishwam.errors import ConfigError, DataError
from vishwam.generation.on_policy import initial_rollout, step_rows
from vishwam.generation.sampler import check_generation, generation_programs
from vishwam.generation.samples import Samples
from vishwam.io.files import atomic_write, require_directory
from vishwam.plan.planner import GiB, MemoryPlan, Planner, Setup
from vishwam.plan.program_plan import ProgramPlanner
from vishwam.sharding import batch_sharding, make_mesh, rows_sharding, tree_shardings
from vishwam.teacher.cache import cache_rows
from vishwam.teacher.sources import cached_layers
from vishwam.teacher.streamed import group_stats, head_logits, run_group
from vishwam.train.evaluation import eval_sums
from vishwam.train.remap import probe_similarity, student_similarity
from vishwam.train.step import StepConfig, init_state, make_train_step, optimizer_of


@dataclasses.dataclass
class ProgramMemory:
    """One compiled program's bytes per device."""

    name: str
    planner_bytes: int | None = None
    planner_parts: dict[str, int] | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    total_bytes: int | None = None
    compile_seconds: float | None = None
    error: str | None = None

    def fits(self, capacity: int | None) -> bool | None:
        if self.total_bytes is None:
            return False if self.error else None
        return None if capacity is None else self.total_bytes <= capacity


def _chat_data(cfg: RunConfig) -> bool:
    try:
        return is_chat(cfg.data.train)
    except DataError:
        return False


def _placed(tree, mesh):
    """`tree`'s array leaves as ShapeDtypeStructs with the rule table's shardings on `mesh`."""
    arrays, static = eqx.partition(tree, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    shardings = tree_shardings(arrays, mesh)
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), arrays, shardings)
    return eqx.combine(placed, static), shardings


def _replicated(shape, dtype, mesh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


class AbstractRun:
    """The run's models, state and batches as abstract arrays on `target`'s devices."""

    def __init__(self, cfg: RunConfig, target: Target):
        p, tr, t = cfg.parallelism, cfg.training, cfg.distillation.teacher_model
        self.cfg, self.target = cfg, target
        self.mesh = make_mesh(p.data, p.fsdp, p.tensor, devices=target.devices)
        self.t_config = specs.resolve_architecture(t.path)
        self.s_config = specs.student_config(cfg, self.t_config)
        self.objective = specs.objective(cfg, self.s_config, self.t_config)
        self.compute_dtype = specs.DTYPES[tr.compute_dtype]
        teacher = eqx.filter_eval_shape(lambda k: cast_floating(init_model(self.t_config, key=k),
                                                                specs.DTYPES[t.dtype]), jax.random.key(0))
        self.teacher, _ = _placed(teacher, self.mesh)
        self.optimizer, self.schedule = optimizer_of(cfg)
        state = eqx.filter_eval_shape(self._init_state, jax.random.key(0))
        self.state, self.shardings = _placed(state, self.mesh)
        self.rows = batch_sharding(self.mesh)
        # Chat rows come packed with segment ids and a loss mask, and the programs take them (on-policy needs
        # chat data); data not on this host is taken for text windows.
        self.packed = cfg.distillation_params.on_policy.enabled or _chat_data(cfg)
        self.batch = self._tokens(tr.batch_size)
        self.micro = self._tokens(tr.micro_batch_size)

    def _init_state(self, key):
        cfg, o, param_dtype = self.cfg, self.objective, specs.DTYPES[self.cfg.training.param_dtype]
        student = cast_floating(init_model(self.s_config, key=key), param_dtype)
        projections = None
        if o.uses_features:
            projections = cast_floating(FeatureProjections(o.feature_pairs, self.s_config.hidden_size,
                                                           self.t_config.hidden_size, key=key), param_dtype)
        e = cfg.distillation_params.eplb
        balancer = LossBalancer(len(o.feature_pairs), decay=e.ema_decay, target_ratio=e.target_ratio) \
            if o.balances else None
        return init_state(student, projections, balancer, self.optimizer, key, o.feature_pairs,
                          initial_rollout(o, cfg.training))

    def _tokens(self, rows: int) -> dict:
        shape = (rows, self.cfg.training.seq_len)
        keys = ("input_ids", "labels", "mask") + (("segment_ids", "loss_mask") if self.packed else ())
        return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.rows) for k in keys}

    def teacher_outputs(self, rows: int) -> TeacherOutputs:
        """What a streamed or cached teacher hands the step for `rows` sequences."""
        S, t, o = self.cfg.training.seq_len, self.cfg.distillation.teacher_model, self.objective
        sharded = lambda *shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
            shape, dtype, sharding=NamedSharding(self.mesh, PartitionSpec(self.rows.spec[0])))
        hidden = None
        if o.uses_features:
            dtype = jnp.float32 if t.loading == "cached" else specs.DTYPES[t.dtype]
            h = sharded(rows, S, self.t_config.hidden_size, dtype=dtype)
            hidden = tuple(h for _ in range(self.t_config.num_hidden_layers + 1))
        if t.loading == "cached":
            k = t.top_k
            return TeacherOutputs(topk_values=sharded(rows, S, k, dtype=jnp.float32),
                                  topk_indices=sharded(rows, S, k, dtype=jnp.int32),
                                  tail_logsumexp=sharded(rows, S, dtype=jnp.float32),
                                  label_logprob=sharded(rows, S, dtype=jnp.float32), hidden_states=hidden)
        logits = sharded(rows, S, self.t_config.vocab_size, dtype=specs.DTYPES[t.dtype])
        return TeacherOutputs(logits=logits, hidden_states=hidden)

    def programs(self) -> dict:
        """name -> (jitted function, abstract args, kwargs) for every program this config runs."""
        cfg, tr, loading = self.cfg, self.cfg.training, self.cfg.distillation.teacher_model.loading
        if specs.cross_tokenizer(cfg):  # both sides' windows: `vishwam.compile.cross_programs`
            return cross_programs(self)
        resident = loading == "resident"
        step = make_train_step(StepConfig(self.objective, self.compute_dtype, tr.grad_accum_steps, tr.remat),
                               self.optimizer, self.schedule, self.shardings)
        out = {"train": (step, (self.teacher if resident else None, self.state, self.batch,
                                None if resident else self.teacher_outputs(tr.batch_size)), {})}
        if (cfg.data.eval or cfg.data.eval_fraction > 0) and tr.eval_batches > 0:
            out["eval"] = (eval_sums, (self.teacher if resident else None, self.state.student, self.micro,
                                       None if resident else self.teacher_outputs(tr.micro_batch_size)),
                           {"compute_dtype": self.compute_dtype, "chunk_size": self.objective.params.logit_chunk_size,
                            "activation_sharding": rows_sharding(self.mesh, tr.micro_batch_size, 3)})
        e = cfg.distillation_params.eplb
        if self.objective.uses_eplb and e.remap and loading != "cached" and self.objective.eplb_stages > 1:
            rows = max(1, e.probe_tokens // tr.seq_len)
            ids = jax.ShapeDtypeStruct((rows, tr.seq_len), jnp.int32, sharding=rows_sharding(self.mesh, rows))
            pin = {"activation_sharding": rows_sharding(self.mesh, rows, 3)}
            if resident:
                out["eplb_probe"] = (probe_similarity, (self.state.student, self.teacher, ids, ids), pin)
            else:  # the streamed teacher's hidden states, as its groups hand them on
                h = jax.ShapeDtypeStruct((rows, tr.seq_len, self.t_config.hidden_size),
                                         specs.DTYPES[cfg.distillation.teacher_model.dtype],
                                         sharding=pin["activation_sharding"])
                t_h = (h,) * (self.t_config.num_hidden_layers + 1)
                out["eplb_probe"] = (student_similarity, (self.state.student, t_h, ids, ids), pin)
        if loading == "streamed":
            out["streamed_group"] = group = self._streamed_group()
            h = group[1][1]  # the step's hidden states, as the groups hand them on
            out["streamed_head"] = (head_logits, (self.teacher.model.norm, self.teacher.unembedding_weight(), h),
                                    {"whole_weight": NamedSharding(self.mesh, PartitionSpec())})
        if loading == "cached":  # the run builds a missing cache first, as `python -m vishwam.cache` does
            vocab = min(self.s_config.vocab_size, self.t_config.vocab_size)
            out["cache_build"] = (cache_rows, (self.teacher, self.micro), {
                "k": self.cfg.distillation.teacher_model.top_k, "vocab": vocab,
                "layers": cached_layers(self.objective), "chunk_size": self.objective.params.logit_chunk_size,
                "activation_sharding": rows_sharding(self.mesh, tr.micro_batch_size, 3)})
        if cfg.distillation.student_model.init == "from_teacher":
            out.update(self._pruning(resident))
        if tr.downstream.tasks:  # lm-eval requests packed into the micro-batch's rows
            out.update(self._downstream(resident))
        if self.objective.on_policy_rows:  # the student writing its completions (the longest prompts allowed)
            op = cfg.distillation_params.on_policy
            student = cast_floating(self.state.student, self.compute_dtype)
            programs = generation_programs(student, step_rows(self.objective, tr), tr.seq_len + 1 - op.max_new_tokens,
                                           op.max_new_tokens, self.mesh)
            out.update({f"on_policy_{name}": program for name, program in programs.items()})
        if (prompts := self._sample_prompts()) is not None:  # the samples at each evaluation
            rows, prompt_len = prompts
            n = tr.sample_max_new_tokens
            models = {"student": cast_floating(self.state.student, self.compute_dtype)}
            if resident:  # the teacher writes its own once
                models["teacher"] = self.teacher
            check_generation({k: (m.config, 1) for k, m in models.items()}, rows=rows, prompt_len=prompt_len,
                             max_new_tokens=n, mesh=self.mesh, capacity=None, resident_bytes=0,
                             what="config key 'training.sample_max_new_tokens'")  # positions; bytes: compiled
            for model, m in models.items():
                prefix = "sample_" if model == "student" else "teacher_sample_"
                out.update({prefix + name: program
                            for name, program in generation_programs(m, rows, prompt_len, n, self.mesh).items()})
        return out

    def _sample_prompts(self) -> tuple[int, int] | None:
        """`(prompts, tokens of the longest)` of `training.sample_prompts` (and `sample_prompts_file`), tokenized
        as the run tokenizes them, or None without any. Without a tokenizer here (a hub id's): a token per UTF-8
        byte and one more, the most a byte-level tokenizer makes of them."""
        tr, own = self.cfg.training, Path(self.cfg.distillation.teacher_model.path).expanduser() / "tokenizer.json"
        if not (tr.sample_prompts or tr.sample_prompts_file):
            return None
        tokenizer = self.cfg.data.tokenizer or (str(own) if own.is_file() else None)
        if tokenizer is None:
            prompts = list(tr.sample_prompts) + (read_prompts(tr.sample_prompts_file) if tr.sample_prompts_file
                                                 else [])
            return len(prompts), 1 + max(len(p.encode("utf-8")) for p in prompts)
        samples = Samples(self.cfg, tokenizer, Path(tr.output_dir), eos=[], pad=0,
                          vocab_size=min(self.s_config.vocab_size, self.t_config.vocab_size))
        return samples.ids.shape

    def abstract_outputs(self, name: str, fn, args, kwargs):
        """Program `name`'s outputs as `ShapeDtypeStruct`s placed as it places them: the pruned student in its
        training sharding, a KV cache in the cache's sharding, an array of the input rows' rows spread as they
        are (when they divide over the batch axes), anything else whole on every device."""
        shapes = fn.eval_shape(*args, **kwargs)
        if name == "prune_slice":
            shardings = jax.tree.leaves(self.shardings.student)
            return [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh) for x, sh in zip(shapes, shardings)]
        leaves = [x for x in jax.tree.leaves(args) if isinstance(x, jax.ShapeDtypeStruct)]
        tokens = [x for x in leaves if x.ndim >= 2 and not jnp.issubdtype(x.dtype, jnp.floating)]  # ids, masks
        rows = (tokens or [x for x in leaves if x.ndim == 3])[0].shape[0]  # else hidden states

        def place(x):
            if x.ndim == 5 and "cache_sharding" in kwargs:  # [layers, rows, kv heads, slots, head_dim]
                sharding = kwargs["cache_sharding"]
            elif rows in x.shape[:2]:  # [rows, ...], or [layers, rows, ...] stacked by a scan
                axis = x.shape.index(rows)
                spec = rows_sharding(self.mesh, rows, 1).spec
                sharding = NamedSharding(self.mesh, PartitionSpec(*(None,) * axis, *spec))
            else:
                sharding = NamedSharding(self.mesh, PartitionSpec())
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        return jax.tree.map(place, shapes)

    def _downstream(self, resident: bool) -> dict:
        """`score_rows` over one micro-batch of packed requests: the student's in the compute dtype, and a resident
        teacher's in its own."""
        tr = self.cfg.training
        batch = {k: jax.ShapeDtypeStruct((tr.micro_batch_size, tr.seq_len), jnp.int32, sharding=self.rows)
                 for k in ("input_ids", "segment_ids", "targets", "scored")}
        kw = {"chunk_size": self.objective.params.logit_chunk_size,
              "activation_sharding": rows_sharding(self.mesh, tr.micro_batch_size, 3)}
        out = {"downstream": (score_rows, (self.state.student, batch), {"compute_dtype": self.compute_dtype, **kw})}
        if resident:
            dtype = specs.DTYPES[self.cfg.distillation.teacher_model.dtype]
            out["downstream_teacher"] = (score_rows, (self.teacher, batch), {"compute_dtype": dtype, **kw})
        return out

    def _pruning(self, resident: bool) -> dict:
        """`init: from_teacher`'s two programs: the importance pass over the probe (the whole teacher when it
        is resident, one streamed group otherwise) and the slicing of the student from the mapped layers."""
        rows = min(8, self.cfg.training.batch_size)
        cross = specs.cross_tokenizer(self.cfg)  # the teacher ranks on its own tokens; the body keeps its vocabulary
        seq = specs.teacher_seq_len(self.cfg) if cross else self.cfg.training.seq_len
        probe = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=rows_sharding(self.mesh, rows))
        valid = jax.ShapeDtypeStruct(probe.shape, bool, sharding=probe.sharding)
        pin = {"activation_sharding": rows_sharding(self.mesh, rows, 3)}
        if resident:
            importance = (activation_stats, (self.teacher, probe, valid), pin)
        else:  # group by group, as StreamedTeacher.importance runs it
            group, h, mask, cos, sin = self._group_inputs(probe, valid)
            importance = (group_stats, (group, h, cos, sin, mask, valid), pin)
        s = self.s_config
        param_dtype = specs.DTYPES[self.cfg.training.param_dtype]
        shardings = self.shardings.student
        if cross:  # pruned with the teacher's vocabulary, then FVT gives the student its own (on the host)
            s = s.replace(vocab_size=self.t_config.vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None)
            shardings = tree_shardings(eqx.filter_eval_shape(init_model, s, key=jax.random.key(0), dtype=param_dtype),
                                       self.mesh)
        slicer, sources, _ = slice_program(self.teacher, s, dtype=param_dtype, shardings=shardings)
        index = {"embed": (s.hidden_size,), "layer": (s.num_hidden_layers,),
                 "mlp": (s.num_hidden_layers, s.intermediate_size),
                 "q": (s.num_hidden_layers, s.num_attention_heads * s.head_dim),
                 "kv": (s.num_hidden_layers, s.num_key_value_heads * s.head_dim)}
        index = {k: _replicated(shape, jnp.int32, self.mesh) for k, shape in index.items()}
        return {"prune_importance": importance, "prune_slice": (slicer, (sources, index), {})}

    def _streamed_group(self):
        group, h, mask, cos, sin = self._group_inputs(self.batch["input_ids"], None)
        o = self.objective.model_outputs()
        return (run_group, (group, h, cos, sin, mask, o["output_hidden_states"], o["output_attentions"],
                            o["output_qkv"]), {"activation_sharding": h.sharding})

    def _group_inputs(self, ids, valid):
        """One streamed layer group (as many layers as the planner puts in one) and its inputs for `ids`:
        `(group, h, mask, cos, sin)`, abstract, their rows spread as `ids`' are."""
        layers = Planner(self.cfg, self.t_config).streamed_layers()
        group = jax.tree.map(lambda x: jax.ShapeDtypeStruct((layers, *x.shape[1:]), x.dtype, sharding=x.sharding)
                             if isinstance(x, jax.ShapeDtypeStruct) else x, self.teacher.model.layers)
        h, mask, cos, sin = eqx.filter_eval_shape(
            lambda i, v: (self.teacher.model.embed_tokens(i), *prepare_inputs(self.t_config, i, v)), ids, valid)
        h, cos, sin = (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows_sharding(self.mesh, x.shape[0], x.ndim))
                       for x in (h, cos, sin))
        return group, h, mask, cos, sin


_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, None: 1}


def _hbm_needed(message: str) -> int | None:
    """The bytes XLA's TPU compiler says a program needs when it refuses it (`CompileTimeHbmOom`: "the total
    memory required for HLO temporaries (126.58G) exceeds available HBM"), a lower bound of the program's total."""
    m = re.search(r"required for [^(]*\(([\d.]+)([KMGT])?\)", message) or re.search(r"[Uu]sed ([\d.]+)([KMGT])? of",
                                                                                message)
    return None if m is None else int(float(m.group(1)) * _UNIT[m.group(2)])


def compile_program(name: str, fn, args, kwargs) -> ProgramMemory:
    result = ProgramMemory(name)
    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args, **kwargs).compile()
    except Exception as e:  # XLA refuses what cannot fit (CompileTimeHbmOom on TPU) or cannot compile
        result.compile_seconds = time.perf_counter() - t0
        result.error = " ".join(str(e).split())[:300]
        result.temp_bytes = result.total_bytes = _hbm_needed(str(e))  # at least the temporaries it asked for
        return result
    result.compile_seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    result.argument_bytes, result.output_bytes = m.argument_size_in_bytes, m.output_size_in_bytes
    result.alias_bytes, result.temp_bytes = m.alias_size_in_bytes, m.temp_size_in_bytes
    result.total_bytes = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes \
        - m.alias_size_in_bytes
    return result


def dry_run_compile(cfg: RunConfig, *, log=print, local: bool = False, plan: MemoryPlan | None = None) -> dict:
    """Compile every program of `cfg` for `training.compile_target`, write `memory_plan.json`, print the table;
    raise a one-line `ConfigError` when a program does not fit. `local`: for this host's devices whatever
    `compile_target` says, writing nothing (a real run's `compile_check`), with `plan` the run's own memory plan
    for them (`vishwam.run.build.prepare` made it; planned here when not given). **Returns:** the report."""
    tr = cfg.training
    if not local:
        require_directory(tr.output_dir, "config key 'training.output_dir'")
    target = resolve_target(None if local else tr.compile_target, cfg.parallelism.num_devices)
    run = AbstractRun(cfg, target)
    if plan is None or plan.planner is None or not local:
        plan = Planner(cfg, run.t_config).plan(Setup.from_config(cfg), target.capacity, target.capacity_source)
    planner = plan.planner
    programs_planner = ProgramPlanner(planner, cfg.parallelism)
    results = []
    for name, (fn, args, kwargs) in run.programs().items():
        log(f"compiling {name} for {target.name} ({target.compiler}) ...")
        result = compile_program(name, fn, args, kwargs)
        if name == "train":
            result.planner_bytes = plan.total_bytes
            result.planner_parts = {"teacher weights": plan.teacher_bytes, "student params": plan.student_bytes,
                                    "projections": plan.projection_bytes, "optimizer state": plan.optimizer_bytes,
                                    "gradient accumulator": plan.gradient_bytes, **dict(plan.activation_parts)}
        elif (planned := programs_planner.plan(name, args, kwargs,
                                               run.abstract_outputs(name, fn, args, kwargs))) is not None:
            result.planner_bytes = planned.total_bytes
            result.planner_parts = {"arguments": planned.argument_bytes, "outputs": planned.output_bytes,
                                    "aliased": -planned.alias_bytes, **dict(planned.parts)}
        results.append(result)
    report = {
        "target": target.name, "compiler": target.compiler, "mesh": str(cfg.parallelism),
        "devices": cfg.parallelism.num_devices, "capacity_bytes": target.capacity,
        "capacity_source": target.capacity_source,
        "binding": not target.name.startswith("cpu:"),
        "programs": {r.name: {**{k: v for k, v in dataclasses.asdict(r).items() if k != "name"},
                              "fits": r.fits(target.capacity)} for r in results},
    }
    if not local:
        atomic_write(Path(tr.output_dir) / "memory_plan.json", json.dumps(report, indent=2) + "\n")
    log(render(report))
    if target.name.startswith("cpu:"):
        return report  # XLA:CPU's figures estimate another machine's (a GPU host): reported, not binding
    for r in results:
        if r.fits(target.capacity) is False:
            need = f"{_size(r.total_bytes)}/device" if r.total_bytes else "more than it has"
            if r.error and r.total_bytes:
                need = f"at least {need} (XLA refused it: CompileTimeHbmOom)"
            cap = _size(target.capacity) if target.capacity else "unknown"
            raise ConfigError(f"compiled program '{r.name}' needs {need} on {target.name} ({target.compiler}), a "
                              f"device holds {cap}" + (f": {r.error[:120]}" if r.error and not r.total_bytes else ""))
    return report


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 100 else f"{n / 2**20:.2f} MiB"


def render(report: dict) -> str:
    g = lambda n: f"{n / GiB:8.2f}" if n is not None else f"{'-':>8}"  # noqa: E731
    cap = report["capacity_bytes"]
    w = max([16, *(len(name) + 1 for name in report["programs"])])
    lines = [f"compiled memory plan: {report['target']} ({report['compiler']}), mesh {report['mesh']}, capacity "
             f"{'unknown' if cap is None else f'{cap / GiB:.2f} GiB'} per device ({report['capacity_source']})",
             f"  {'program':<{w}}{'planner':>8}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}{'total':>8}"
             f"{'compile s':>11}  fits"]
    for name, p in report["programs"].items():
        lines.append(f"  {name:<{w}}{g(p['planner_bytes'])}{g(p['argument_bytes'])}{g(p['output_bytes'])}"
                     f"{g(p['alias_bytes'])}{g(p['temp_bytes'])}{g(p['total_bytes'])}{p['compile_seconds']:11.1f}"
                     f"  {p['fits']}")
    lines.append("  (GiB per device; total = args + out + temp - alias, from compiled.memory_analysis())")
    if not report["binding"] and any(p["fits"] is False for p in report["programs"].values()):
        lines.append("  note: XLA:CPU's figures stand in for another machine's and run high (it computes bfloat16 work "
                     "in float32 and schedules for speed, not memory): reported, not binding; compile for the "
                     "target itself where its compiler is available (tpu:...)")
    return "\n".join(lines)


__all__ = ["AbstractRun", "ProgramMemory", "compile_program", "dry_run_compile", "render"]
