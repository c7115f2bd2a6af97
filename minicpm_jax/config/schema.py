"""Typed configuration: the model (dense MiniCPM4, InfLLM v2 sparse mode, MiniCPM-SALA) and the run.

Field names follow the official Hugging Face ``config.json`` so that a config round-trips through
``config.json`` unchanged. Cross-field rules live in ``validate``; ``config.loading`` turns every
problem (unknown keys, wrong types, rule violations) into one ``ConfigError``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

MIXER_TYPES = ("minicpm4", "lightning-attn")
DTYPES = ("float32", "bfloat16", "float16")
PositiveInt = Annotated[StrictInt, Field(gt=0)]  # sizes, counts and intervals: 0 or less is always a mistake


class _Strict(BaseModel):
    """Frozen, no unknown keys, no silent int/bool coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SparseConfig(_Strict):
    """InfLLM v2 trainable sparse attention (``sparse_config`` of the official config)."""

    kernel_size: StrictInt = 32
    kernel_stride: StrictInt = 16
    init_blocks: StrictInt = 1
    block_size: StrictInt = 64
    window_size: StrictInt = 2048
    topk: StrictInt = 64
    use_nope: StrictBool = False
    dense_len: StrictInt = 8192


class RopeScaling(_Strict):
    """LongRoPE factors (``rope_scaling`` with ``rope_type: longrope``)."""

    rope_type: Literal["longrope"] = "longrope"
    long_factor: tuple[float, ...]
    short_factor: tuple[float, ...]
    original_max_position_embeddings: StrictInt
    factor: float | None = None


