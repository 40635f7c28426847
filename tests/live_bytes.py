"""Measure activation memory on CPU without an allocator: saved tensors and live tensor bytes.

Two instruments, both counting each storage once (views and aliases share one storage):

* `SavedTensors` — a `torch.autograd.graph.saved_tensors_hooks` context that records every storage
  autograd saves for backward during the forward, plus the layer inputs that non-reentrant
  activation checkpointing keeps (they are held by the checkpoint frame, not through saved-tensor
  hooks: `torch.utils.checkpoint._checkpoint_without_reentrant_generator` is wrapped to record the
  layer inputs and the tensors its closure keeps). Parameters are excluded. 16-bit copies of
  trainable parameters made by autocast (its cast cache) are reported apart, as `weight_copies`.
* `LiveBytes` — a `TorchDispatchMode` that registers the storage of every tensor an op returns (and
  the tensors it is told about up front: parameters, buffers, inputs) and a `weakref.finalize` on
  that storage, so it knows the bytes of all live tensor storages after every op and keeps the
  maximum. Storage Python objects are preserved by PyTorch while the storage lives, so the
  finalizer fires when the last tensor (Python or C++, e.g. a SavedVariable) lets go of it.

Both only see tensors: allocator slack, kernel workspaces that never become tensors, and the
memory of Python objects are not counted. Used by tests/test_activations.py and
bench/activation_probe.py.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from launcher.train.probe import is_param_cast as _is_param_cast  # the probe's rule, one copy

# ---------------------------------------------------------------------------------------------
# Saved tensors

def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if st.nbytes() == 0:
        return None
    return (st.data_ptr(), st.nbytes())


@dataclass
class SavedRecord:
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    label: str
    kind: str  # "activation", "weight_copy", "checkpoint_input"


@dataclass
class SavedTensors:
    """Unique storages saved for backward during the `with` block (parameters excluded).

    `label_fn` (optional) names the current module for each record (see `module_labeler`).
    """

    model: torch.nn.Module | None = None
    label_fn: Callable[[], str] | None = None
    records: dict[tuple[int, int], SavedRecord] = field(default_factory=dict)
    _param_keys: set = field(default_factory=set)
    _frozen32: dict = field(default_factory=dict)

    def _add(self, t: torch.Tensor, kind: str) -> None:
        key = _storage_key(t)
        if key is None or key in self._param_keys or key in self.records:
            return
        if kind == "activation" and (_is_param_cast(t) or self._is_frozen_cast(t)):
            kind = "weight_copy"
        label = self.label_fn() if self.label_fn else ""
        self.records[key] = SavedRecord(key[1], t.dtype, tuple(t.shape), label, kind)
        # a storage freed before the end of the forward (a graph dropped on the way) is not held
        weakref.finalize(t.untyped_storage(), self.records.pop, key, None)

    def _is_frozen_cast(self, t: torch.Tensor) -> bool:
        """A 16-bit copy autocast made of a frozen fp32 weight (not cached, so no grad_fn to follow):
        recognised by shape and value."""
        if t.grad_fn is not None or t.dtype not in (torch.bfloat16, torch.float16):
            return False
        for p in self._frozen32.get(t.numel(), ()):
            for cand in (p, p.t()) if p.dim() == 2 else (p,):
                if tuple(cand.shape) == tuple(t.shape) and torch.equal(cand.to(t.dtype), t):
                    return True
        return False

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t, "activation")
        return t

    @contextmanager
    def __call__(self) -> Iterator["SavedTensors"]:
        if self.model is not None:
            self._param_keys = {k for p in self.model.parameters() if (k := _storage_key(p)) is not None}
            for p in self.model.parameters():
                if p.dtype == torch.float32 and not p.requires_grad:
                    self._frozen32.setdefault(p.numel(), []).append(p.detach())
        from torch.utils import checkpoint as ckpt

        original = ckpt._checkpoint_without_reentrant_generator
        counter = self

        def generator(fn: Any, *gargs: Any, **gkwargs: Any):
            # the frame keeps the layer's positional inputs (save_inputs) and its recompute closure
            # keeps fn, whose partial keywords hold e.g. the rotary cos/sin
            held = list(gargs[5:]) if len(gargs) > 5 else []
            held += list(gkwargs.values())
            held += list(getattr(fn, "args", ())) + list(getattr(fn, "keywords", {}).values())
            for t in tensors_in(held):
                if torch.is_grad_enabled():
                    counter._add(t, "checkpoint_input")
            return original(fn, *gargs, **gkwargs)

        ckpt._checkpoint_without_reentrant_generator = generator  # type: ignore[assignment]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            ckpt._checkpoint_without_reentrant_generator = original  # type: ignore[assignment]

    def bytes(self, kind: str | None = None) -> int:
        return sum(r.nbytes for r in self.records.values() if kind is None or r.kind == kind)

    @property
    def activations(self) -> int:
        """Saved activations and checkpoint inputs, without autocast weight copies."""
        return self.bytes("activation") + self.bytes("checkpoint_input")

    @property
    def weight_copies(self) -> int:
        return self.bytes("weight_copy")

    def by_label(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records.values():
            out[f"{r.label} [{r.kind}]"] += r.nbytes
        return dict(out)


@contextmanager
def module_labeler(model: torch.nn.Module, depth: int = 3) -> Iterator[Callable[[], str]]:
    """Forward pre/post hooks that track the innermost running module's name (layer index generalised)."""
    stack: list[str] = []
    handles = []

    def norm(name: str) -> str:
        parts = [("L" if p.isdigit() else p) for p in name.split(".")]
        parts = [p for p in parts if p not in ("base_model", "model", "transformer", "default")]
        return ".".join(parts[-depth:]) or "<top>"

    def pre(name: str) -> Callable[..., None]:
        def hook(mod: Any, args: Any) -> None:
            stack.append(name)

        return hook

    def post(mod: Any, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(pre(norm(name))))
        handles.append(mod.register_forward_hook(post))
    try:
        yield lambda: stack[-1] if stack else "<top>"
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Live tensor bytes


