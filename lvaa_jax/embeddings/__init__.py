"""Stage 3: one embedding table per space (the agent, language and vision-language models, controls).

The language-model side is imported only where a model space is embedded, so that this package (and
everything that reads tables) imports without torch or transformers: ``spec`` (a model space as a config
names it), ``sources`` (where its weights are, and the cache), ``jax_models`` on ``flax_models`` or
``torch_models`` (how it runs: the two backends), ``pooling`` (how token states become one vector) and
``hf`` (tokenizers, batching, the choice of backend, a space's identity, ``embed_with_model``).
"""

from lvaa_jax.embeddings.controls import bag_of_words, check_instructions, random_gaussian
from lvaa_jax.embeddings.stage import embed_instructions, instruction_set
from lvaa_jax.embeddings.table import EmbeddingTable, instructions_hash, load_table, read_meta, save_table

__all__ = [
    "EmbeddingTable", "bag_of_words", "check_instructions", "embed_instructions", "instruction_set",
    "instructions_hash", "load_table", "random_gaussian", "read_meta", "save_table",
]
