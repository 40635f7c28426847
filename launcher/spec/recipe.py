"""Recipes and cluster profiles: schemas, loading, `--set` overrides and errors that name the fix.

Precedence, lowest first: built-in defaults < cluster profile < recipe < command line. The recipe's
`cluster` key is either a profile path or a mapping `{profile: PATH, <profile keys>...}` whose keys
override the profile; `--set cluster.gpus_per_node=8` writes into that mapping.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from launcher.core import useryaml
from launcher.core.errors import FtlError, RecipeError, did_you_mean
from launcher.core.useryaml import UserYamlError
from launcher.spec.catalog import find_gpu, resolve_model

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # launcher/
BUILTIN_LOCAL_PROFILE = "local"

Method = Literal["full", "freeze", "lora", "qlora"]
Task = Literal["sft", "dapt", "classification", "dpo", "reward"]
Precision = Literal["bf16", "bf16-pure", "fp16", "fp32"]  # bf16: mixed (fp32 master weights); bf16-pure: bf16 throughout
ComputeDtype = Literal["bf16", "fp16", "fp32"]
CrossEntropy = Literal["standard", "chunked", "fused"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"]
Strategy = Literal["auto", "ddp", "zero1", "zero2", "zero3", "fsdp"]
STRATEGIES: tuple[str, ...] = tuple(s for s in get_args(Strategy) if s != "auto")  # what a run can really use
# DeepSpeed ZeRO's bf16 optimizer always keeps fp32 master weights, so only these can train bf16-pure
PURE_BF16_STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")
Offload = Literal["none", "optimizer", "params"]
AttnImpl = Literal["sdpa", "eager", "flash_attention_2"]
Provider = Literal["local", "slurm", "ssh", "runpod", "lambda"]
PRICE_STALE_DAYS = 30  # a price read longer ago than this is said to be old wherever it is used
RENTED: tuple[str, ...] = ("runpod", "lambda")  # providers whose machines ftl rents (facts: catalog/providers.yaml)


def price_note(profile: str, usd_per_gpu_hour: float, price_date: Any, age_days: int | None) -> str | None:
    """The one line said wherever a cost is computed from a price older than PRICE_STALE_DAYS, else None."""
    if not usd_per_gpu_hour or age_days is None or age_days <= PRICE_STALE_DAYS:
        return None
    return (f"note: the price of {profile} (${usd_per_gpu_hour:g}/GPU-hour) was read on {price_date}, {age_days} days "
            "ago; costs may be off (ftl prices --refresh reads live prices)")


class FieldConflict(ValueError):
    """A value that conflicts with another key of the recipe: reported on `field` (not on the whole recipe)."""

    def __init__(self, field: str, value: Any, fix: str):
        super().__init__(fix)
        self.field, self.value, self.fix = field, value, fix


INT64_MAX = 2**63 - 1
MAX_TOKENS = 10**15  # a training set (the largest pre-training corpora are ~1e14)
MAX_STEP_TOKENS = 2**40  # tokens in one optimizer step (large pre-training runs take ~1.6e7)
NAME_MAX, PATH_MAX = 255, 4096  # bytes per path component, per path (Linux)


def path_text(v: str | None) -> str | None:
    """A path (or hub id) as a string the operating system can take: no NUL byte, no component longer than
    NAME_MAX bytes, at most PATH_MAX bytes; refused here so that no file call fails with a traceback."""
    if v is None:
        return v
    if "\x00" in v:
        raise ValueError("holds a NUL byte, which no path can")
    if len(v.encode()) > PATH_MAX:
        raise ValueError(f"a path of {len(v.encode()):,} bytes; the system takes at most {PATH_MAX:,}")
    long = next((part for part in v.split("/") if len(part.encode()) > NAME_MAX), None)
    if long is not None:
        raise ValueError(f"a path component of {len(long.encode())} bytes; the system takes at most {NAME_MAX}")
    return v


# a finite number in plain notation: unquoted in YAML it reads as a number (launcher/core/useryaml.py), so
# as a string it was quoted
_QUOTED_NUMBER = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?")


class _Strict(BaseModel):
    # finite floats only: inf and nan (also as 'inf', '.inf', '1e400') are never a learning rate, a budget or a price
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, v: Any, info: Any) -> Any:
        """No booleans where a number goes (`micro_batch_size: true` is not 1), no number written as a string
        (`lr: "0.001"`: a typo in YAML more often than not), no integer beyond int64."""
        ann = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool):
            if ann is not bool and bool not in get_args(ann) and ann not in (Any,):
                raise ValueError("a boolean where this key takes a value of another type: write the value itself")
        elif (isinstance(v, str) and _QUOTED_NUMBER.fullmatch(v.strip()) and math.isfinite(float(v.replace("_", "")))
              and (ann in (int, float) or (get_args(ann) and set(get_args(ann)) <= {int, float, type(None)}))):
            raise ValueError(f"a number written as a string ({v[:40]!r}): write it without quotes")
        elif isinstance(v, int) and abs(v) > INT64_MAX:
            raise ValueError(f"an integer of {len(str(abs(v)))} digits: beyond what any count here can be")
        return v


class Lora(_Strict):
    r: int = Field(16, gt=0, le=65536, description="Rank of the low-rank update.")
    alpha: float = Field(32, gt=0, le=1e6, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module short names (q_proj, v_proj, ...) or 'all-linear' (every linear but the output head)."
    )
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full beside the adapter.")


class Quantization(_Strict):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "bf16"
    skip_modules: list[str] = Field(default_factory=list, description="Linear modules left unquantized (the output head always is).")


class Freeze(_Strict):
    trainable_layers: int = Field(0, ge=0, le=10_000, description="Train the last k transformer blocks (0: the head only).")
    train_head: bool = True


# `data.schema` is the recipe key users expect; pydantic warns that the field shadows BaseModel's deprecated
# schema() classmethod, which ftl never calls
warnings.filterwarnings("ignore", message='Field name "schema" in "Data" shadows', category=UserWarning)


class Data(_Strict):
    path: str | None = Field(None, description="Local file/folder (relative to the recipe) or a hub dataset id.")
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "txt", "hub"] = "auto"
    split: str = "train"
    validation_split: str | None = None
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    max_seq_len: int = Field(2048, gt=0, le=2**24, description="Tokens per sequence (at most 2^24 = 16,777,216).")
    packing: bool = False
    stride: int | None = Field(None, gt=0, le=2**24, description="DAPT window stride in tokens (default: max_seq_len, no overlap).")
    num_examples: int | None = Field(None, gt=0, le=10**12)
    num_tokens: int | None = Field(None, gt=0, le=10**15, description="Tokens in the training set, when known.")
    avg_tokens_per_example: float | None = Field(None, gt=0, le=2**24)
    columns: dict[str, str] = Field(default_factory=dict, description="Map ftl's field names to the dataset's columns.")
    prompt_template: str | None = None
    schema: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion"] = Field(  # type: ignore[assignment]
        "auto", description="The shape of an SFT example: alpaca (instruction/input/output), messages "
        "(OpenAI-style chat), sharegpt (conversations of from/value), prompt_completion; auto detects it.")
    chat_template: str | None = Field(None, description="Chat data: a template name the tokenizer knows, a Jinja "
                                      "string, or a file (relative to the recipe); default: the tokenizer's own.")
    train_on: Literal["assistant", "last", "all"] | None = Field(
        None, description="Which tokens carry the loss: assistant (every assistant turn; for alpaca and "
        "prompt/completion data, the completion), last (the last assistant turn), all (every token). Default: "
        "assistant, or all when response_only_loss is false.")
    response_only_loss: bool = True
    label_map: dict[str, int] | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return path_text(v)

    @property
    def trains_on(self) -> str:
        """data.train_on, with the older data.response_only_loss: false meaning all."""
        if self.train_on is not None:
            return self.train_on
        return "assistant" if self.response_only_loss else "all"


class Train(_Strict):
    micro_batch_size: int = Field(1, gt=0, le=4096)
    grad_accum: int = Field(1, gt=0, le=65536)
    epochs: float = Field(1, gt=0, le=10_000)
    max_steps: int | None = Field(None, gt=0, le=10**9)
    lr: float = Field(2e-4, gt=0, le=10)
    optimizer: Optimizer = "adamw"
    weight_decay: float = Field(0.0, ge=0, le=10)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    precision: Precision = Field("bf16", description="bf16: mixed precision (fp32 master weights, gradients and "
                                 "AdamW moments; bf16 compute). bf16-pure: weights, gradients and optimizer states in bf16 "
                                 "(DDP and FSDP only). fp16 needs a GPU; fp32: no autocast.")
    cross_entropy: CrossEntropy = Field("standard", description="standard: each task's own loss -- DAPT materialises "
                                        "the fp32 logits (transformers), SFT and DPO score tokens tile by tile (TRL's fused "
                                        "LM head); chunked: TRL's fused LM head for every task, so no tokens × vocab "
                                        "logits exist; fused: Liger Kernel's fused linear cross-entropy (DAPT, CUDA only; the liger-kernel "
                                        "package), which computes the head's gradients chunk by chunk in the forward.")
    gradient_checkpointing: bool = False
    activation_offloading: bool = Field(False, description="Keep saved activations in host RAM between forward and "
                                        "backward (TRL's offloader on CUDA: pinned, copies overlapping compute; the "
                                        "output head's own saves stay on the GPU). Combines with gradient_checkpointing "
                                        "(the checkpointed layer inputs move) and parallel.offload (host RAM adds up).")
    torch_compile: bool = Field(False, description="Compile the model with torch.compile (the Trainer's torch_compile). "
                                "The estimate does not model compiled kernels: memory and time are eager's.")
    attn_implementation: AttnImpl = "sdpa"
    seed: int = 42
    eval_steps: int | None = Field(None, gt=0, le=10**9)
    save_steps: int | None = Field(None, gt=0, le=10**9)
    save_total_limit: int = Field(2, gt=0, le=10_000, description="Checkpoints kept on disk (the estimate's disk figure uses it).")
    logging_steps: int = Field(10, gt=0, le=10**9)
    early_stopping_patience: int | None = Field(None, gt=0, le=10**6)
    report_to: Literal["none", "tensorboard", "wandb"] = "none"


class Parallel(_Strict):
    strategy: Strategy = "auto"
    offload: Offload = "none"


class Dpo(_Strict):
    beta: float = Field(0.1, gt=0, le=1000)


class EstimateSettings(_Strict):
    mfu: float | None = Field(None, gt=0, le=1, description="Model FLOPs utilisation; default per GPU and method.")
    headroom: float = Field(0.0, ge=0, lt=1, description="Fraction of GPU memory kept free when judging 'fits'.")


class Budget(_Strict):
    max_cost_usd: float | None = Field(None, gt=0, le=1e9)
    max_hours: float | None = Field(None, gt=0, le=87_840)


class Host(_Strict):
    """One machine of an SSH cluster (provider: ssh)."""

    host: str = Field(..., min_length=1, description="Address or name ftl connects to over SSH.")
    port: int = Field(22, gt=0, lt=65536)
    user: str | None = Field(None, description="Login user (default: ssh's own default).")
    key: str | None = Field(None, description="Private key file (default: ssh's own keys and agent).")
    address: str | None = Field(None, description="Address the other nodes reach this one at (default: host); "
                                                  "on rented GPUs the private IP.")
    python: str | None = Field(None, description="Python on this host (default: the cluster's python).")


class Cluster(_Strict):
    name: str = "local"
    provider: Provider = "local"
    gpu: str | None = Field(None, description="GPU catalog name; none means CPU processes (or the GPU detected).")
    gpus_per_node: int = Field(1, gt=0, le=64)
    nodes: int = Field(1, gt=0, le=4096)
    price_per_gpu_hour: float = Field(0.0, ge=0, le=1000)
    price_date: dt.date | None = None
    price_source: str | None = None
    inter_node_bandwidth_gbps: float = Field(12.5, gt=0, le=10_000, description="GB/s per node between nodes (100 Gb/s Ethernet = 12.5).")
    cpu_memory_gib: float | None = Field(None, gt=0, le=2**20, description="Host RAM per node, to check offload.")
    boot_seconds: float | None = Field(None, ge=0, le=7 * 86400, description="Seconds from request to a running instance (ftl plan; default per provider: runpod 120, lambda 300, others 0).")
    download_bandwidth_gbps: float | None = Field(None, gt=0, le=10_000, description="GB/s for downloading the model weights at start (ftl plan; default 1.0 on runpod/lambda, weights taken as present elsewhere).")
    budget: Budget = Field(default_factory=Budget)
    # provider fields (used by later backends; kept here so profiles validate as one schema)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    constraint: str | None = None
    setup: list[str] = Field(default_factory=list)
    sbatch_options: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    hosts: list[Host] = Field(default_factory=list)
    python: str | None = Field(None, description="Python interpreter on the nodes (slurm, ssh); default: `python` "
                               "when `setup` prepares the environment (slurm), else the one running ftl.")
    workdir: str | None = Field(None, description="Directory the nodes start in (ssh); default: the current directory.")
    region: str | None = None
    image: str | None = None
    cloud_type: Literal["secure", "community"] | None = None

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def price_age_days(self, today: dt.date | None = None) -> int | None:
        """Days since the profile's price was read (None without a price_date)."""
        return None if self.price_date is None else ((today or dt.date.today()) - self.price_date).days

    def price_note(self, today: dt.date | None = None) -> str | None:
        """One line when the price costs are computed from is older than PRICE_STALE_DAYS, else None."""
        return price_note(self.name, self.price_per_gpu_hour, self.price_date, self.price_age_days(today))