class LiveBytes(TorchDispatchMode):
    """Track the bytes of live tensor storages (each counted once) and their maximum.

    Register pre-existing tensors (parameters, buffers, inputs) with `track(...)` before or while
    the mode is active; every op's output storages are registered as they appear. `mark(name)`
    records the current bytes under a name (e.g. "end of forward"); `peak` is the maximum seen
    after any op, `peak_at` the op and `phase` it happened in, `peak_breakdown` the storages
    live at that moment grouped by (phase created, dtype, shape).
    """

    def __init__(self, breakdown: bool = True, phase_breakdown: bool = False) -> None:
        super().__init__()
        self.live: dict[tuple[int, int], tuple[str, torch.dtype, tuple[int, ...]]] = {}
        self.current = 0
        self.peak = 0
        self.peak_at = ""
        self.peak_phase = ""
        self.phase = "setup"
        self.marks: dict[str, int] = {}
        self.phase_peaks: dict[str, int] = defaultdict(int)
        self._breakdown = breakdown
        self.peak_breakdown: dict[tuple[str, str, tuple[int, ...]], int] = {}
        # per phase: (op, live storages grouped as in peak_breakdown) at the phase's own peak
        self.phase_breakdown: dict[str, tuple[str, dict]] | None = {} if phase_breakdown else None

    # -- registration
    def _register(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key is None or key in self.live:
            return
        st = t.untyped_storage()
        self.live[key] = (self.phase, t.dtype, tuple(t.shape))
        self.current += key[1]
        weakref.finalize(st, self._free, key)

    def _free(self, key: tuple[int, int]) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= key[1]

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._register(t)
        self._update("track")

    def track_module(self, model: torch.nn.Module) -> None:
        self.track(list(model.parameters()) + list(model.buffers()))

    def set_phase(self, name: str) -> None:
        self.phase = name

    def mark(self, name: str) -> int:
        self.marks[name] = self.current
        return self.current

    def reset_peak(self) -> None:
        self.peak = self.current

    def _snapshot(self) -> dict[tuple[str, str, tuple[int, ...]], int]:
        agg: dict[tuple[str, str, tuple[int, ...]], int] = defaultdict(int)
        for (ptr, n), (ph, dt, shape) in self.live.items():
            agg[(ph, str(dt).replace("torch.", ""), shape)] += n
        return dict(agg)

    def _update(self, where: str) -> None:
        if self.current > self.phase_peaks[self.phase]:
            self.phase_peaks[self.phase] = self.current
            if self.phase_breakdown is not None:
                self.phase_breakdown[self.phase] = (where, self._snapshot())
        if self.current > self.peak:
            self.peak = self.current
            self.peak_at = where
            self.peak_phase = self.phase
            if self._breakdown:
                self.peak_breakdown = self._snapshot()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self._register(t)
        self._update(str(func))
        return out

    def top_of_peak(self, n: int = 12) -> list[tuple[int, str, str, tuple[int, ...]]]:
        rows = sorted(((v, k[0], k[1], k[2]) for k, v in self.peak_breakdown.items()), reverse=True)
        return rows[:n]


def param_bytes(model: torch.nn.Module) -> int:
    seen: set = set()
    n = 0
    for p in model.parameters():
        key = _storage_key(p)
        if key and key not in seen:
            seen.add(key)
            n += key[1]
    return n


def grad_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def tensors_in(obj: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(obj)
    return [t for t in flat if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------------------------------
# Tiny models trained the way ftl's trainer does (random weights, built from a config in-process)


def tiny_config(family: str, *, hidden: int = 256, layers: int = 4, vocab: int = 2000, **overrides: Any):
    """A small config of one family: llama (GQA 8/4 heads), qwen2 (8/2 heads, qkv bias), gpt2, bert, distilbert."""
    import transformers as tf

    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab,
                             max_position_embeddings=2048, tie_word_embeddings=False)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=2, vocab_size=vocab,
                             max_position_embeddings=2048, tie_word_embeddings=True)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=8, vocab_size=vocab, n_positions=2048)
    elif family == "bert":
        cfg = tf.BertConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=8, vocab_size=vocab, max_position_embeddings=1024)
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(dim=hidden, hidden_dim=4 * hidden, n_layers=layers, n_heads=8,
                                  vocab_size=vocab, max_position_embeddings=1024)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@dataclass
