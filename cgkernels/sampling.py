"""Sampling at benchmark scale: prompts x seeds x methods x strengths, batched, resumable, across processes.

`python/sample.py` is the command line for this module.

Every image is one work item (method, strength, prompt index, seed), written as OUT/<stem>.png with a sidecar
OUT/<stem>.json (prompt, seed, method, strength and the sampling settings), each atomically (a temporary file
renamed into place), sidecar first: an image that exists is complete. A rerun skips the items whose image exists,
after checking that they were sampled with the same settings. Each image has its own generator seeded with its
seed, so its initial noise does not depend on which batch it shares; the denoiser's batched arithmetic then
changes it only within fp32 rounding.

Across processes (`accelerate launch --multi_gpu --num_processes N python/sample.py ...`, or torchrun), the
full ordered item list is split in contiguous shards (accelerate's split_between_processes), each process skipping
what exists in its own shard: the union of the outputs is the one-process run, and a killed process loses only its
in-flight batch. All methods and strengths of one invocation share one pipeline load.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cgkernels.cli import distributed_state, process_device
from cgkernels.guidance import ADAPTER_ROLES, MODES, NEEDS_CFG, GuidanceConfig

__all__ = ["SampleConfig", "WorkItem", "ADAPTERS_NEEDED", "parse_seeds", "parse_strengths", "read_prompts",
           "plan_work", "load_pipeline", "load_adapters", "sample", "image_grid"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Which LoRA each method reads; "cfg" is the base model with its adapters off (patch's preset "cfg" keeps
# whatever adapters are active), the baseline of a benchmark table.
ADAPTERS_NEEDED = ADAPTER_ROLES
GRID_PROMPTS = 8  # a sweep grid shows the first prompts at the first seed: a benchmark run has thousands


@dataclass
class SampleConfig:
    model: str
    prompts: list[str]
    out: str = "outputs/samples"
    positive: str | None = None  # LoRA file or folder
    negative: str | None = None
    methods: list[str] = field(default_factory=lambda: ["contrastive"])  # guidance modes, all from one load
    strengths: list[float] = field(default_factory=lambda: [1.0])  # several: a sweep (and a grid per method)
    seeds: list[int] = field(default_factory=lambda: [0])  # every prompt is sampled with every seed
    batch_size: int = 1
    start: float = 0.0
    stop: float = 1.0
    merge_weight: float = 0.0
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    negative_prompt: str | None = None
    steps: int = 30
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None  # SD3 / Flux T5 tokens (default: the pipeline's)
    dtype: str = "float32"
    device: str | None = None

    def validate(self):
        """Everything that can be checked before a model loads."""
        unknown = [m for m in self.methods if m not in MODES]
        if unknown or not self.methods:
            raise ValueError(f"--guidance: unknown method {', '.join(unknown) or '(none)'}; "
                             f"choose from {', '.join(MODES)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--guidance lists a method twice: {self.methods}")
        for method in self.methods:
            for role in ADAPTERS_NEEDED[method]:
                if getattr(self, role) is None:
                    raise ValueError(f"guidance {method!r} needs a {role} LoRA: pass --{role} FILE_OR_FOLDER")
        for role in ("positive", "negative"):
            path = getattr(self, role)
            if path is not None and self._uses(role) and not os.path.exists(path):
                raise FileNotFoundError(f"--{role} LoRA not found: {path}")
        if not self.prompts:
            raise ValueError("no prompts given: pass --prompt or --prompts")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be a non-empty list without repeats, got {self.seeds}")
        if not self.strengths or len(set(self.strengths)) != len(self.strengths):
            raise ValueError(f"--sweep strengths must be a non-empty list without repeats, got {self.strengths}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        try:  # what patch would refuse only once the model is loaded and sampling begins
            GuidanceConfig("cfg", None, None, 1.0, self.start, self.stop, self.merge_weight).validate()
        except ValueError as error:
            raise ValueError(f"--start / --stop / --merge-weight: {error}") from None
        no_cfg = [m for m in self.methods if m in NEEDS_CFG]
        if no_cfg and self.guidance_scale <= 1.0:
            raise ValueError(f"--guidance {no_cfg[0]} acts through CFG's unconditional prediction: it needs "
                             f"--guidance-scale > 1 (got {self.guidance_scale:g}, which runs no CFG)")
        looks_local = Path(self.model).is_absolute() or self.model.startswith(".") or self.model.count("/") != 1
        if looks_local and not Path(self.model).exists():  # a hub id is "owner/name"
            raise FileNotFoundError(f"--model folder not found: {self.model}")
        self._check_pipeline_options()

    def _check_pipeline_options(self) -> None:
        """Options only some pipelines take, checked against the saved pipeline's class before it loads."""
        wanted = {"guidance_rescale": self.guidance_rescale or None, "max_sequence_length": self.max_sequence_length}
        index = Path(self.model) / "model_index.json"
        if not any(v is not None for v in wanted.values()) or not index.is_file():
            return
        import diffusers

        pipeline_cls = getattr(diffusers, json.loads(index.read_text()).get("_class_name", ""), None)
        if pipeline_cls is None:
            return
        parameters = inspect.signature(pipeline_cls.__call__).parameters
        for name, value in wanted.items():
            if value is not None and name not in parameters:
                raise ValueError(f"{pipeline_cls.__name__} has no {name} option: leave --{name.replace('_', '-')} "
                                 "unset")

    def _uses(self, role: str) -> bool:
        return any(role in ADAPTERS_NEEDED[m] for m in self.methods)

    def settings(self) -> dict:
        """What makes two images of one (method, strength, prompt, seed) the same image: a rerun must match it."""
        # Paths are recorded (sources()), not compared: the same weights may sit elsewhere on another machine.
        skip = ("model", "positive", "negative", "prompts", "out", "methods", "strengths", "seeds", "batch_size",
                "device")
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def sources(self) -> dict:
        return {"model": self.model, "positive": self.positive if self._uses("positive") else None,
                "negative": self.negative if self._uses("negative") else None}