class Recipe(_Strict):
    name: str
    model: str
    method: Method = "lora"
    task: Task = "sft"
    lora: Lora = Field(default_factory=Lora)
    quantization: Quantization = Field(default_factory=Quantization)
    freeze: Freeze = Field(default_factory=Freeze)
    data: Data = Field(default_factory=Data)
    train: Train = Field(default_factory=Train)
    parallel: Parallel = Field(default_factory=Parallel)
    dpo: Dpo = Field(default_factory=Dpo)
    estimate: EstimateSettings = Field(default_factory=EstimateSettings)
    budget: Budget = Field(default_factory=Budget)
    cluster: Cluster = Field(default_factory=Cluster)
    hub_model_id: str | None = None

    # Where the recipe came from; relative paths were resolved against its folder.
    source: str | None = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("model")
    @classmethod
    def _model_path(cls, v: str) -> str:
        return path_text(v) or v

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.method == "qlora" and self.quantization.bits != 4:
            raise FieldConflict("quantization.bits", self.quantization.bits, "method 'qlora' needs quantization.bits: 4")
        if self.train.precision == "bf16-pure":
            if self.parallel.strategy not in ("auto",) + PURE_BF16_STRATEGIES:
                raise FieldConflict("parallel.strategy", self.parallel.strategy,
                                    "train.precision 'bf16-pure' cannot run under DeepSpeed ZeRO, which keeps fp32 master "
                                    "weights; use parallel.strategy fsdp (or ddp, or auto), or train.precision bf16")
            if self.method == "qlora" and self.quantization.compute_dtype != "bf16":
                raise FieldConflict("quantization.compute_dtype", self.quantization.compute_dtype,
                                    "train.precision 'bf16-pure' computes in bf16: set quantization.compute_dtype bf16")
        d, t = self.data, self.train
        if d.num_examples and d.avg_tokens_per_example and d.num_examples * d.avg_tokens_per_example > MAX_TOKENS:
            raise FieldConflict("data.num_examples", d.num_examples,
                                f"with data.avg_tokens_per_example {d.avg_tokens_per_example:g} that is more than "
                                f"{MAX_TOKENS:.0e} tokens, beyond any training set; check both")
        step_tokens = t.micro_batch_size * t.grad_accum * self.cluster.world_size * d.max_seq_len
        if step_tokens > MAX_STEP_TOKENS:
            raise FieldConflict("train.grad_accum", t.grad_accum,
                                f"a step of micro_batch_size x grad_accum x GPUs x max_seq_len = {step_tokens:.3g} tokens "
                                f"is beyond the {MAX_STEP_TOKENS:.3g} any optimizer step takes; lower one of them")
        if d.train_on in ("assistant", "last") and "response_only_loss" in d.model_fields_set and not d.response_only_loss:
            raise FieldConflict("data.train_on", d.train_on, "data.response_only_loss: false trains every token; "
                                "drop response_only_loss (train_on says it) or set train_on: all")
        ce = self.train.cross_entropy
        if ce != "standard" and self.head == "seq_cls":
            raise FieldConflict("train.cross_entropy", ce, f"task '{self.task}' scores sequences, with no vocabulary logits to chunk; "
                                "leave train.cross_entropy standard")
        if ce == "fused" and self.task != "dapt":
            # TRL 1.16's SFT trainer refuses Liger's fused linear cross-entropy (it patches the forward with its
            # own fused LM head) and its DPO trainer computes log-probabilities itself
            raise FieldConflict("train.cross_entropy", ce, f"task '{self.task}' already scores tokens with TRL's "
                                "fused LM head (no full logits), and TRL does not run Liger's fused linear "
                                "cross-entropy there; leave train.cross_entropy standard (fused is for task dapt)")
        return self

    @property
    def num_labels(self) -> int:
        if self.task == "reward":
            return 1  # a reward model scores a sequence with one number
        return len(self.data.label_map) if self.data.label_map else 2

    @property
    def head(self) -> str:
        """The output head the task trains: a sequence-classification head (classification, reward) or the LM head."""
        return "seq_cls" if self.task in ("classification", "reward") else "causal_lm"

    @property
    def pairs(self) -> bool:
        """True for tasks trained on preference pairs (chosen and rejected go through the model together)."""
        return self.task in ("dpo", "reward")

    @property
    def effective_budget(self) -> Budget:
        """The recipe's budget wins over the profile's, field by field."""
        merged = self.cluster.budget.model_dump()
        merged.update({k: v for k, v in self.budget.model_dump().items() if v is not None})
        return Budget(**merged)