class Setup:
    model: torch.nn.Module
    autocast: torch.dtype | None
    head: str
    batch: dict[str, torch.Tensor]

    def forward_loss(self) -> torch.Tensor:
        ctx = (torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None
               else torch.autocast("cpu", enabled=False))
        with ctx:
            out = self.model(**self.batch)
        return out.loss


def build(cfg, *, method: str, precision: str = "bf16", attn: str = "sdpa", checkpointing: bool = False,
          micro_batch: int = 1, seq: int = 256, lora_r: int = 8, lora_dropout: float = 0.05,
          targets: Any = "all-linear", head: str = "causal_lm", seed: int = 0) -> Setup:
    """The model, batch and autocast setting ftl's trainer uses for `method` and `precision`.

    full: fp32 parameters, forward under autocast(bf16/fp16) (none for fp32).
    lora: base loaded in the compute dtype (bf16/fp16; fp32 for fp32), PEFT adapters in fp32.
    qlora: lora with the linears in NF4 (bitsandbytes), prepared by the trainer's prepare_kbit.
    bf16-pure: every method loaded in bf16, adapters bf16 too, no autocast.
    """
    import transformers as tf

    torch.manual_seed(seed)
    # ftl's trainer turns the KV cache off for training: with it on, the forward builds a
    # DynamicCache whose cat() copies k and v (GPT-2 then keeps them beside the fused qkv output)
    cfg.use_cache = False
    pure = precision == "bf16-pure"
    half = {"bf16": torch.bfloat16, "bf16-pure": torch.bfloat16, "fp16": torch.float16}.get(precision)
    kwargs: dict[str, Any] = {"attn_implementation": attn}
    auto = tf.AutoModelForSequenceClassification if head == "seq_cls" else tf.AutoModelForCausalLM
    if (method in ("lora", "qlora") or pure) and half is not None:
        kwargs["dtype"] = half
    if method == "qlora":
        # bitsandbytes quantizes on load: save the random model and load it back (local files only),
        # then the trainer's prepare_kbit (PEFT's prepare_model_for_kbit_training, with what it upcast
        # to fp32 -- embeddings, norms, lm_head -- put back in the compute dtype, as for lora)
        import tempfile

        from launcher.train.model import prepare_kbit

        tmp = tempfile.mkdtemp(prefix="ftl-qlora-")
        auto.from_config(cfg, **kwargs).save_pretrained(tmp)
        qcfg = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=half or torch.float32)
        model = auto.from_pretrained(tmp, quantization_config=qcfg, device_map="cpu", **kwargs)
        model = prepare_kbit(model, gradient_checkpointing=False)
    else:
        model = auto.from_config(cfg, **kwargs)
    if head == "seq_cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    model.train()
    if method in ("lora", "qlora"):
        import peft

        for p in model.parameters():
            p.requires_grad_(False)
        lcfg = peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout, target_modules=targets,
                               task_type="SEQ_CLS" if head == "seq_cls" else "CAUSAL_LM")
        model = peft.get_peft_model(model, lcfg, autocast_adapter_dtype=not pure)
    if checkpointing:
        # transformers 5: activation_checkpointing_enable (gradient_checkpointing_enable is its
        # deprecated alias); both also call enable_input_require_grads() for input_ids models
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method in ("lora", "qlora"):
            model.enable_input_require_grads()
    model.train()
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.vocab_size
    ids = torch.randint(1, vocab, (micro_batch, seq), generator=g)
    batch = {"input_ids": ids}
    if head == "seq_cls":
        batch["labels"] = torch.randint(0, 2, (micro_batch,), generator=g)
    else:
        batch["labels"] = ids.clone()
    return Setup(model, None if pure else half, head, batch)