def parse_seeds(text: str) -> list[int]:
    """"0,1,2,3", "0-99" (inclusive) or a mix ("0-3,10")."""
    seeds = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        low, dash, high = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            seeds.extend(range(int(low), int(high) + 1) if dash else [int(part)])
        except ValueError:
            raise ValueError(f"bad seed list {text!r}: expected e.g. 0,1,2,3 or 0-99") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"bad seed list {text!r}: expected distinct non-negative seeds, e.g. 0,1,2,3 or 0-99")
    return seeds


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"bad strength list {text!r}: expected numbers, e.g. 0,1,2,4") from None
    if not values:
        raise ValueError(f"bad strength list {text!r}: expected numbers, e.g. 0,1,2,4")
    return values


def read_prompts(path) -> list[str]:
    """A prompt file: .txt (one prompt per line), .jsonl (one object per line with "prompt", or a JSON string), or
    .tsv with a "Prompt" column (PartiPrompts' PartiPrompts.tsv)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    lines = path.read_text(encoding="utf-8").splitlines()
    if suffix == ".txt":
        prompts = [line.strip() for line in lines if line.strip()]
    elif suffix == ".jsonl":
        prompts = [_jsonl_prompt(line, path, number) for number, line in enumerate(lines, 1) if line.strip()]
    elif suffix == ".tsv":
        header = lines[0].split("\t") if lines else []
        if "Prompt" not in header:
            raise ValueError(f"{path}: a .tsv prompt file needs a 'Prompt' column (as PartiPrompts.tsv)")
        column = header.index("Prompt")
        prompts = [row.split("\t")[column].strip() for row in lines[1:] if row.strip()]
    else:
        raise ValueError(f"{path}: unknown prompt file type {suffix!r}; use .txt (one per line), .jsonl or .tsv")
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def _jsonl_prompt(line: str, path: Path, number: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {number}: not JSON ({error.msg})") from None
    prompt = row.get("prompt") if isinstance(row, dict) else row
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{path} line {number}: expected an object with a non-empty \"prompt\" string")
    return prompt.strip()


@dataclass(frozen=True)
class WorkItem:
    method: str
    strength: float
    prompt_index: int
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.method}_s{self.strength:g}_p{self.prompt_index:05d}_seed{self.seed}"


def plan_work(config: SampleConfig) -> list[WorkItem]:
    """Every image of the run in one fixed order (method, strength, prompt, seed): the basis of the shards."""
    return [WorkItem(method, float(strength), index, seed)
            for method in config.methods for strength in _strengths_of(config, method)
            for index in range(len(config.prompts)) for seed in config.seeds]


def _strengths_of(config: SampleConfig, method: str) -> list[float]:
    # Plain CFG ignores the strength: a sweep samples its baseline once, as strength 0.
    return [0.0] if method == "cfg" else config.strengths


def load_pipeline(model: str, *, dtype: torch.dtype = torch.float32, device: str | None = None):
    """A diffusers pipeline from a local folder (or a hub id already in the local cache). An SD3 folder saved
    without its T5 encoder loads with text_encoder_3=None (the pipeline then feeds zero T5 states)."""
    from diffusers import DiffusionPipeline

    optional = {}
    index = Path(model) / "model_index.json"
    if index.is_file():
        components = json.loads(index.read_text())
        for name in ("text_encoder_3", "tokenizer_3"):
            if name in components and not (Path(model) / name).is_dir():
                optional[name] = None
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, **optional)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_adapters(pipe, positive: str | None, negative: str | None) -> dict[str, str]:
    """Load LoRA files/folders as adapters named "pos" and "neg"; returns {role: adapter_name}."""
    names = {}
    for role, path, name in (("positive", positive, "pos"), ("negative", negative, "neg")):
        if path is None:
            continue
        if not os.path.exists(path):
            raise FileNotFoundError(f"--{role} LoRA not found: {path}")
        pipe.load_lora_weights(path, adapter_name=name)
        names[role] = name
    return names


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_existing(out: Path, item: WorkItem, prompt: str, settings: dict) -> bool:
    """Whether the item's image exists; if so, that it was sampled from the same prompt and settings."""
    image = out / f"{item.stem}.png"
    if not image.exists():
        return False
    sidecar = out / f"{item.stem}.json"
    record = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    if record.get("prompt") != prompt:
        raise ValueError(f"{image} was sampled for prompt {record.get('prompt')!r}, this run's prompt "
                         f"{item.prompt_index} is {prompt!r}: sample into another --out (or delete the folder)")
    old = record.get("settings", {})
    changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}={a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise ValueError(f"{out} holds images sampled with other settings ({detail}): sample into another --out")
    return True


def _call_kwargs(pipe, config: SampleConfig, prompts: list[str], seeds: list[int]) -> dict:
    parameters = inspect.signature(pipe.__call__).parameters
    kwargs = dict(
        prompt=prompts,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        height=config.height,
        width=config.width,
        # One generator per image: its initial noise is the same in whatever batch it lands.
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
    )
    if config.negative_prompt is not None:
        kwargs["negative_prompt"] = [config.negative_prompt] * len(prompts)
    optional = {"guidance_rescale": config.guidance_rescale if config.guidance_rescale else None,
                "max_sequence_length": config.max_sequence_length}
    for name, value in optional.items():
        if value is None:
            continue
        if name not in parameters:
            raise ValueError(f"{type(pipe).__name__} has no {name} option: leave --{name.replace('_', '-')} unset")
        kwargs[name] = value
    return kwargs


@contextlib.contextmanager
def _method(pipe, method: str, strength: float, adapters: dict, config: SampleConfig):
    """The pipeline patched for one method; "cfg" runs the base model with its adapters off."""
    from cgkernels.patching import patch, unpatch  # diffusers and peft: only once there is something to sample

    base = method == "cfg" and adapters
    if base:
        pipe.disable_lora()
    patch(pipe, guidance=method, positive=adapters.get("positive"), negative=adapters.get("negative"),
          strength=strength, start=config.start, stop=config.stop, merge_weight=config.merge_weight)
    try:
        yield pipe
    finally:
        unpatch(pipe)
        if base:
            pipe.enable_lora()


def sample(config: SampleConfig, pipe=None, progress: bool = True) -> dict:
    """Sample every (method, strength, prompt, seed) of `config` not yet in config.out (this process's shard of
    them when launched on several). Returns this process's counts: {"planned", "skipped", "written", "rank",
    "processes"}."""
    from tqdm.auto import tqdm

    config.validate()
    state = distributed_state(config.device)
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    device = process_device(config.device, state)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    items, settings = plan_work(config), config.settings()
    if rank == 0:
        done = sum(_check_existing(out, item, config.prompts[item.prompt_index], settings) for item in items)
        print(f"{len(items)} images planned ({len(config.methods)} methods x strengths x {len(config.prompts)} "
              f"prompts x {len(config.seeds)} seeds): {done} already in {out} skipped, {len(items) - done} to sample"
              + (f" on {world} processes" if world > 1 else ""), flush=True)
    if state:
        state.wait_for_everyone()  # the count above sees the folder before any process writes to it
        with state.split_between_processes(items) as shard:
            mine = list(shard)
    else:
        mine = items
    todo = [item for item in mine if not _check_existing(out, item, config.prompts[item.prompt_index], settings)]
    written = 0
    if todo:
        if pipe is None:
            pipe = load_pipeline(config.model, dtype=_DTYPES[config.dtype], device=device)
        adapters = load_adapters(pipe, config.positive if config._uses("positive") else None,
                                 config.negative if config._uses("negative") else None)
        bar = tqdm(total=len(todo), desc=f"sampling (rank {rank})" if world > 1 else "sampling", position=rank,
                   disable=not progress)
        with bar:
            for (method, strength), group in itertools.groupby(todo, key=lambda item: (item.method, item.strength)):
                group = list(group)
                with _method(pipe, method, strength, adapters, config):  # one patch per (method, strength)
                    for begin in range(0, len(group), config.batch_size):
                        batch = group[begin: begin + config.batch_size]
                        written += _sample_batch(pipe, config, batch, out, settings)
                        bar.update(len(batch))
    if state:
        state.wait_for_everyone()
    if rank == 0 and len(config.strengths) > 1:
        _write_grids(config, out)
    return {"planned": len(mine), "skipped": len(mine) - len(todo), "written": written, "rank": rank,
            "processes": world}


def _sample_batch(pipe, config: SampleConfig, batch: list[WorkItem], out: Path, settings: dict) -> int:
    prompts = [config.prompts[item.prompt_index] for item in batch]
    images = pipe(**_call_kwargs(pipe, config, prompts, [item.seed for item in batch])).images
    for item, prompt, image in zip(batch, prompts, images):
        record = {"image": f"{item.stem}.png", "prompt": prompt, "prompt_index": item.prompt_index, "seed": item.seed,
                  "guidance": item.method, "strength": item.strength, "settings": settings,
                  "sources": config.sources()}
        # Sidecar first, image last: an image on disk always has its metadata.
        _atomic_write(out / f"{item.stem}.json", lambda p: p.write_text(json.dumps(record, indent=1)))
        _atomic_write(out / f"{item.stem}.png", lambda p, image=image: image.save(p, format="PNG"))
    return len(batch)


def _write_grids(config: SampleConfig, out: Path) -> None:
    """OUT/grids/<method>_sweep.png: rows = the first prompts at the first seed, columns = strengths. In a
    subfolder, so that OUT stays a folder of (image, sidecar) pairs for python/evaluate.py."""
    from PIL import Image

    (out / "grids").mkdir(exist_ok=True)
    seed = config.seeds[0]
    for method in config.methods:
        strengths = _strengths_of(config, method)
        if len(strengths) < 2:
            continue
        rows = [[Image.open(out / f"{WorkItem(method, float(s), index, seed).stem}.png") for s in strengths]
                for index in range(min(GRID_PROMPTS, len(config.prompts)))]
        _atomic_write(out / "grids" / f"{method}_sweep.png", lambda p: image_grid(rows).save(p, format="PNG"))


def image_grid(rows):
    """Paste a list of rows of equally sized PIL images into one image."""
    from PIL import Image

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * width, r * height))
    return grid
