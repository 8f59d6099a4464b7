"""Tiny Hugging Face models built offline from a config, saved as a hub download would be (tests only)."""

import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

WORDS = ("go to the a red green blue purple yellow grey ball box key door pick up put next open then , after "
         "you").split()


def word_tokenizer(specials, template):
    """A word-level tokenizer over the BabyAI words, built offline; ``template`` adds the special tokens."""
    vocab = {w: i for i, w in enumerate([*dict.fromkeys(specials.values()), *WORDS])}  # CLIP: pad is eos
    tok = Tokenizer(WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = Whitespace()
    used = sorted({t for t in template.split() if t in vocab}, key=vocab.get)
    tok.post_processor = TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials), len(vocab)


def build(folder, model, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_decoder(folder, width: int = 32, layers: int = 2) -> str:
    """A GPT-2-style decoder with a word tokenizer over the BabyAI words (no pad token, like GPT-2's)."""
    tok, vocab = word_tokenizer(dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>"), "<s> $A")
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=2, n_positions=64)
    return build(folder, transformers.GPT2LMHeadModel(config), tok)


def bert_tokenizer():
    specials = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    return word_tokenizer(specials, "[CLS] $A [SEP]")


def decoder_tokenizer():
    """BOS and EOS but no pad token, like Llama's and GPT-2's."""
    return word_tokenizer(dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>"), "<s> $A")


def clip_tokenizer():
    """CLIP pads with its end-of-text token, as openai/clip-vit-base-patch32 does."""
    return word_tokenizer(dict(unk_token="<unk>", bos_token="<sot>", eos_token="<eot>", pad_token="<eot>"),
                          "<sot> $A <eot>")


def byte_level_tokenizer():
    """A byte-level BPE over the BabyAI words, as Qwen2's (transformers picks Qwen2Tokenizer for a qwen2 model
    and rebuilds it from tokenizer.json, which must then be byte-level BPE)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 10, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    return tok, len(tok)


def perturbed(model, scale: float = 0.1):
    """Every parameter moved off its initial value (norm weights off 1 or 0, biases off 0), so that a forward
    pass that skipped or misread one would differ."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def tiny_architectures(root, width: int = 32, layers: int = 2) -> dict[str, tuple[str, str]]:
    """One tiny model of every architecture the jax backend implements, saved as a hub download would be, with
    the features that set each apart switched on: name -> (folder, kind)."""
    import torch

    torch.manual_seed(0)
    small = dict(hidden_size=width, num_hidden_layers=layers, intermediate_size=2 * width)
    out = {}

    tok, vocab = bert_tokenizer()
    out["bert"] = build(root / "bert", perturbed(transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab, max_position_embeddings=64, num_attention_heads=2, **small), add_pooling_layer=False)), tok), "encoder"
    out["nomic_bert"] = build(root / "nomic_bert", perturbed(transformers.NomicBertModel(transformers.NomicBertConfig(
        vocab_size=vocab, max_position_embeddings=64, num_attention_heads=2, **small))), tok), "encoder"
    blip = dict(small, vocab_size=vocab, max_position_embeddings=64, encoder_hidden_size=width, num_attention_heads=2)
    out["blip_text"] = build(root / "blip_text", perturbed(transformers.BlipTextModel(
        transformers.BlipTextConfig(**blip), add_pooling_layer=False)), tok), "blip"

    # MPNet: RoBERTa-style specials, pad id 1 (positions count from it)
    tok, vocab = word_tokenizer(dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"),
                                "<s> $A </s>")
    out["mpnet"] = build(root / "mpnet", perturbed(transformers.MPNetModel(transformers.MPNetConfig(
        vocab_size=vocab, max_position_embeddings=64, num_attention_heads=2, **small), add_pooling_layer=False)), tok), "encoder"

    tok, vocab = decoder_tokenizer()
    decoder = dict(small, vocab_size=vocab, max_position_embeddings=64, num_attention_heads=4, num_key_value_heads=2)
    llama3_rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16)  # a medium-frequency band at head_dim 8
    out["llama"] = build(root / "llama", perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        rope_parameters=llama3_rope, **decoder))), tok), "decoder"
    qwen_tok, qwen_vocab = byte_level_tokenizer()
    out["qwen2"] = build(root / "qwen2", perturbed(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **dict(decoder, vocab_size=qwen_vocab)))), qwen_tok), "decoder"
    gemma = transformers.Gemma3TextConfig(
        **dict(decoder, num_key_value_heads=1), head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10.0),
                         "full_attention": dict(rope_type="default", rope_theta=10000.0)})
    out["gemma3"] = build(root / "gemma3", perturbed(transformers.Gemma3TextModel(gemma)), tok), "decoder"

    tok, vocab = clip_tokenizer()
    text = dict(small, vocab_size=vocab, max_position_embeddings=32, num_attention_heads=2,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(small, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16)
    out["clip"] = build(root / "clip", perturbed(transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=16))), tok), "clip"
    return out
