"""A nomic-bert GGUF (nomic-embed-text) as a plain transformers ``NomicBertModel`` folder.

transformers' GGUF loader refuses the nomic-bert architecture, but transformers has the model itself, so
the GGUF's tensors are mapped by name onto ``NomicBertModel``'s state dict (the fused QKV weight split in
three; no tensor is transposed or permuted: llama.cpp runs nomic-bert with the rotate-half rotary layout
that transformers uses) and written as safetensors, with a config read from the GGUF's metadata and the
BERT WordPiece tokenizer rebuilt from its vocabulary. Every backend then reads a plain folder.
``tests/test_nomic_gguf.py`` checks the mapping against a forward pass written from the GGUF tensors.
Torch-free: gguf, numpy, safetensors and tokenizers only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lvaa_jax.errors import LvaaError

ARCHITECTURE = "nomic-bert"

# GGUF tensor name (per layer after "blk.{i}.") -> NomicBertModel's (per layer after "layers.{i}.").
EMBEDDINGS = {
    "token_embd.weight": "embeddings.word_embeddings.weight",
    "token_types.weight": "embeddings.token_type_embeddings.weight",
    "token_embd_norm.weight": "embeddings.LayerNorm.weight",
    "token_embd_norm.bias": "embeddings.LayerNorm.bias",
}
LAYER = {
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output_norm.weight": "post_attention_layernorm.weight",
    "attn_output_norm.bias": "post_attention_layernorm.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",  # silu(gate(x)) * up(x), as llama.cpp's nomic-bert graph
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "layer_output_norm.weight": "post_mlp_layernorm.weight",
    "layer_output_norm.bias": "post_mlp_layernorm.bias",
}
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")  # rows of attn_qkv


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metadata (``general.architecture`` ...) and the tensors (memory-mapped, in PyTorch's [out, in]
    layout) of a GGUF file."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise LvaaError(f"{path}: not a readable GGUF file ({e})") from None
    meta = {key: field.contents() for key, field in reader.fields.items()}
    return meta, {t.name: t.data for t in reader.tensors}


def _hparam(meta: dict[str, Any], key: str, path: Path) -> Any:
    if f"{ARCHITECTURE}.{key}" not in meta:
        raise LvaaError(f"{path}: the GGUF lacks {ARCHITECTURE}.{key}")
    return meta[f"{ARCHITECTURE}.{key}"]


def config_dict(meta: dict[str, Any], tensors: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    """NomicBertConfig's fields, from the GGUF's metadata."""
    if meta.get("general.architecture") != ARCHITECTURE:
        raise LvaaError(f"{path}: a {meta.get('general.architecture')!r} GGUF, not {ARCHITECTURE!r}")
    if _hparam(meta, "attention.causal", path):
        raise LvaaError(f"{path}: a causal {ARCHITECTURE} GGUF; nomic-embed attends both ways")
    return {
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": _hparam(meta, "embedding_length", path),
        "num_hidden_layers": _hparam(meta, "block_count", path),
        "num_attention_heads": _hparam(meta, "attention.head_count", path),
        "intermediate_size": _hparam(meta, "feed_forward_length", path),
        "hidden_act": "silu",
        "max_position_embeddings": _hparam(meta, "context_length", path),
        "type_vocab_size": tensors["token_types.weight"].shape[0],
        "layer_norm_eps": float(_hparam(meta, "attention.layer_norm_epsilon", path)),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", 0),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(_hparam(meta, "rope.freq_base", path))},
    }


def state_dict(tensors: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """NomicBertModel's weights, named as its state dict, in the GGUF's dtypes (F16 matrices, F32 norms)."""
    mapping = dict(EMBEDDINGS)
    for i in range(layers):
        mapping.update({f"blk.{i}.{name}": f"layers.{i}.{target}" for name, target in LAYER.items()})
    missing = sorted((set(mapping) | {f"blk.{i}.attn_qkv.weight" for i in range(layers)}) - set(tensors))
    if missing:
        raise LvaaError(f"the {ARCHITECTURE} GGUF lacks {len(missing)} tensors (e.g. {missing[0]})")
    weights = {target: np.ascontiguousarray(tensors[name]) for name, target in mapping.items()}
    for i in range(layers):
        for target, rows in zip(QKV, np.split(tensors[f"blk.{i}.attn_qkv.weight"], 3), strict=True):
            weights[f"layers.{i}.{target}"] = np.ascontiguousarray(rows)
    return weights


def save_folder(gguf_path: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Writes ``config.json``, ``model.safetensors`` and the tokenizer of a nomic-bert GGUF into ``folder``."""
    import safetensors.numpy
    import transformers

    gguf_path, folder = Path(gguf_path), Path(folder)
    meta, tensors = read_gguf(gguf_path)
    fields = config_dict(meta, tensors, gguf_path)
    config = transformers.NomicBertConfig(**fields, architectures=["NomicBertModel"])
    config.save_pretrained(folder)
    safetensors.numpy.save_file(state_dict(tensors, fields["num_hidden_layers"]), str(folder / "model.safetensors"),
                                metadata={"format": "pt"})
    tokenizer = transformers.BertTokenizer(vocab=wordpiece_vocabulary(meta, gguf_path), do_lower_case=True,
                                           model_max_length=fields["max_position_embeddings"])
    tokenizer.save_pretrained(folder)


def wordpiece_vocabulary(meta: dict[str, Any], path: Path) -> dict[str, int]:
    """BERT's WordPiece vocabulary back from the GGUF's: llama.cpp writes a word-initial piece "the" as
    "\u2581the" and a continuation "##ing" as "ing", and keeps "[CLS]"-style tokens as they are."""
    tokens = meta["tokenizer.ggml.tokens"]
    if meta.get("tokenizer.ggml.model") != "bert" or tokens[:1] != ["[PAD]"]:
        raise LvaaError(f"{path}: expected a BERT WordPiece vocabulary ([PAD] first), "
                        f"got {meta.get('tokenizer.ggml.model')!r} starting {tokens[:1]}")

    def piece(token: str) -> str:
        if token.startswith("[") and token.endswith("]"):
            return token
        return token[1:] if token.startswith("\u2581") else "##" + token

    vocabulary = {piece(token): i for i, token in enumerate(tokens)}
    if len(vocabulary) != len(tokens):
        raise LvaaError(f"{path}: the GGUF's vocabulary maps two tokens to one WordPiece")
    return vocabulary