class ModelConfig(_Strict):
    """Architecture of a MiniCPM4 / MiniCPM-SALA model (official ``config.json`` field names).

    Defaults are those of the official ``MiniCPMConfig`` constructor, so a ``config.json`` that
    omits a field means the same thing here as in the reference code.
    """

    @model_validator(mode="before")
    @classmethod
    def _kv_heads_default(cls, data):
        # MiniCPMConfig: num_key_value_heads=None means num_attention_heads (plain MHA)
        if isinstance(data, dict) and data.get("num_key_value_heads") is None:
            data = {**data, "num_key_value_heads": data.get("num_attention_heads", 32)}
        return data

    model_type: Literal["minicpm", "minicpm_sala"] = "minicpm"
    vocab_size: PositiveInt = 32000
    hidden_size: PositiveInt = 4096
    intermediate_size: PositiveInt = 11008
    num_hidden_layers: PositiveInt = 32
    num_attention_heads: PositiveInt = 32
    num_key_value_heads: StrictInt = 32
    head_dim: StrictInt | None = None
    hidden_act: Literal["silu"] = "silu"
    max_position_embeddings: PositiveInt = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: StrictBool = True
    attention_bias: Literal[False] = False
    attention_dropout: float = 0.0
    # muP scalars
    scale_emb: float = 1.0
    dim_model_base: StrictInt = 1
    scale_depth: float = 1.0
    mup_denominator: StrictInt | None = 32
    # InfLLM v2 sparse attention (no parameters)
    sparse_config: SparseConfig | None = None
    # MiniCPM-SALA hybrid fields (spec/sala.md); None mixer_types means every layer is "minicpm4"
    mixer_types: tuple[str, ...] | None = None
    lightning_nh: StrictInt | None = None
    lightning_nkv: StrictInt | None = None
    lightning_head_dim: StrictInt | None = None
    lightning_scale: Literal["1/sqrt(d)"] = "1/sqrt(d)"
    lightning_use_rope: StrictBool = True
    attn_use_rope: StrictBool = True
    attn_use_output_gate: StrictBool = False
    qk_norm: StrictBool = False
    use_output_gate: StrictBool = False
    use_output_norm: StrictBool = False
    # generation / bookkeeping fields carried for config.json round trips
    bos_token_id: StrictInt = 1
    eos_token_id: StrictInt | tuple[StrictInt, ...] = 2
    pad_token_id: StrictInt | None = None
    use_cache: StrictBool = True
    pretraining_tp: StrictInt = 1
    shift_labels: StrictBool | None = None

    @property
    def attn_head_dim(self) -> int:
        """Head dim of softmax-attention layers."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def layer_mixers(self) -> tuple[str, ...]:
        """Mixer type of every layer."""
        return self.mixer_types or ("minicpm4",) * self.num_hidden_layers

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        return self.hidden_size / self.dim_model_base

    def validate_rules(self) -> list[str]:
        """Cross-field rules; returns one message per violation."""
        errors = []
        nh, nkv = self.num_attention_heads, self.num_key_value_heads
        if self.head_dim is None and nh > 0 and self.hidden_size % nh:
            errors.append(
                f"model.num_attention_heads: {nh} does not divide model.hidden_size "
                f"{self.hidden_size} (set head_dim, or use a divisor of hidden_size)"
            )
        if nkv <= 0 or nh % nkv:
            errors.append(f"model.num_key_value_heads: {nkv} must be a positive divisor of num_attention_heads {nh}")
        if self.mixer_types is not None:
            if len(self.mixer_types) != self.num_hidden_layers:
                errors.append(
                    f"model.mixer_types: has {len(self.mixer_types)} entries, "
                    f"num_hidden_layers is {self.num_hidden_layers}; give one per layer"
                )
            bad = sorted({m for m in self.mixer_types if m not in MIXER_TYPES})
            if bad:
                errors.append(f"model.mixer_types: unknown mixer type(s) {bad}; allowed: {list(MIXER_TYPES)}")
            if "lightning-attn" in self.mixer_types:
                for name in ("lightning_nh", "lightning_nkv", "lightning_head_dim"):
                    if getattr(self, name) is None:
                        errors.append(f"model.{name}: required when mixer_types has 'lightning-attn'")
                if self.lightning_nh and self.lightning_nkv and self.lightning_nh % self.lightning_nkv:
                    errors.append(
                        f"model.lightning_nkv: {self.lightning_nkv} must divide lightning_nh {self.lightning_nh}"
                    )
        if self.rope_scaling is not None and nh > 0:
            half = self.attn_head_dim // 2
            for name in ("long_factor", "short_factor"):
                n = len(getattr(self.rope_scaling, name))
                if n != half:
                    errors.append(f"model.rope_scaling.{name}: has {n} values, head_dim/2 is {half}")
        return errors


class DcnConfig(_Strict):
    """How many slices (TPU ``slice_index``; elsewhere processes) each mesh axis spans."""

    data: PositiveInt = 1
    fsdp: PositiveInt = 1
    tensor: PositiveInt = 1
    sequence: PositiveInt = 1


class MeshConfig(_Strict):
    """Device mesh sizes; -1 fills the axis with the devices left over (at most one -1). ``dcn``: of
    each axis's size, the factor laid across slices (the slower data-center network; a hybrid
    ICI x DCN mesh, ``sharding.make_mesh``), e.g. ``dcn: {data: 2}`` for data parallelism over 2 slices."""

    data: StrictInt = 1
    fsdp: StrictInt = -1
    tensor: StrictInt = 1
    sequence: StrictInt = 1
    dcn: DcnConfig = DcnConfig()


class TaskRowsConfig(_Strict):
    """Rows of every global batch made of ``passkey`` / ``mqar`` examples, loss on the answer tokens
    only, each weighing ``weight`` corpus tokens (``minicpm_jax.train.task_rows``)."""

    task: Literal["passkey", "mqar"]
    rows: PositiveInt
    weight: Annotated[float, Field(gt=0)] = 1.0
    options: dict[str, Any] = {}  # passkey: key_length, min_length; mqar: num_pairs, num_queries, ...


class DataConfig(_Strict):
    """Training data: a source, a tokenizer, packing into ``seq_len`` rows (``minicpm_jax.data``)."""

    source: Literal["synthetic", "jsonl", "parquet", "arrayrecord", "array"] = "synthetic"
    paths: tuple[str, ...] = ()  # files or glob patterns (text sources: one document per record)
    text_field: str = "text"  # JSONL / Parquet column holding the document text
    tokenizer: str | None = None  # a tokenizer directory or file (data.tokenizer.load_tokenizer); None = byte
    synthetic_tasks: tuple[Literal["arithmetic", "kv_recall", "copy", "passkey"], ...] = (
        "arithmetic",
        "kv_recall",
        "copy",
    )
    synthetic_documents: StrictInt = 20000
    seq_len: PositiveInt = 128
    packing: Literal["first_fit", "none"] = "first_fit"  # none: one document (chunk) per padded row
    shuffle: StrictBool = True
    seed: StrictInt = 0
    eval_documents: StrictInt = 64  # held out (deterministically) for the evaluation loss
    task_rows: tuple[TaskRowsConfig, ...] = ()  # answer-only retrieval rows mixed into every batch


class OptimizerConfig(_Strict):
    """AdamW with MiniCPM's muP learning-rate rule, weight-decay mask, clipping and schedule."""

    learning_rate: Annotated[float, Field(gt=0)] = 1e-2  # base LR (muP: matrices get base / (hidden/dim_model_base))
    schedule: Literal["wsd_exp", "wsd_linear", "cosine", "constant"] = "wsd_exp"
    warmup_steps: StrictInt = 0
    decay_steps: StrictInt = 0  # length of the decay phase at the end of training
    min_lr_ratio: float = 0.05  # end-of-decay LR / base LR (exp: half-life = D ln2 / ln(1/ratio))
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: StrictBool = False
    decay_norms: StrictBool = False
    clip_norm: float | None = 1.0
    mup: StrictBool = True  # scale matrix LRs by dim_model_base / hidden
    mup_embeddings: StrictBool = False  # also scale the embedding / lm_head LR (an open assumption)