def use_trl_head(setup: Setup) -> Setup:
    """The loss through TRL's fused LM head, as TRL's SFT/DPO trainers run it (and `train.cross_entropy:
    chunked` for DAPT): add_fused_lm_head on the base model, then forward with fused_lm_head=True."""
    from trl.trainer.utils import add_fused_lm_head

    model = setup.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer asks for
    setup.batch = {**setup.batch, "fused_lm_head": True}
    return setup


def measure_saved(setup: Setup, labels: bool = False) -> tuple[SavedTensors, torch.Tensor]:
    """Run the forward and loss under `SavedTensors`; returns the counter and the loss (graph kept)."""
    counter = SavedTensors(model=setup.model)
    if labels:
        with module_labeler(setup.model) as lab:
            counter.label_fn = lab
            with counter():
                loss = setup.forward_loss()
    else:
        with counter():
            loss = setup.forward_loss()
    return counter, loss


def _layer_phase_hooks(model: torch.nn.Module, lb: "LiveBytes") -> list:
    """Backward pre-hooks that name the phase after the decoder layer (or head) being back-propagated."""
    import re

    handles = []
    for name, mod in model.named_modules():
        m = re.search(r"\.(?:layers|h|layer)\.(\d+)$", name)
        label = f"backward layer {int(m.group(1))}" if m else ("backward head" if name.endswith("lm_head") else None)
        if label:
            handles.append(mod.register_full_backward_pre_hook(lambda mod, g, label=label: lb.set_phase(label)))
    return handles


def measure_step(setup: Setup, lr: float = 1e-3, layer_phases: bool = False, phase_breakdown: bool = False) -> LiveBytes:
    """One training step (forward+loss, backward, AdamW step, zero_grad) under `LiveBytes`.

    AdamW with foreach (PyTorch's default on CPU is the for-loop; foreach=True is forced so the
    step's temporaries resemble the GPU default). With `layer_phases`, backward phases are split
    into "backward" (loss and head), "backward layer i".
    """
    model = setup.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, foreach=True)
    lb = LiveBytes(phase_breakdown=phase_breakdown)
    handles = _layer_phase_hooks(model, lb) if layer_phases else []
    with lb:
        lb.track_module(model)
        lb.track(setup.batch.values())
        lb.set_phase("forward")
        loss = setup.forward_loss()
        lb.mark("end of forward")
        lb.set_phase("backward")
        loss.backward()
        del loss
        lb.mark("end of backward")
        lb.set_phase("step")
        opt.step()
        lb.mark("end of step")
        opt.zero_grad(set_to_none=True)
        lb.set_phase("done")
        lb.mark("after zero_grad")
    for h in handles:
        h.remove()
    lb.optimizer = opt  # keep states alive for inspection
    return lb


def freeze_all_but(model: torch.nn.Module, k: int, train_head: bool = True) -> None:
    """ftl's `freeze` method: train the last k decoder layers, the final norm and (optionally) the head."""
    import re

    names = [n for n, _ in model.named_parameters()]
    idx = [int(m.group(1)) for n in names if (m := re.search(r"\.(?:layers|h|layer)\.(\d+)\.", n))]
    n_layers = max(idx) + 1 if idx else 0
    for n, p in model.named_parameters():
        m = re.search(r"\.(?:layers|h|layer)\.(\d+)\.", n)
        if m:
            p.requires_grad_(int(m.group(1)) >= n_layers - k)
        elif any(t in n for t in ("norm.", "ln_f.", "final_layer_norm")):
            p.requires_grad_(True)
        elif "lm_head" in n or "score" in n or "classifier" in n:
            p.requires_grad_(train_head)
        else:
            p.requires_grad_(False)
