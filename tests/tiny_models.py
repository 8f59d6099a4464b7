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
    vocab = {w: i for i, w in enumerate([*specials.values(), *WORDS])}
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