class TrainConfig(_Strict):
    """Steps, batch, accumulation, remat, checkpoints, logging and failure handling."""

    steps: PositiveInt = 100
    global_batch_size: PositiveInt = 8  # rows of seq_len tokens per optimizer step, all hosts
    micro_batches: PositiveInt = 1  # gradient accumulation: global batch split into this many scans
    remat: Literal["none", "dots_saveable", "full"] = "none"
    # run consecutive layers of one mixer kind as one lax.scan (one compiled copy of the layer, not
    # one per layer: faster compiles); same numbers and checkpoint keys; a runtime option, not the model's
    scan_layers: StrictBool = False
    loss_chunk_size: PositiveInt = 1024  # tokens per chunk of the cross-entropy (never all [B,T,V] at once)
    output_dir: str = "runs/default"
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 3
    log_every: PositiveInt = 10
    eval_every: StrictInt = 0  # 0 = only at the end
    # minicpm_jax.eval tasks run at every evaluation ({label: options}, as in eval recipes' `tasks`)
    eval_tasks: dict[str, dict] = {}
    max_consecutive_nonfinite: StrictInt = 5
    # resuming from output_dir's checkpoints: auto = refuse a config that changes the model or optimizer
    # state (train.loop.STATE_KEYS), force = resume anyway, fresh = move the old run aside and start at 0
    resume: Literal["auto", "force", "fresh"] = "auto"
    init_from: str | None = None  # a checkpoint / HF dir / preset to start the weights from
    # parameters to train (dotted-path patterns, e.g. "model.layers.*.self_attn"); empty = all
    trainable: tuple[str, ...] = ()
    # frozen models the loss reads (name -> checkpoint / HF dir / preset), reloaded on resume
    frozen: dict[str, str] = {}


class Config(_Strict):
    """Root config of a run: the model, the mesh, numeric types, and training sections."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    dtype: Literal[DTYPES] = "bfloat16"  # compute dtype
    param_dtype: Literal[DTYPES] = "float32"  # master weights
    seed: StrictInt = 0