# ---------------------------------------------------------------------------------------------
# Loading


class FileProblem(RecipeError):
    """A problem with a whole file (missing, empty, not a mapping) or a whole section (a typo'd key over a
    mapping): one plain sentence naming the file and the key, without a value to show."""

    def __init__(self, file: str, sentence: str, field: str | None = None):
        self.file, self.field, self.value, self.fix = file, field or "(file)", None, sentence
        Exception.__init__(self, f"{file}: {field + ': ' if field else ''}{sentence}")


# what each kind of file needs at least, and where the shipped ones are (said when a file is missing or empty)
_NEEDS = {"recipe": ("a recipe needs at least name: and model:", "ftl init --list shows the shipped recipes"),
          "cluster": ("a cluster profile holds keys such as provider: and gpu:", "the shipped profiles are in {}")}
_KINDS = {list: "a list", str: "a single value", int: "a number", float: "a number", bool: "true or false"}


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        path_text(str(path))
        found = path.is_file()
    except (ValueError, OSError) as e:
        raise RecipeError("", what, str(path), f"not a usable path: {e}") from None
    needs, shipped = _NEEDS.get(what, _NEEDS["recipe"])
    if not found:
        if path.is_dir():
            raise FileProblem(str(path), f"is a folder; give a {what} YAML file")
        raise FileProblem(str(path), f"no such file; check the path ({shipped.format(builtin_cluster_dir())})")
    try:
        data = useryaml.read(path)
    except UserYamlError as e:
        at = f"line {e.line}" if e.line else "(file)"
        raise RecipeError(str(path), at, path.name, e.problem) from None
    except OSError as e:
        raise RecipeError(str(path), what, str(path), f"cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(str(path), "(file)", path.name, f"not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise FileProblem(str(path), f"the file is empty; {needs}")
    if not isinstance(data, dict):
        kind = _KINDS.get(type(data), type(data).__name__)
        raise FileProblem(str(path), f"holds {kind}, not a mapping of keys; {needs} (key: value lines)")
    return data


def parse_set(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML, so numbers and booleans keep their type)."""
    if "=" not in item:
        raise RecipeError("--set", item, item, "write --set key.path=value, e.g. --set train.micro_batch_size=4")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise RecipeError("--set", item, item, "the key is empty; write --set key.path=value")
    try:
        value = useryaml.loads(raw) if raw.strip() else ""
    except UserYamlError as e:
        raise RecipeError("--set", key.strip(), raw[:200], e.problem) from None
    except yaml.YAMLError:
        value = raw
    return keys, value


def _apply(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        if k == "cluster" and isinstance(node.get(k), str) and node is raw:
            node[k] = {"profile": node[k]}
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def builtin_cluster_dir() -> Path:
    return PACKAGE_DIR.parent / "cluster"


def _profile_path(ref: str, base: Path) -> Path:
    p = Path(ref).expanduser()
    if not p.is_absolute():
        p = base / p
    if not p.suffix and not p.exists():
        p = p.with_suffix(".yaml")
    return p


def _model_fields(model: type[BaseModel]) -> list[str]:
    """The keys a user may write (not `source`, which ftl records itself)."""
    return [k for k, f in model.model_fields.items() if not f.exclude]


def _field_model(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of loc (for did-you-mean on unknown keys)."""
    model: Any = root
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return None
    return model


def _translate(err: ValidationError, file: str, root: type[BaseModel], prefix: str = "") -> RecipeError:
    errors = err.errors()
    e = errors[0]

    def key_path(err_loc: tuple) -> tuple:  # without pydantic's union branches: "literal['all-linear']", "list[str]"
        return tuple(p for p in err_loc if isinstance(p, int) or "[" not in str(p))

    loc = key_path(e["loc"])
    field = prefix + ".".join(str(p) for p in loc)
    branches = [x for x in errors if key_path(x["loc"]) == loc]
    if len(branches) > 1 and len(e["loc"]) > len(loc):  # a union: say what each alternative wanted
        wants = "; or ".join(dict.fromkeys(x["msg"].removeprefix("Input should be ").rstrip(".") for x in branches))
        value = e.get("input")
        hint = (f" (one name is written as a list: [{value}])" if isinstance(value, str)
                and any(x["type"] == "list_type" for x in branches) else "")
        return RecipeError(file, field, value, f"must be {wants}{hint}")
    value = e.get("input")
    kind = e["type"]
    conflict = (e.get("ctx") or {}).get("error")
    if isinstance(conflict, FieldConflict):
        return RecipeError(file, prefix + conflict.field, conflict.value, conflict.fix)
    if kind == "extra_forbidden":
        owner = _field_model(loc, root)
        hint = did_you_mean(str(loc[-1]), _model_fields(owner)) if owner else ""
        allowed = ", ".join(_model_fields(owner)) if owner else ""
        if isinstance(value, (dict, list)):  # a typo'd section: its key is the news, not its content
            return FileProblem(file, f"unknown key.{hint} Known keys here: {allowed}", field=field)
        return RecipeError(file, field, value, f"unknown key.{hint} Known keys here: {allowed}")
    if kind == "missing":
        return RecipeError(file, field, None, "required; add it to the file")
    if kind.startswith("literal_error"):
        expected = e.get("ctx", {}).get("expected", "")
        hint = ""
        if isinstance(value, str):
            choices = [c.strip(" '") for c in expected.replace(" or ", ",").split(",") if c.strip()]
            hint = did_you_mean(value, choices)
        return RecipeError(file, field, value, f"must be one of {expected}.{hint}")
    if kind == "finite_number":
        return RecipeError(file, field, value, "must be a finite number (not inf or nan)")
    msg = e["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    msg = msg.replace(", unable to parse string as an integer", ": write the digits, without quotes")
    msg = msg.replace(", unable to parse string as a number", ": write the number, without quotes")
    return RecipeError(file, field, value, msg)


def load_cluster(path: str | Path, overrides: dict[str, Any] | None = None) -> Cluster:
    """A cluster profile from a file (or the built-in name 'local'), with overrides applied."""
    path = Path(path)
    raw = _read_yaml(path, "cluster")
    raw.update(overrides or {})
    try:
        return Cluster.model_validate(raw)
    except ValidationError as e:
        raise _translate(e, str(path), Cluster) from None


def load_recipe(
    path: str | Path,
    sets: list[str] | None = None,
    cluster: str | Path | None = None,
    gpus_per_node: int | None = None,
    nodes: int | None = None,
) -> Recipe:
    """Read a recipe, apply command-line overrides, merge its cluster profile, resolve paths."""
    path = Path(path)
    raw = _read_yaml(path, "recipe")
    return recipe_from_dict(raw, path, sets=sets, cluster=cluster, gpus_per_node=gpus_per_node, nodes=nodes)


def recipe_from_dict(
    raw: dict[str, Any],
    path: str | Path | None = None,
    sets: list[str] | None = None,
    cluster: str | Path | None = None,
    gpus_per_node: int | None = None,
    nodes: int | None = None,
) -> Recipe:
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    file = str(path) if path else "<recipe>"
    base = Path(path).resolve().parent if path else Path.cwd()

    # each override with the flag that gave it: an error in a value from the command line names the flag
    overrides: list[tuple[list[str], Any, str]] = [(*parse_set(s), "--set") for s in sets or []]
    if cluster is not None:
        overrides.append((["cluster", "profile"], str(Path(cluster).expanduser().resolve()), "--cluster"))
    if gpus_per_node is not None:
        overrides.append((["cluster", "gpus_per_node"], gpus_per_node, "--gpus-per-node"))
    if nodes is not None:
        overrides.append((["cluster", "nodes"], nodes, "--nodes"))
    for keys, value, _ in overrides:
        _apply(raw, keys, value)

    def flag_of(field: str) -> str | None:
        """The flag that set `field`, a key inside it or the section above it (the last flag when several did)."""
        parts = field.split(".")
        return next((flag for keys, _, flag in reversed(overrides)
                     if parts[: len(keys)] == keys or keys[: len(parts)] == parts), None)

    def blamed(e: RecipeError) -> RecipeError:
        flag = flag_of(e.field)
        if not flag:
            return e
        return FileProblem(flag, e.fix, field=e.field) if isinstance(e, FileProblem) else RecipeError(
            flag, e.field, e.value, e.fix)

    # cluster: profile path (relative to the recipe) plus the recipe's/command line's overrides
    cl = raw.get("cluster")
    if cl is None:
        cl = {}
    elif isinstance(cl, str):
        cl = {"profile": cl}
    elif not isinstance(cl, dict):
        raise RecipeError(file, "cluster", cl, "give a cluster profile path, or a mapping with 'profile' and overrides")
    cl = dict(cl)
    ref = cl.pop("profile", None)
    if ref is None:
        profile_raw: dict[str, Any] = {}
    else:
        ppath = _profile_path(str(ref), base)
        if not ppath.is_file() and (builtin_cluster_dir() / Path(str(ref)).name).with_suffix(".yaml").is_file():
            ppath = (builtin_cluster_dir() / Path(str(ref)).name).with_suffix(".yaml")
        if not ppath.is_file():
            flag = flag_of("cluster.profile")
            if flag == "--cluster":
                raise FileProblem(f"--cluster {cluster}", f"no cluster profile there; give a cluster profile YAML file "
                                  f"(the shipped ones are in {builtin_cluster_dir()})")
            raise RecipeError(flag or file, "cluster.profile" if flag else "cluster", ref,
                              f"no cluster profile at {ppath}; give a path to a cluster/*.yaml file")
        profile_raw = _read_yaml(ppath, "cluster")
        profile_raw.setdefault("name", ppath.stem)
    merged = {**profile_raw, **cl}
    if isinstance(profile_raw.get("budget"), dict) and isinstance(cl.get("budget"), dict):
        merged["budget"] = {**profile_raw["budget"], **cl["budget"]}
    try:
        cluster_obj = Cluster.model_validate(merged)
    except ValidationError as e:
        err = _translate(e, file, Cluster, prefix="cluster.")
        key = err.field.split(".")[1] if "." in err.field else ""
        src = str(ppath) if ref is not None and key not in cl and key in profile_raw else file
        # a key of the profile file is named as it is written there (gpu, not cluster.gpu)
        raise blamed(err if src == file else _translate(e, src, Cluster)) from None
    raw["cluster"] = cluster_obj

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise blamed(_translate(e, file, Recipe)) from None
    recipe.source = str(Path(path).resolve()) if path else None

    # relative local paths are relative to the recipe's folder
    model_path = base / recipe.model
    if not Path(recipe.model).is_absolute() and (model_path / "config.json").is_file():
        recipe.model = str(model_path.resolve())
    if recipe.data.path and not Path(recipe.data.path).is_absolute():
        local = base / recipe.data.path
        if local.exists() or recipe.data.path.startswith((".", "/")) or recipe.data.format not in ("auto", "hub"):
            recipe.data.path = str(local.resolve())
    tpl = recipe.data.chat_template
    if tpl and "{{" not in tpl and "{%" not in tpl and not Path(tpl).is_absolute() and (base / tpl).is_file():
        recipe.data.chat_template = str((base / tpl).resolve())  # a template file beside the recipe

    # a model or GPU named on the command line is looked up now (the estimate would, without naming the flag)
    _look_up(flag_of("model"), resolve_model, recipe.model)
    if recipe.cluster.gpu:
        _look_up(flag_of("cluster.gpu"), find_gpu, recipe.cluster.gpu, field="cluster.gpu")
    return recipe


def _look_up(flag: str | None, lookup: Any, *args: Any, **kwargs: Any) -> None:
    """A catalog lookup of a value `flag` gave, its error prefixed with the flag; nothing without a flag."""
    if flag:
        try:
            lookup(*args, **kwargs)
        except FtlError as e:
            raise FtlError(f"{flag}: {e}") from None


def dump_recipe(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (what a run directory records)."""
    return recipe.model_dump(mode="json")


def load_profiles(refs: Sequence[str | Path] | None = None) -> tuple[list[Cluster], list[str]]:
    """Cluster profiles from files and folders (default: the shipped cluster/ folder), with their paths."""
    refs = list(refs or [builtin_cluster_dir()])
    files: list[Path] = []
    for ref in refs:
        p = Path(ref).expanduser()
        if p.is_dir():
            files += sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml"))
        elif p.is_file():
            files.append(p)
        elif (builtin_cluster_dir() / p.name).with_suffix(".yaml").is_file():
            files.append((builtin_cluster_dir() / p.name).with_suffix(".yaml"))
        else:
            raise FtlError(f"--clusters {ref}: no such file or folder; give cluster profile YAML files or a folder of them")
    clusters, paths = [], []
    for f in files:
        raw = _read_yaml(f, "cluster")
        cl = load_cluster(f, None if raw.get("name") else {"name": f.stem})
        clusters.append(cl)
        paths.append(str(f))
    if not clusters:
        raise FtlError(f"--clusters {', '.join(map(str, refs))}: no cluster profiles (*.yaml) found")
    return clusters, paths
